"""The DARTS evaluation network built from a genotype (affine BN, auxiliary head, drop-path).

Rng streams: `'drop_path'` (only in training, only when a drop-path rate is given) and
`'noise'` (the S4 space's `noise` op, `ops.Noise`).
"""

import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax import genotypes
from pcp_jax import kernels as kernels_lib
from pcp_jax import ops


class EvalCell(nn.Module):
  """A discrete cell: each node sums two ops on two earlier states."""
  genotype: genotypes.Genotype
  channels: int
  reduction: bool
  reduction_prev: bool
  conv: ops.ModuleDef
  norm: ops.ModuleDef
  max_pool: Callable
  avg_pool: Callable

  @nn.compact
  def __call__(self, s0, s1, train: bool = True, drop_path_rate=None):
    layers = dict(affine=True, conv=self.conv, norm=self.norm)
    if self.reduction_prev:
      s0 = ops.FactorizedReduce(self.channels, **layers, name='preprocess0')(s0)
    else:
      s0 = ops.ReLUConvBN(self.channels, **layers, name='preprocess0')(s0)
    s1 = ops.ReLUConvBN(self.channels, **layers, name='preprocess1')(s1)
    edges = self.genotype.reduce if self.reduction else self.genotype.normal
    concat = self.genotype.reduce_concat if self.reduction else self.genotype.normal_concat
    states = [s0, s1]
    for node in range(len(edges) // 2):
      total = None
      for k in (2 * node, 2 * node + 1):
        name, j = edges[k]
        stride = 2 if self.reduction and j < 2 else 1
        op = ops.make_op(name, self.channels, stride, True, conv=self.conv, norm=self.norm,
                         max_pool=self.max_pool, avg_pool=self.avg_pool,
                         module_name=f'edge{k}_{name}')
        h = ops.apply_op(name, op, states[j], stride)
        is_identity = name == 'skip_connect' and stride == 1
        if train and drop_path_rate is not None and not is_identity:
          h = ops.drop_path(self.make_rng('drop_path'), h, drop_path_rate)
        total = h if total is None else total + h
      states.append(total)
    return jnp.concatenate([states[i] for i in concat], axis=-1)


class AuxiliaryHead(nn.Module):
  """The DARTS CIFAR auxiliary classifier (used after the second reduction)."""
  num_classes: int
  conv: ops.ModuleDef
  norm: ops.ModuleDef
  avg_pool: Callable

  @nn.compact
  def __call__(self, x):
    x = nn.relu(x)
    x = self.avg_pool(x, 5, 3, 0)
    x = self.conv(128, 1)(x)
    x = nn.relu(self.norm()(x))
    # 2x2 on 32-px inputs as in DARTS; 28-px inputs leave a 1x1 map, so the kernel shrinks.
    x = self.conv(768, min(2, x.shape[1]))(x)
    x = nn.relu(self.norm()(x))
    x = kernels_lib.upcast(x.reshape(x.shape[0], -1))
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
  kernels: kernels_lib.Kernels = dataclasses.field(kw_only=True)  # models.select_kernels

  @nn.compact
  def __call__(self, x, train: bool = True, drop_path_rate=None):
    if self.layers < 3:
      raise ValueError(f'train.layers must be >= 3 (two reduction cells), got {self.layers}.')
    conv = functools.partial(ops.Conv, dtype=self.dtype, kernels=self.kernels)
    norm = functools.partial(ops.BatchNorm, use_running_average=not train,
                             axis_name=self.bn_axis_name, dtype=self.dtype,
                             kernels=self.kernels)
    x = x.astype(self.dtype)
    x = conv(self.stem_multiplier * self.channels, 3, padding=1, name='stem_conv')(x)
    x = norm(name='stem_bn')(x)
    s0 = s1 = x
    c = self.channels
    reductions = genotypes.reduction_indices(self.layers)
    reduction_prev = False
    aux_logits = None
    for i in range(self.layers):
      reduction = i in reductions
      if reduction:
        c *= 2
      cell = EvalCell(self.genotype, c, reduction, reduction_prev, conv, norm,
                      self.kernels.max_pool, self.kernels.avg_pool, name=f'cell{i}')
      s0, s1 = s1, cell(s0, s1, train, drop_path_rate)
      reduction_prev = reduction
      if i == reductions[1] and self.auxiliary and (train or self.is_initializing()):
        aux_logits = AuxiliaryHead(self.num_classes, conv, norm, self.kernels.avg_pool,
                                   name='auxiliary_head')(s1)
    features = kernels_lib.upcast(jnp.mean(s1, axis=(1, 2)))
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
  # Every kernel set has the same variables.
  model = EvalNetwork(genotype, num_classes=num_classes, channels=channels, layers=layers,
                      auxiliary=True, kernels=kernels_lib.XLA)
  shapes = jax.eval_shape(lambda k: init_variables(model, k, image_shape),
                          jax.random.PRNGKey(0))
  params = dict(shapes['params'])
  if not auxiliary:
    params.pop('auxiliary_head', None)
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(params)))
