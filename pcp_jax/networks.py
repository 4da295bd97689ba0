"""The DARTS evaluation network built from a genotype (affine BN, auxiliary head, drop-path).

Rng stream: `'drop_path'` (only in training, only when a drop-path rate is given).
"""

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax import genotypes
from pcp_jax import ops


class EvalCell(nn.Module):
  """A discrete cell: each node sums two ops on two earlier states."""
  genotype: genotypes.Genotype
  channels: int
  reduction: bool
  reduction_prev: bool
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.XLA

  @nn.compact
  def __call__(self, s0, s1, train: bool = True, drop_path_rate=None):
    common = dict(affine=True, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                  kernels=self.kernels)
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(self.channels, **common, name='preprocess0')(s0, train)
    else:
      s0 = ops.ReLUConvBN(self.channels, **common, name='preprocess0')(s0, train)
    s1 = ops.ReLUConvBN(self.channels, **common, name='preprocess1')(s1, train)
    edges = self.genotype.reduce if self.reduction else self.genotype.normal
    concat = self.genotype.reduce_concat if self.reduction else self.genotype.normal_concat
    states = [s0, s1]
    for node in range(len(edges) // 2):
      total = None
      for k in (2 * node, 2 * node + 1):
        name, j = edges[k]
        stride = 2 if self.reduction and j < 2 else 1
        op = ops.make_op(name, self.channels, stride, affine=True,
                         bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                         module_name=f'edge{k}_{name}', kernels=self.kernels)
        h = ops.apply_op(name, op, states[j], stride, train)
        is_identity = name == 'skip_connect' and stride == 1
        if train and drop_path_rate is not None and not is_identity:
          h = ops.drop_path(self.make_rng('drop_path'), h, drop_path_rate)
        total = h if total is None else total + h
      states.append(total)
    return jnp.concatenate([states[i] for i in concat], axis=-1)


class AuxiliaryHead(nn.Module):
  """The DARTS CIFAR auxiliary classifier (used after the second reduction)."""
  num_classes: int
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.XLA

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(x)
    x = nn.avg_pool(x, (5, 5), strides=(3, 3), padding='VALID')
    x = ops.conv(128, 1, dtype=self.dtype, kernels=self.kernels)(x)
    x = nn.relu(ops.batch_norm(train, True, self.bn_axis_name, self.dtype,
                                kernels=self.kernels)(x))
    # 2x2 on 32-px inputs as in DARTS; 28-px inputs leave a 1x1 map, so the kernel shrinks.
    kernel = min(2, x.shape[1])
    x = ops.conv(768, kernel, dtype=self.dtype, kernels=self.kernels)(x)
    x = nn.relu(ops.batch_norm(train, True, self.bn_axis_name, self.dtype,
                                kernels=self.kernels)(x))
    x = ops.upcast(x.reshape(x.shape[0], -1))
    return ops.dense(x, self.num_classes)


class EvalNetwork(nn.Module):
  """The DARTS evaluation network for CIFAR-sized (28 or 32 px, 1 or 3 channel) inputs.

  Returns `(logits, aux_logits)`; `aux_logits` is None unless `auxiliary` and `train`.
  """
  genotype: genotypes.Genotype
  num_classes: int = 10
  channels: int = 36
  layers: int = 20
  auxiliary: bool = True
  stem_multiplier: int = 3
  bn_axis_name: Optional[str] = None
  dtype: Any = jnp.float32
  kernels: ops.Kernels = ops.XLA  # see ops.select_kernels

  @nn.compact
  def __call__(self, x, train: bool = True, drop_path_rate=None):
    if self.layers < 3:
      raise ValueError(f'train.layers must be >= 3 (two reduction cells), got {self.layers}.')
    x = x.astype(self.dtype)
    x = ops.conv(self.stem_multiplier * self.channels, 3, padding=1, dtype=self.dtype,
                 name='stem_conv', kernels=self.kernels)(x)
    x = ops.batch_norm(train, True, self.bn_axis_name, self.dtype, name='stem_bn',
                       kernels=self.kernels)(x)
    s0 = s1 = x
    c = self.channels
    reductions = genotypes.reduction_indices(self.layers)
    reduction_prev = False
    aux_logits = None
    for i in range(self.layers):
      reduction = i in reductions
      if reduction:
        c *= 2
      cell = EvalCell(self.genotype, c, reduction, reduction_prev, self.bn_axis_name,
                      self.dtype, self.kernels, name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, train, drop_path_rate)
      reduction_prev = reduction
      if i == reductions[1] and self.auxiliary and (train or self.is_initializing()):
        aux_logits = AuxiliaryHead(self.num_classes, self.bn_axis_name, self.dtype,
                                   self.kernels, name='auxiliary_head')(s1, train)
    features = ops.upcast(jnp.mean(s1, axis=(1, 2)))
    logits = ops.dense(features, self.num_classes, name='classifier')
    return logits, (aux_logits if train else None)


def init_variables(model: EvalNetwork, key, image_shape: Sequence[int], batch: int = 2):
  """Initial variables ({'params', 'batch_stats'}) for images of `image_shape` (HWC)."""
  k_params, k_drop = jax.random.split(key)
  x = jnp.zeros((batch,) + tuple(image_shape), jnp.float32)
  return model.init({'params': k_params, 'drop_path': k_drop}, x, train=True)


def count_params(genotype, channels: int = 36, layers: int = 20, num_classes: int = 10,
                 auxiliary: bool = False, image_shape=(32, 32, 3)) -> int:
  """Parameter count as papers report it: no BN statistics; the auxiliary head only if asked."""
  model = EvalNetwork(genotype, num_classes=num_classes, channels=channels, layers=layers,
                      auxiliary=True)
  shapes = jax.eval_shape(lambda k: init_variables(model, k, image_shape),
                          jax.random.PRNGKey(0))
  params = dict(shapes['params'])
  if not auxiliary:
    params.pop('auxiliary_head', None)
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
