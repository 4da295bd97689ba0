"""How a function of one member runs over a population (pcp_jax/members.py): all at once, in
groups and one after another compute the same, shared arguments stay shared. In float64: a
batched program may sum in another order."""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import members
from pcp_jax import parallel

HParams = collections.namedtuple('HParams', 'factor lr')


def member_fn(state, images, hparams, order, key):
  """A member's step: its own state, order, key and factor; the images and lr shared."""
  noise = jax.random.normal(key, (3,), state['w'].dtype)
  w = state['w'] * hparams.factor + hparams.lr * images[order].sum(0) + noise
  return {'w': w, 'count': state['count'] + 1}, jnp.sum(w)


def population(n=5):
  rng = np.random.default_rng(0)
  state = {'w': jnp.asarray(rng.normal(size=(n, 3)), jnp.float64),
           'count': jnp.zeros((n,), jnp.int32)}
  images = jnp.asarray(rng.normal(size=(6, 3)), jnp.float64)
  hparams = HParams(jnp.arange(n, dtype=jnp.float64), jnp.float64(0.1))
  order = jnp.asarray(np.stack([rng.permutation(6)[:2] for _ in range(n)]))
  keys = jax.random.split(jax.random.key(1), n)
  return state, images, hparams, order, keys


AXES = (0, None, members.per_member_arrays, 0, 0)


def same(a, b):
  np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize('at_once', [1, 2, 3, 5, 8])
@jax.enable_x64()
def test_every_way_computes_each_members_own_result(at_once):
  args = population()
  want = jax.jit(jax.vmap(member_fn, in_axes=(0, None, HParams(0, None), 0, 0)))(*args)
  got = jax.jit(members.mapped(member_fn, (0, None, HParams(0, None), 0, 0), at_once))(*args)
  jax.tree_util.tree_map(same, got, want)
  if at_once == 1:
    turn = members.InTurn(parallel.CompiledOnFirstCall(jax.jit(member_fn)), AXES)
    assert not turn.compiled
    out = turn(*args)
    assert turn.compiled
    jax.tree_util.tree_map(same, out, want)
    # Member 3 alone, as its solo run would call it.
    state, images, hparams, order, keys = args
    solo = jax.jit(member_fn)({k: v[3] for k, v in state.items()}, images,
                              HParams(hparams.factor[3], hparams.lr), order[3], keys[3])
    jax.tree_util.tree_map(lambda a, b: same(a[3], b), out, solo)


@jax.enable_x64()
def test_one_after_another_runs_a_given_program_and_combines():
  args = population(3)
  single = parallel.CompiledOnFirstCall(jax.jit(member_fn))
  turn = members.InTurn(single, AXES, combine=lambda out: (out[0], jnp.max(out[1])))
  program = parallel.compile_lowered(turn.lower(*args))  # one member's program
  state, best = turn(*args, program=program)
  assert not single.compiled  # the given program ran, not `single`
  assert state['w'].shape == (3, 3) and best.shape == ()
  np.testing.assert_array_equal(best, jnp.max(turn(*args)[1]))


def test_the_first_bad_step_of_any_member():
  assert int(members.first_bad_step(jnp.array([-1, 4, 2, -1]))) == 2
  assert int(members.first_bad_step(jnp.array([-1, -1]))) == -1


def test_the_default_is_one_at_a_time_on_a_cpu():
  assert members.resolve(3) == 3
  assert members.resolve(0) == (1 if jax.default_backend() == 'cpu' else 0)
