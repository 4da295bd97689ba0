"""The PC-DARTS / P-DARTS search supernet (Flax Linen, pure functional).

Variable collections: `'params'` (network weights), `'arch'` (alphas_normal,
alphas_reduce and, with edge normalisation, betas_normal, betas_reduce),
`'batch_stats'` (BN statistics). Rng streams: `'channels'` (partial-channel
sampling in `random` mode) and `'dropout'` (skip-connect dropout).
"""

from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax import genotypes
from pcp_jax import ops

CHANNEL_MODES = ('random', 'shuffle')


def edge_ops(switches) -> Tuple[Tuple[str, ...], ...]:
  """The op names still on at each of the 14 edges, in PRIMITIVES order."""
  switches = genotypes.check_switches(switches)
  return tuple(tuple(p for p, on in zip(genotypes.PRIMITIVES, row) if on) for row in switches)


def node_softmax(betas):
  """Edge-normalisation weights: softmax of the betas within each node's incoming edges."""
  out, start = [], 0
  for i in range(genotypes.STEPS):
    out.append(jax.nn.softmax(betas[start:start + 2 + i]))
    start += 2 + i
  return jnp.concatenate(out)


class PartialChannelMixedOp(nn.Module):
  """A weighted sum of candidate ops applied to 1/K of the channels of one edge.

  `random` mode takes the first C/K channels of a random permutation (a fixed-size
  gather, so shapes stay static) and puts the result back at the same positions;
  `shuffle` mode takes the first C/K channels and applies the reference channel
  shuffle. Bypassed channels are kept (max-pooled 2x2 on stride-2 edges).
  """
  op_names: Tuple[str, ...]
  stride: int
  partial_k: int = 4
  channel_mode: str = 'random'
  train: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  op_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, weights, perm=None, skip_keep_mask=None, skip_keep_prob=None):
    """perm: this edge's channel permutation (`random` mode); skip_keep_mask/prob: dropout."""
    c = x.shape[-1]
    c_part = c // self.partial_k
    # Under op_impl 'cpu' the sampled channels move by products with one-hot matrices:
    # XLA:CPU runs those several times faster than gathers and their scatter gradients.
    one_hot_moves = ops.resolve_op_impl(self.op_impl) == 'cpu'
    if self.partial_k == 1:
      x_part = x
    elif self.channel_mode == 'shuffle':
      x_part = x[..., :c_part]
    elif one_hot_moves:
      chosen = jax.nn.one_hot(perm[:c_part], c, dtype=x.dtype)  # (c_part, c)
      x_part = ops.channel_matmul(x, chosen.T)
    else:
      x_part = jnp.take(x, perm[:c_part], axis=-1)

    out = None
    for name, w in zip(self.op_names, weights):
      if name == 'none':
        continue  # contributes exactly zero
      op = ops.make_op(name, c_part, self.stride, affine=False,
                       bn_axis_name=self.bn_axis_name, dtype=self.dtype, module_name=name,
                       op_impl=self.op_impl)
      y = ops.apply_op(name, op, x_part, self.stride, self.train)
      if name == 'skip_connect' and self.stride == 1 and skip_keep_mask is not None:
        y = jnp.where(skip_keep_mask, y / skip_keep_prob, 0).astype(y.dtype)
      y = w.astype(y.dtype) * y
      out = y if out is None else out + y
    if out is None:
      out = ops.zeros_like_strided(x_part, self.stride)

    if self.partial_k == 1:
      return out
    bypass = x if self.stride == 1 else ops.max_pool_2x2(x, self.op_impl)
    if self.channel_mode == 'shuffle':
      merged = jnp.concatenate([out, bypass[..., c_part:]], axis=-1)
      return ops.channel_shuffle(merged, self.partial_k)
    if one_hot_moves:
      return bypass * (1 - jnp.sum(chosen, axis=0)) + ops.channel_matmul(out, chosen)
    merged = jnp.concatenate([out, jnp.take(bypass, perm[c_part:], axis=-1)], axis=-1)
    return jnp.take(merged, jnp.argsort(perm), axis=-1)


