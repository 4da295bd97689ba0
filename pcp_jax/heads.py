"""Heads put on top of a network's pooled features."""

from typing import Optional, Sequence

import flax.linen as nn

from pcp_jax import ops


class Projector(nn.Module):
  """The Barlow Twins projector: [Dense(no bias), BatchNorm, ReLU] per hidden size, then Dense.

  `sizes` lists the hidden sizes followed by the output size D. `bn_axis_name` names the
  data-parallel axis so that BatchNorm uses the statistics of the global batch.
  """
  sizes: Sequence[int]
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, features, train: bool = True):
    if not self.sizes:
      raise ValueError('Projector.sizes must list at least the output size.')
    x = features
    for size in self.sizes[:-1]:
      x = ops.dense(x, size, use_bias=False)
      x = ops.batch_norm(train, True, self.bn_axis_name, None)(x)
      x = nn.relu(x)
    return ops.dense(x, self.sizes[-1], use_bias=False)
