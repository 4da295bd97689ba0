"""Heads put on top of a network's pooled features."""

import dataclasses
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn

from pcp_jax import kernels as kernels_lib
from pcp_jax import ops


class Projector(nn.Module):
  """The Barlow Twins projector: [Dense(no bias), BatchNorm, ReLU] per hidden size, then Dense.

  `sizes` lists the hidden sizes followed by the output size D. `bn_axis_name` names the
  data-parallel axis so that BatchNorm uses the statistics of the global batch.
  """
  sizes: Sequence[int]
  bn_axis_name: Optional[str] = None
  dtype: Optional[Any] = None  # None: the features' own
  kernels: kernels_lib.Kernels = dataclasses.field(kw_only=True)  # models.select_kernels

  @nn.compact
  def __call__(self, features, train: bool = True):
    if not self.sizes:
      raise ValueError('Projector.sizes must list at least the output size.')
    norm = functools.partial(ops.BatchNorm, use_running_average=not train,
                             axis_name=self.bn_axis_name, dtype=self.dtype,
                             kernels=self.kernels)
    x = features
    for size in self.sizes[:-1]:
      x = ops.dense(x, size, use_bias=False, dtype=self.dtype)
      x = nn.relu(norm()(x))
    return ops.dense(x, self.sizes[-1], use_bias=False, dtype=self.dtype)