class SearchCell(nn.Module):
  """A search cell: 2 inputs, 4 nodes, 14 mixed-op edges, output = concat of the nodes."""
  channels: int
  reduction: bool
  reduction_prev: bool
  edge_op_names: Tuple[Tuple[str, ...], ...]
  partial_k: int = 4
  channel_mode: str = 'random'
  train: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  op_impl: str = 'auto'

  @nn.compact
  def __call__(self, s0, s1, weights, edge_weights=None, skip_drop_rate=None):
    common = dict(affine=False, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                  op_impl=self.op_impl)
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(self.channels, **common, name='preprocess0')(s0, self.train)
    else:
      s0 = ops.ReLUConvBN(self.channels, **common, name='preprocess0')(s0, self.train)
    s1 = ops.ReLUConvBN(self.channels, **common, name='preprocess1')(s1, self.train)
    # All of the cell's randomness comes from one draw per stream (not one per edge):
    # each random-number call is a sizeable piece of compiled code.
    perms = masks = keep = None
    if self.partial_k > 1 and self.channel_mode == 'random':
      noise = jax.random.uniform(self.make_rng('channels'), (genotypes.NUM_EDGES, self.channels))
      perms = jnp.argsort(noise, axis=-1)
    if skip_drop_rate is not None and any('skip_connect' in n for n in self.edge_op_names):
      b, h, w, _ = s1.shape
      stride = 2 if self.reduction else 1
      shape = (genotypes.NUM_EDGES, b, -(-h // stride), -(-w // stride),
               self.channels // self.partial_k)
      keep = 1.0 - skip_drop_rate
      masks = jax.random.bernoulli(self.make_rng('dropout'), keep, shape)
    states = [s0, s1]
    edge = 0
    for _ in range(genotypes.STEPS):
      node = None
      for j, h in enumerate(states):
        stride = 2 if self.reduction and j < 2 else 1
        y = PartialChannelMixedOp(
            self.edge_op_names[edge], stride, self.partial_k, self.channel_mode,
            self.train, self.bn_axis_name, self.dtype, self.op_impl,
            name=f'edge{edge}')(
                h, weights[edge], None if perms is None else perms[edge],
                None if masks is None else masks[edge], keep)
        if edge_weights is not None:
          y = edge_weights[edge].astype(y.dtype) * y
        node = y if node is None else node + y
        edge += 1
      states.append(node)
    return jnp.concatenate(states[2:], axis=-1)


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
  op_impl: str = 'auto'  # see ops.OP_IMPLS

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
    ops.resolve_op_impl(self.op_impl)

  @nn.compact
  def __call__(self, x, train: bool = True, skip_drop_rate=None):
    self._check()
    ops_normal = edge_ops(genotypes.all_switches() if self.switches_normal is None
                          else self.switches_normal)
    ops_reduce = edge_ops(genotypes.all_switches() if self.switches_reduce is None
                          else self.switches_reduce)

    def arch_init(shape):
      return lambda: 1e-3 * jax.random.normal(self.make_rng('params'), shape, jnp.float32)

    e = genotypes.NUM_EDGES
    alphas_normal = self.variable('arch', 'alphas_normal', arch_init((e, len(ops_normal[0]))))
    alphas_reduce = self.variable('arch', 'alphas_reduce', arch_init((e, len(ops_reduce[0]))))
    w_normal = jax.nn.softmax(alphas_normal.value, axis=-1)
    w_reduce = jax.nn.softmax(alphas_reduce.value, axis=-1)
    ew_normal = ew_reduce = None
    if self.use_betas:
      betas_normal = self.variable('arch', 'betas_normal', arch_init((e,)))
      betas_reduce = self.variable('arch', 'betas_reduce', arch_init((e,)))
      ew_normal = node_softmax(betas_normal.value)
      ew_reduce = node_softmax(betas_reduce.value)

    x = x.astype(self.dtype)
    c_stem = self.stem_multiplier * self.channels
    x = ops.conv(c_stem, 3, padding=1, dtype=self.dtype, name='stem_conv',
                 op_impl=self.op_impl)(x)
    # The reference search network's stem BN is affine, unlike the cells'.
    x = ops.batch_norm(train, True, self.bn_axis_name, self.dtype, name='stem_bn',
                       op_impl=self.op_impl)(x)
    s0 = s1 = x
    c = self.channels
    reduction_prev = False
    for i in range(self.layers):
      reduction = i in reduction_indices(self.layers)
      if reduction:
        c *= 2
      cell = SearchCell(c, reduction, reduction_prev,
                        ops_reduce if reduction else ops_normal,
                        self.partial_k, self.channel_mode, train, self.bn_axis_name,
                        self.dtype, self.op_impl, name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, w_reduce if reduction else w_normal,
                        ew_reduce if reduction else ew_normal, skip_drop_rate)
      reduction_prev = reduction
    features = jnp.mean(s1, axis=(1, 2)).astype(jnp.float32)
    logits = nn.Dense(self.num_classes, name='classifier')(features)
    return logits, features


def reduction_indices(layers: int) -> Tuple[int, int]:
  return (layers // 3, 2 * layers // 3)


def init_variables(model: SearchNetwork, key, image_shape: Sequence[int], batch: int = 2):
  """Initial variables ({'params', 'arch', 'batch_stats'}) for images of `image_shape` (HWC)."""
  k_params, k_channels, k_dropout = jax.random.split(key, 3)
  x = jnp.zeros((batch,) + tuple(image_shape), jnp.float32)
  return model.init({'params': k_params, 'channels': k_channels, 'dropout': k_dropout},
                    x, train=True)


def count_params(channels: int = 16, layers: int = 8, num_classes: int = 10,
                 partial_k: int = 4, use_betas: bool = True, image_shape=(32, 32, 3)):
  """(weights, arch) parameter counts of the search network with all 8 ops on."""
  model = SearchNetwork(num_classes=num_classes, channels=channels, layers=layers,
                        partial_k=partial_k, use_betas=use_betas)
  shapes = jax.eval_shape(lambda k: init_variables(model, k, image_shape),
                          jax.random.PRNGKey(0))
  def total(tree):
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))
  return total(shapes['params']), total(shapes['arch'])
