"""How a function of one member runs over a population's members (a leading member axis on
the arguments marked 0, the others shared): all at once, k at a time, or one after another.

`at_once` (`search.population.members_at_once`, `train.seeds_at_once`; `resolve`):
- 0: all members as one batched program (`jax.vmap`): an accelerator, which one member's step
  leaves mostly idle, runs N of them in little more than one's time;
- k > 1: groups of k in one program (`jax.lax.map` with a batch size), for a population whose
  whole batched step does not fit in memory;
- 1: one member after another (`InTurn`): one member's own program, compiled once, called for
  each member's slice of the state. A CPU's cores are already busy with one member's step, and
  there both the batched convolutions and a step inside a loop over the members ran slower
  than one member's own program (docs/performance.md), so this is a CPU's default.
Every way computes what each member's solo run computes: the members never mix.
"""

from typing import Any, Callable, List, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pcp_jax import parallel


def resolve(at_once: int) -> int:
  """`at_once`, or for 0 (the default) all members (0) on an accelerator and one at a time
  (1) on a CPU (module docstring)."""
  if at_once:
    return at_once
  return 1 if jax.default_backend() == 'cpu' else 0


def per_member_arrays(leaf) -> Any:
  """An `in_axes` entry: the arrays of the argument have a member axis, its scalars are
  shared (a population's hyperparameters: a member's ss_factor, the shared learning rate)."""
  return 0 if jnp.ndim(leaf) else None


def together(n: int, at_once: int) -> int:
  """How many of `n` members a step holds the activations of at once (`resolve`)."""
  k = resolve(at_once)
  return min(k, n) if k else n


def _split(args: Sequence[Any], in_axes: Sequence[Any]):
  """The leaves of `args`, their treedef and the indices of the leaves with a member axis
  (`in_axes`: 0, None or `per_member_arrays` per argument, a prefix tree of `args`)."""
  leaves, treedef = jax.tree_util.tree_flatten(tuple(args))
  axes = treedef.flatten_up_to(jax.tree_util.tree_map(
      lambda ax, a: jax.tree_util.tree_map(ax if callable(ax) else lambda _: ax, a),
      tuple(in_axes), tuple(args), is_leaf=lambda x: x is None))
  return leaves, treedef, [i for i, ax in enumerate(axes) if ax == 0]


def _with(leaves: List[Any], split: List[int], own: Sequence[Any]) -> List[Any]:
  out = list(leaves)
  for i, x in zip(split, own):
    out[i] = x
  return out


def mapped(fn: Callable, in_axes, at_once: int) -> Callable:
  """`fn` mapped over the member axis inside one program: `jax.vmap(fn, in_axes)` for
  `at_once` 0 (or at least the member count), else `jax.lax.map` over groups of `at_once`."""
  if not at_once:
    return jax.vmap(fn, in_axes=in_axes)

  def call(*args):
    leaves, treedef, split = _split(args, in_axes)

    def one(own):
      return fn(*jax.tree_util.tree_unflatten(treedef, _with(leaves, split, own)))

    own = [leaves[i] for i in split]
    if at_once >= own[0].shape[0]:
      return jax.vmap(one)(own)
    return jax.lax.map(one, own, batch_size=at_once if at_once > 1 else None)

  return call


class InTurn:
  """`single`, one member's program (a `parallel.CompiledOnFirstCall`), called for each member
  in turn, the results stacked along a new member axis and passed through `combine`. Called,
  and compiled at its first call, as `single` is, with the population's arguments."""

  def __init__(self, single: parallel.CompiledOnFirstCall, in_axes,
               combine: Callable = lambda out: out):
    self.single, self.in_axes = single, in_axes
    self._take = jax.jit(lambda own, k: [jax.lax.dynamic_index_in_dim(a, k, keepdims=False)
                                         for a in own])
    self._stack = jax.jit(lambda outs: combine(jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs), *outs)))

  @property
  def compiled(self) -> bool:
    return self.single.compiled

  def member_args(self, args, k: int):
    """Member `k`'s arguments: its slice of those with a member axis, the others as given."""
    return self._member_args(_split(args, self.in_axes), k)

  def _member_args(self, split_args, k: int):
    leaves, treedef, split = split_args
    own = self._take([leaves[i] for i in split], jnp.int32(k))
    return jax.tree_util.tree_unflatten(treedef, _with(leaves, split, own))

  def lower(self, *args):
    """The lowering of one member's program (member 0's arguments)."""
    return self.single.lower(*self.member_args(args, 0))

  def __call__(self, *args, program: Callable = None):
    """`program`: a compiled form of `lower`'s result to call instead of `single`."""
    split_args = _split(args, self.in_axes)  # once per call, not per member
    leaves, _, split = split_args
    return self._stack([(program or self.single)(*self._member_args(split_args, k))
                        for k in range(leaves[split[0]].shape[0])])


def first_bad_step(bad):
  """The first non-finite step of any member (`bad`: each member's, -1 for none)."""
  first = jnp.min(jnp.where(bad >= 0, bad, jnp.iinfo(jnp.int32).max))
  return jnp.where(jnp.any(bad >= 0), first, -1).astype(jnp.int32)


def split_across(chunk: Callable, mesh) -> Callable:
  """A population's `chunk` (`loop.run_steps`' arguments) with the member axis split across
  `mesh`: each device runs the steps of its members whole (a step built for one device: no
  communication), the shared images and labels on every device; `bad_step` is the first
  non-finite step of any member."""
  def spec(tree):  # a member axis on arrays, scalars shared
    return jax.tree_util.tree_map(lambda a: P(parallel.AXIS) if jnp.ndim(a) else P(), tree)

  def local(*args):
    state, sums, bad = chunk(*args)
    return state, sums, bad[None]

  def sharded(state, sums, images, labels, order, key, hparams, start, stop):
    in_specs = (spec(state), spec(sums), P(), P(), spec(order), spec(key), spec(hparams), P(),
                P())
    state, sums, bad = jax.shard_map(
        local, mesh=mesh, in_specs=in_specs, out_specs=(spec(state), spec(sums), P(
            parallel.AXIS)), check_vma=False)(state, sums, images, labels, order, key, hparams,
                                              start, stop)
    return state, sums, first_bad_step(bad)

  return sharded
