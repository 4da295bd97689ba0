"""The PC-DARTS / P-DARTS search supernet (Flax Linen, pure functional).

Variable collections: `'params'` (network weights), `'arch'` (alphas_normal,
alphas_reduce and, with edge normalisation, betas_normal, betas_reduce),
`'batch_stats'` (BN statistics). Rng streams: `'channels'` (partial-channel
sampling in `random` mode) and `'dropout'` (skip-connect dropout), one draw each per call;
cell i uses `fold_in(draw, i)`; `'noise'` for the S4 space's `noise` op (`ops.Noise`).

Runs of three or more identical cells (`cell_runs`: normal cells whose two inputs are
normal-cell-shaped outputs, as in the 17-cell stage of a progressive search) are one `nn.scan`
over per-cell weights stacked on a leading axis (module `cells{first}-{last}`), so tracing and
compiling a deep network costs about as much as its distinct cells.
"""

import dataclasses
import functools
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax import genotypes
from pcp_jax import kernels as kernels_lib
from pcp_jax import ops

CHANNEL_MODES = ('random', 'shuffle')


def edge_ops(switches) -> Tuple[Tuple[str, ...], ...]:
  """The op names still on at each of the 14 edges, in `genotypes.OPS` order."""
  switches = genotypes.check_switches(switches, uniform=False)
  return tuple(tuple(p for p, on in zip(genotypes.OPS, row) if on) for row in switches)


def node_softmax(betas):
  """Edge-normalisation weights: softmax of the betas within each node's incoming edges."""
  return jnp.concatenate([jax.nn.softmax(betas[edges]) for edges in genotypes.NODE_EDGES])


class PartialChannelMixedOp(nn.Module):
  """The mixed ops of one or more edges: each a weighted sum of candidate ops applied to 1/K
  of its input's channels, computed together.

  The edges' sampled channels are concatenated and every candidate op runs once over the
  channel blocks of the edges that have it (`ops.make_op(blocks=...)`: per-channel parts as
  they are, 1x1 convolutions grouped), so a cell is a few large ops rather than 14 x ops
  small ones, which XLA traces and compiles faster. Every edge keeps its own weights and
  computes what it would alone.

  `random` mode takes the first C/K channels of a random permutation (a fixed-size
  gather, so shapes stay static) and puts the result back at the same positions;
  `shuffle` mode takes the first C/K channels and applies the reference channel
  shuffle. Bypassed channels are kept (max-pooled 2x2 on stride-2 edges).
  """
  op_names: Tuple[Tuple[str, ...], ...]  # each edge's ops
  stride: int
  partial_k: int
  channel_mode: str
  conv: ops.ModuleDef
  norm: ops.ModuleDef
  kernels: kernels_lib.Kernels  # the pools and the channel moves
  wide: bool = False  # `weights` has a column per op of `genotypes.OPS` (`SearchNetwork`)

  @nn.compact
  def __call__(self, xs, weights, perms=None, skip_keep_masks=None, skip_keep_prob=None):
    """Each edge's output.

    xs: each edge's input (edges reading the same input come together and pass the same
    array); weights: (edges, ops) op weights (ops: each edge's, or all of `genotypes.OPS` when
    `wide`); perms: (edges, C) channel permutations
    (`random` mode); skip_keep_masks: skip-connect dropout masks (B, H', W', C/K) of the
    edges that have skip_connect, in edge order (stride 1 only: on stride-2 edges
    skip_connect is a FactorizedReduce, which dropout leaves alone).
    """
    n, c = len(xs), xs[0].shape[-1]
    c_part = c // self.partial_k
    partial, random = self.partial_k > 1, self.channel_mode == 'random'
    runs = []  # (input, its edges)
    for e, x in enumerate(xs):
      if runs and runs[-1][0] is x:
        runs[-1][1].append(e)
      else:
        runs.append((x, [e]))
    parts = []
    for x, edges in runs:
      if not partial:
        parts += [x] * len(edges)
      else:  # static indices in `shuffle` mode: the kernel set moves them its own way
        parts.append(self.kernels.take_channels(
            x, perms[np.asarray(edges), :c_part] if random
            else np.tile(np.arange(c_part), (len(edges), 1))))
    x_all = parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)

    def block(y, i):
      return y[..., i * c_part:(i + 1) * c_part]

    out = None
    for name in genotypes.OPS:
      members = [e for e in range(n) if name in self.op_names[e]]
      if not members or name == 'none':
        continue  # `none` contributes exactly zero
      x_in = x_all if len(members) == n else jnp.concatenate(
          [block(x_all, e) for e in members], axis=-1)
      op = ops.make_op(name, len(members) * c_part, self.stride, False, conv=self.conv,
                       norm=self.norm, max_pool=self.kernels.max_pool,
                       avg_pool=self.kernels.avg_pool, module_name=name, blocks=len(members))
      y = ops.apply_op(name, op, x_in, self.stride)
      if name == 'skip_connect' and self.stride == 1 and skip_keep_masks is not None:
        mask = jnp.moveaxis(skip_keep_masks, 0, -2).reshape(y.shape)
        y = jnp.where(mask, y / skip_keep_prob, 0).astype(y.dtype)
      column = [genotypes.OPS.index(name) if self.wide else self.op_names[e].index(name)
                for e in members]
      w = weights[np.asarray(members), np.asarray(column)]
      y = y * jnp.repeat(w, c_part).astype(y.dtype)
      if len(members) < n:
        zeros = jnp.zeros(y.shape[:-1] + (c_part,), y.dtype)
        y = jnp.concatenate([block(y, members.index(e)) if e in members else zeros
                             for e in range(n)], axis=-1)
      out = y if out is None else out + y
    if out is None:
      out = ops.zeros_like_strided(x_all, self.stride)
    if not partial:
      return [block(out, e) for e in range(n)]

    results = []
    for x, edges in runs:
      bypass = x if self.stride == 1 else self.kernels.max_pool(x, 2, 2, 0)
      for e in edges:
        if random:
          results.append(self.kernels.put_channels(bypass, block(out, e), perms[e]))
        else:
          merged = jnp.concatenate([block(out, e), bypass[..., c_part:]], axis=-1)
          results.append(ops.channel_shuffle(merged, self.partial_k))
    return results


