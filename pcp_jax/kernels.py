"""The kernel interface the DARTS ops compute with, XLA's own set of it (`XLA`), and the
batch-statistics helpers every set shares.

A kernel set computes the ops' convolutions, pools, training-mode batch norms and
partial-channel moves. `XLA`, XLA's own ops, serves GPUs and TPUs and is the reference; the
CPU wing's set (`pcp_jax.cpu.kernels.KERNELS`) computes the same function, up to float
rounding, in a way XLA:CPU runs several times faster. `models.select_kernels` chooses one
from `config.op_impl`.
"""

import dataclasses
from typing import Any, Callable

import flax.linen as nn
from jax import lax
import jax.numpy as jnp
import numpy as np

Dtype = Any

OP_IMPLS = ('auto', 'xla', 'cpu')


@dataclasses.dataclass(frozen=True)
class Kernels:
  """The functions the ops compute with (signatures: the `XLA` set's, below)."""
  name: str
  conv2d: Callable  # (x NHWC, kernel HWIO, stride, padding, dilation, groups) -> NHWC
  normalize: Callable  # training-mode batch norm: (x, epsilon, axis_name) -> (y, mean, var)
  max_pool: Callable  # (x, window, stride, padding) -> y; padding never the maximum
  avg_pool: Callable  # (x, window, stride, padding) -> y; padding not counted
  # (x, indices (edges, n), traced or a static numpy array) -> the edges' n channels,
  # concatenated
  take_channels: Callable
  put_channels: Callable  # (x, y, perm) -> x with its channels perm[:n] replaced by y's n
  # Whether a network runs its repeated layers as one loop (smaller programs, faster
  # compiles) rather than written out: XLA:CPU runs such loops over search cells slower.
  loops: bool = True


def compute_dtype(dtype: Dtype):
  """The float type of losses, normalisation statistics and augmentation for a model that
  computes in `dtype`: float32, or float64 for a float64 model (reference runs under
  `jax.enable_x64`); never narrower than float32."""
  return jnp.promote_types(dtype, jnp.float32)


def upcast(x):
  """`x` in `compute_dtype(x.dtype)`: bfloat16 and float16 to float32, float64 kept."""
  return x.astype(compute_dtype(x.dtype))


def count_over(x, axis_name):
  """Values per channel over the batch (and the devices of `axis_name`)."""
  return np.prod(x.shape[:-1]) * (1 if axis_name is None else lax.psum(1, axis_name))


def mean_over(x, axis_name):
  """The per-channel mean over the batch (and the devices of `axis_name`)."""
  mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
  return mean if axis_name is None else lax.pmean(mean, axis_name)


def normalize_batch(x, epsilon: float, axis_name):
  """((x - mean) / sqrt(var + epsilon), mean, var) with the batch's mean and biased variance."""
  mean = mean_over(x, axis_name)
  centred = x - mean
  var = mean_over(centred * centred, axis_name)
  return centred * lax.rsqrt(var + epsilon), mean, var


def _conv2d(x, kernel, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1):
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups)


def _max_pool(x, window: int, stride: int, padding: int):
  return nn.max_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)))


def _avg_pool(x, window: int, stride: int, padding: int):
  return nn.avg_pool(x, (window, window), strides=(stride, stride),
                     padding=((padding, padding), (padding, padding)), count_include_pad=False)


def _take_channels(x, indices):
  if isinstance(indices, np.ndarray):  # static (the reference's first C/K channels): slices
    return jnp.concatenate([_static_channels(x, row) for row in indices], axis=-1)
  return jnp.take(x, indices.reshape(-1), axis=-1)


def _static_channels(x, row):
  if np.array_equal(row, np.arange(row[0], row[0] + len(row))):
    return x[..., row[0]:row[0] + len(row)]
  return jnp.take(x, row, axis=-1)


def _put_channels(x, y, perm):
  merged = jnp.concatenate([y, jnp.take(x, perm[y.shape[-1]:], axis=-1)], axis=-1)
  return jnp.take(merged, jnp.argsort(perm), axis=-1)


XLA = Kernels('xla', _conv2d, normalize_batch, _max_pool, _avg_pool, _take_channels,
              _put_channels)