# The edges of a cell (`genotypes.EDGES`) by the state they read: edges reading the same
# state, or either input, are computed together; after a group, the next node is complete.
EDGE_GROUPS = tuple(
    tuple(e for i in sources for e, (src, _) in enumerate(genotypes.EDGES) if src == i)
    for sources in [(0, 1)] + [(2 + k,) for k in range(genotypes.STEPS - 1)])
GROUP_NAMES = ('from_inputs',) + tuple(f'from_node{k}' for k in range(genotypes.STEPS - 1))


class SearchCell(nn.Module):
  """A search cell: 2 inputs, 4 nodes, 14 mixed-op edges, output = concat of the nodes."""
  channels: int
  reduction: bool
  reduction_prev: bool
  edge_op_names: Tuple[Tuple[str, ...], ...]
  partial_k: int
  channel_mode: str
  conv: ops.ModuleDef
  norm: ops.ModuleDef
  kernels: kernels_lib.Kernels  # the mixed ops' pools and channel moves
  wide: bool = False  # `weights` has a column per op of `genotypes.OPS`

  @nn.compact
  def __call__(self, s0, s1, weights, edge_weights=None, skip_drop_rate=None,
               channel_key=None, dropout_key=None):
    """The cell's output; `channel_key` draws the partial channels (`random` mode),
    `dropout_key` the skip-connect dropout masks (with `skip_drop_rate`)."""
    layers = dict(affine=False, conv=self.conv, norm=self.norm)
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(self.channels, **layers, name='preprocess0')(s0)
    else:
      s0 = ops.ReLUConvBN(self.channels, **layers, name='preprocess0')(s0)
    s1 = ops.ReLUConvBN(self.channels, **layers, name='preprocess1')(s1)
    # All of the cell's randomness comes from one draw per stream (not one per edge):
    # each random-number call is a sizeable piece of compiled code.
    perms = masks = keep = None
    if self.partial_k > 1 and self.channel_mode == 'random':
      noise = jax.random.uniform(channel_key, (genotypes.NUM_EDGES, self.channels))
      perms = jnp.argsort(noise, axis=-1)
    # Skip-connect dropout acts on identities: the stride-1 edges that have skip_connect.
    # Masks are drawn for every stride-1 edge, so that an edge's mask does not depend on which
    # other edges still have skip_connect (a population member equals its solo run).
    def stride_of(e):
      return 2 if self.reduction and genotypes.EDGES[e][0] < 2 else 1
    stride1 = [e for e in range(genotypes.NUM_EDGES) if stride_of(e) == 1]
    dropped = [e for e in stride1 if 'skip_connect' in self.edge_op_names[e]]
    if skip_drop_rate is not None and dropped:
      b, h, w, _ = s1.shape
      stride = 2 if self.reduction else 1  # every identity's output has the cell's size
      shape = (len(stride1), b, -(-h // stride), -(-w // stride),
               self.channels // self.partial_k)
      keep = 1.0 - skip_drop_rate
      masks = jax.random.bernoulli(dropout_key, keep, shape)
    states = [s0, s1]
    nodes = [None] * genotypes.STEPS
    for group, name in zip(EDGE_GROUPS, GROUP_NAMES):
      index = np.asarray(group)
      stride = stride_of(group[0])
      rows = [stride1.index(e) for e in group if e in dropped]
      outs = PartialChannelMixedOp(
          tuple(self.edge_op_names[e] for e in group), stride, self.partial_k,
          self.channel_mode, self.conv, self.norm, self.kernels, self.wide, name=name)(
              [states[genotypes.EDGES[e][0]] for e in group], weights[index],
              None if perms is None else perms[index],
              None if masks is None or not rows else masks[np.asarray(rows)], keep)
      for e, y in zip(group, outs):
        if edge_weights is not None:
          y = edge_weights[e].astype(y.dtype) * y
        j = genotypes.EDGES[e][1]
        nodes[j] = y if nodes[j] is None else nodes[j] + y
      states.append(nodes[len(states) - 2])
    return jnp.concatenate(states[2:], axis=-1)


def cell_runs(layers: int) -> Tuple[Tuple[int, ...], ...]:
  """The network's cells in order, grouped into runs of identical ones: a normal cell at
  index >= 2 whose previous cell is no reduction reads two normal-cell-shaped outputs, so
  consecutive such cells have the same shapes and differ only in their weights."""
  reductions = genotypes.reduction_indices(layers)

  def repeatable(i):
    return i >= 2 and i not in reductions and i - 1 not in reductions

  runs = []
  for i in range(layers):
    if runs and repeatable(i) and repeatable(runs[-1][-1]):
      runs[-1].append(i)
    else:
      runs.append([i])
  return tuple(tuple(run) for run in runs)


# A loop over two cells compiles slower than the two cells written out; from three on it pays.
MIN_SCANNED_RUN = 3


def cell_modules(layers: int, scan_cells: bool = True) -> Tuple[Tuple[int, ...], ...]:
  """The cells of each cell module in order: a run of `MIN_SCANNED_RUN` or more identical
  cells is one scanned module (`cells{a}-{b}`), every other cell its own (`cell{i}`)."""
  modules = []
  for run in cell_runs(layers):
    if scan_cells and len(run) >= MIN_SCANNED_RUN:
      modules.append(run)
    else:
      modules.extend((i,) for i in run)
  return tuple(modules)


def module_name(cells) -> str:
  """The variable name of the module of `cells` (one of `cell_modules`)."""
  return f'cell{cells[0]}' if len(cells) == 1 else f'cells{cells[0]}-{cells[-1]}'


def _cell_step(cell, carry, index, weights, edge_weights, skip_drop_rate, channel_key,
               dropout_key):
  """Cell `index` on the carried (s0, s1): returns (s1, its output)."""
  s0, s1 = carry
  keys = [None if k is None else jax.random.fold_in(k, index)
          for k in (channel_key, dropout_key)]
  return (s1, cell(s0, s1, weights, edge_weights, skip_drop_rate, *keys)), None


# A run of identical cells as one loop: weights, BN statistics (and captured intermediates)
# stacked over the run, the cell index scanned over, the rest broadcast.
_ScannedCells = nn.scan(
    _cell_step, variable_axes={'params': 0, 'batch_stats': 0, 'intermediates': 0},
    split_rngs={'params': True, 'noise': True}, in_axes=(0,) + (nn.broadcast,) * 5)


def stack_cells(collection, layers: int):
  """A variable collection of the network with `scan_cells=False` (modules `cell{i}`) as the
  scanned network holds it: each run's cells stacked on a leading axis under `cells{a}-{b}`."""
  out = {k: v for k, v in collection.items() if not k.startswith('cell')}
  for cells in cell_modules(layers):
    members = [collection[f'cell{i}'] for i in cells if f'cell{i}' in collection]
    if not members:
      continue
    out[module_name(cells)] = members[0] if len(cells) == 1 else jax.tree_util.tree_map(
        lambda *xs: jnp.stack(xs), *members)
  return out


class SearchNetwork(nn.Module):
  """The search supernet: stem, `layers` cells (reductions at L//3 and 2L//3), classifier.

  `__call__` returns `(logits, features)`, features being the globally pooled
  output of the last cell (the self-supervised projector's input).
  """
  num_classes: int = 10
  channels: int = 16
  layers: int = 8
  partial_k: int = 4
  channel_mode: str = 'random'
  use_betas: bool = True
  switches_normal: Optional[Tuple[Tuple[bool, ...], ...]] = None
  switches_reduce: Optional[Tuple[Tuple[bool, ...], ...]] = None
  stem_multiplier: int = 3
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  scan_cells: bool = True  # False: every cell its own module `cell{i}`, same function
  # A population's supernet (`population`): alphas have a column per op of `genotypes.OPS`
  # and `op_mask` says which a member has on; the switches are the members' union.
  wide_arch: bool = False
  kernels: kernels_lib.Kernels = dataclasses.field(kw_only=True)  # models.select_kernels

  def _check(self):
    if self.channel_mode not in CHANNEL_MODES:
      raise ValueError(
          f'search.channel_mode must be one of {CHANNEL_MODES}, got {self.channel_mode!r}.')
    if self.partial_k < 1 or self.channels % self.partial_k:
      raise ValueError(
          f'search.partial_k must be >= 1 and divide search.channels ({self.channels}), '
          f'got {self.partial_k}.')
    if self.layers < 3:
      raise ValueError(f'search.layers must be >= 3 (two reduction cells), got {self.layers}.')

  @nn.compact
  def __call__(self, x, train: bool = True, skip_drop_rate=None, op_mask=None):
    """`op_mask` (with `wide_arch`): {'normal', 'reduce'} (14, NUM_OPS) booleans, the ops
    on; the others get weight exactly 0, as if absent."""
    self._check()
    ops_normal = edge_ops(genotypes.all_switches() if self.switches_normal is None
                          else self.switches_normal)
    ops_reduce = edge_ops(genotypes.all_switches() if self.switches_reduce is None
                          else self.switches_reduce)

    def arch_init(shape):
      return lambda: 1e-3 * jax.random.normal(self.make_rng('params'), shape, jnp.float32)

    e = genotypes.NUM_EDGES
    width = {c: genotypes.NUM_OPS if self.wide_arch else len(o[0])
             for c, o in (('normal', ops_normal), ('reduce', ops_reduce))}
    alphas_normal = self.variable('arch', 'alphas_normal', arch_init((e, width['normal'])))
    alphas_reduce = self.variable('arch', 'alphas_reduce', arch_init((e, width['reduce'])))

    def op_weights(alphas, cell):
      if not self.wide_arch:
        return jax.nn.softmax(alphas, axis=-1)
      return jax.nn.softmax(jnp.where(op_mask[cell], alphas, -jnp.inf), axis=-1)

    w_normal = op_weights(alphas_normal.value, 'normal')
    w_reduce = op_weights(alphas_reduce.value, 'reduce')
    ew_normal = ew_reduce = None
    if self.use_betas:
      betas_normal = self.variable('arch', 'betas_normal', arch_init((e,)))
      betas_reduce = self.variable('arch', 'betas_reduce', arch_init((e,)))
      ew_normal = node_softmax(betas_normal.value)
      ew_reduce = node_softmax(betas_reduce.value)

    conv = functools.partial(ops.Conv, dtype=self.dtype, kernels=self.kernels)
    norm = functools.partial(ops.BatchNorm, use_running_average=not train,
                             axis_name=self.bn_axis_name, dtype=self.dtype,
                             kernels=self.kernels)
    x = x.astype(self.dtype)
    x = conv(self.stem_multiplier * self.channels, 3, padding=1, name='stem_conv')(x)
    # The reference search network's stem BN is affine, unlike the cells'.
    x = norm(name='stem_bn')(x)
    random_channels = self.partial_k > 1 and self.channel_mode == 'random'
    channel_key = self.make_rng('channels') if random_channels else None
    has_skip = any('skip_connect' in names for names in ops_normal + ops_reduce)
    dropout_key = (self.make_rng('dropout') if skip_drop_rate is not None and has_skip
                   else None)

    reductions = genotypes.reduction_indices(self.layers)
    s0 = s1 = x
    c = self.channels
    for cells in cell_modules(self.layers, self.scan_cells):
      i = cells[0]
      reduction = i in reductions
      if reduction:
        c *= 2
      cell = SearchCell(c, reduction, i - 1 in reductions,
                        ops_reduce if reduction else ops_normal, self.partial_k,
                        self.channel_mode, conv, norm, self.kernels, self.wide_arch,
                        name=module_name(cells))
      args = (w_reduce if reduction else w_normal, ew_reduce if reduction else ew_normal,
              skip_drop_rate)
      index = i if len(cells) == 1 else jnp.arange(i, cells[-1] + 1)
      step = _cell_step if len(cells) == 1 else _ScannedCells
      s0, s1 = step(cell, (s0, s1), index, *args, channel_key, dropout_key)[0]
    features = kernels_lib.upcast(jnp.mean(s1, axis=(1, 2)))
    logits = ops.dense(features, self.num_classes, name='classifier')
    return logits, features


def init_variables(model: SearchNetwork, key, image_shape: Sequence[int], batch: int = 2):
  """Initial variables ({'params', 'arch', 'batch_stats'}) for images of `image_shape` (HWC)."""
  k_params, k_channels, k_dropout = jax.random.split(key, 3)
  x = jnp.zeros((batch,) + tuple(image_shape), jnp.float32)
  op_mask = None
  if model.wide_arch:  # every op of the network on
    op_mask = {c: jnp.asarray(genotypes.check_switches(s, uniform=False)) for c, s in
               (('normal', model.switches_normal), ('reduce', model.switches_reduce))}
  return model.init({'params': k_params, 'channels': k_channels, 'dropout': k_dropout},
                    x, train=True, op_mask=op_mask)


def count_params(channels: int = 16, layers: int = 8, num_classes: int = 10,
                 partial_k: int = 4, use_betas: bool = True, image_shape=(32, 32, 3)):
  """(weights, arch) parameter counts of the search network with the 8 DARTS ops on."""
  # Every kernel set has the same variables.
  model = SearchNetwork(num_classes=num_classes, channels=channels, layers=layers,
                        partial_k=partial_k, use_betas=use_betas, kernels=kernels_lib.XLA)
  shapes = jax.eval_shape(lambda k: init_variables(model, k, image_shape),
                          jax.random.PRNGKey(0))
  def total(tree):
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))
  return total(shapes['params']), total(shapes['arch'])
