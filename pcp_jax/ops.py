"""The DARTS operations in NHWC, in a search flavour and an evaluation flavour.

Search flavour (`affine=False`): batch norms without scale/bias, and every pool in
a mixed op is followed by such a batch norm. Evaluation flavour (`affine=True`):
affine batch norms, no batch norm after pools. Padding is explicit so strided
ops see exactly the pixels PyTorch's symmetric padding gives them.

As in Flax's ImageNet ResNet, a network binds its convolution (`conv`: `Conv` with its
kernel set and dtype) and batch norm (`norm`: `BatchNorm` with its kernel set, dtype, device
axis and train mode) once in its `__call__` and hands them, with its kernel set's pools, to
every op: the kernel set is chosen in one place (`models.select_kernels`), and an op that is
not handed one is an error. Every kernel set gives the same variables (each convolution
keeps an `nn.Conv`-shaped kernel under the name Flax would give that `nn.Conv`, so
checkpoints are interchangeable).

Weights start as in the reference code, which keeps PyTorch's defaults: a convolution's or a
linear layer's weight, and a linear layer's bias, uniform in +-1/sqrt(fan_in) (`WEIGHT_INIT`,
`bias_init`; `dense` makes such a linear layer), batch norms at scale 1 and bias 0.
"""

import dataclasses
import math
import zlib
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from pcp_jax import kernels as kernels_lib

Dtype = Any
ModuleDef = Any

# PyTorch's default for nn.Conv2d and nn.Linear weights, kaiming_uniform_(a=sqrt(5)):
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in = k * k * (input channels / groups) of the
# (k, k, in / groups, out) kernel, or the inputs of a (in, out) linear kernel.
WEIGHT_INIT = nn.initializers.variance_scaling(1 / 3, 'fan_in', 'uniform')


def bias_init(fan_in: int) -> Callable:
  """PyTorch's default for an nn.Linear bias: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1 / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dense(x, features: int, use_bias: bool = True, dtype: Optional[Dtype] = None,
          name: Optional[str] = None):
  """`nn.Dense(features)(x)` initialised as PyTorch's nn.Linear (call inside a compact
  method; same variables and names as that `nn.Dense`)."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, kernel_init=WEIGHT_INIT,
                  bias_init=bias_init(x.shape[-1]), name=name)(x)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` (same variables and names) with PyTorch's defaults (its momentum 0.1 is
  Flax's 0.9) whose running variance is updated with the unbiased batch variance
  (n / (n - 1), n the global batch's count per channel), as PyTorch does, so eval-mode
  statistics agree with the reference code. Training mode normalises with
  `kernels.normalize`.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  kernels: kernels_lib.Kernels = dataclasses.field(kw_only=True)

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *, mask=None):
    frozen = nn.merge_param('use_running_average', self.use_running_average,
                            use_running_average)
    if frozen or mask is not None or self.axis not in (-1, x.ndim - 1):
      return super().__call__(x, use_running_average, mask=mask)
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda s: jnp.zeros(s, jnp.float32),
                            features)
    ra_var = self.variable('batch_stats', 'var', lambda s: jnp.ones(s, jnp.float32),
                           features)
    axis_name = None if self.is_initializing() else self.axis_name
    y, mean, var = self.kernels.normalize(kernels_lib.upcast(x), self.epsilon, axis_name)
    if not self.is_initializing():
      count = kernels_lib.count_over(x, axis_name)
      unbiased = var * (count / jnp.maximum(count - 1, 1))
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    if self.use_scale:
      y = y * self.param('scale', self.scale_init, features, self.param_dtype)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, features, self.param_dtype)
    return y.astype(self.dtype or x.dtype)


class Conv(nn.Module):
  """A bias-free square convolution with the variables of the equivalent `nn.Conv`.

  Named `Conv` so that Flax names its instances as it names `nn.Conv`s (`Conv_0`, ...).
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  padding: int = 0
  dilation: int = 1
  groups: int = 1
  dtype: Dtype = jnp.float32
  kernels: kernels_lib.Kernels = dataclasses.field(kw_only=True)

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', WEIGHT_INIT,
                        (k, k, x.shape[-1] // self.groups, self.features), jnp.float32)
    return self.kernels.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                               self.padding, self.dilation, self.groups)


def _norm(norm: ModuleDef, affine: bool):
  """The bound batch norm in a flavour: with scale and bias (affine) or without."""
  return norm(use_scale=affine, use_bias=affine)


class ReLUConvBN(nn.Module):
  """ReLU, conv, BN."""
  features: int
  affine: bool
  conv: ModuleDef
  norm: ModuleDef
  kernel: int = 1
  stride: int = 1
  padding: int = 0

  @nn.compact
  def __call__(self, x):
    x = nn.relu(x)
    x = self.conv(self.features, self.kernel, self.stride, self.padding)(x)
    return _norm(self.norm, self.affine)(x)


class DilConv(nn.Module):
  """ReLU, depthwise kxk (dilated), 1x1 conv, BN."""
  features: int
  kernel: int
  stride: int
  padding: int
  dilation: int
  affine: bool
  conv: ModuleDef
  norm: ModuleDef
  blocks: int = 1  # independent channel blocks (see make_op)

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    x = nn.relu(x)
    x = self.conv(c_in, self.kernel, self.stride, self.padding, self.dilation, groups=c_in)(x)
    x = self.conv(self.features, 1, groups=self.blocks)(x)
    return _norm(self.norm, self.affine)(x)


class SepConv(nn.Module):
  """Two rounds of [ReLU, depthwise kxk, 1x1 conv, BN]; only the first is strided."""
  features: int
  kernel: int
  stride: int
  padding: int
  affine: bool
  conv: ModuleDef
  norm: ModuleDef
  blocks: int = 1  # independent channel blocks (see make_op)

  @nn.compact
  def __call__(self, x):
    c_in = x.shape[-1]
    common = dict(affine=self.affine, conv=self.conv, norm=self.norm, blocks=self.blocks)
    x = DilConv(c_in, self.kernel, self.stride, self.padding, 1, **common)(x)
    return DilConv(self.features, self.kernel, 1, self.padding, 1, **common)(x)


class FactorizedReduce(nn.Module):
  """ReLU, two 1x1 stride-2 convs (the second on the input shifted by one pixel), BN."""
  features: int
  affine: bool
  conv: ModuleDef
  norm: ModuleDef
  blocks: int = 1  # independent channel blocks (see make_op)

  @nn.compact
  def __call__(self, x):
    n = self.blocks
    if self.features % (2 * n):
      raise ValueError(f'FactorizedReduce needs an even channel count per block, got '
                       f'{self.features} channels in {n} block(s).')
    x = nn.relu(x)
    half = self.features // 2
    a = self.conv(half, 1, 2, groups=n)(x)
    b = self.conv(half, 1, 2, groups=n)(x[:, 1:, 1:, :])
    # Per block: its half of a, then its half of b.
    x = jnp.concatenate([a.reshape(a.shape[:-1] + (n, half // n)),
                         b.reshape(b.shape[:-1] + (n, half // n))], axis=-1)
    x = x.reshape(a.shape[:-1] + (self.features,))
    return _norm(self.norm, self.affine)(x)


def zeros_like_strided(x, stride: int):
  b, h, w, c = x.shape
  return jnp.zeros((b, -(-h // stride), -(-w // stride), c), x.dtype)


class Pool(nn.Module):
  """3x3 max or average pool; in the search flavour followed by a BN without affine."""
  pool: Callable  # a kernel set's max_pool or avg_pool
  stride: int
  norm: Optional[ModuleDef]  # the search flavour's BN; None in the evaluation flavour

  @nn.compact
  def __call__(self, x):
    x = self.pool(x, 3, self.stride, 1)
    return x if self.norm is None else _norm(self.norm, False)(x)


class Noise(nn.Module):
  """RobustDARTS's S4 `noise` op: standard normal noise of the (strided) input's shape,
  whatever the input. Drawn from the `'noise'` rng stream when the caller gives one (search
  and training steps); otherwise (evaluation) from a fixed key per op, so evaluations repeat."""
  stride: int

  @nn.compact
  def __call__(self, x):
    if self.has_rng('noise'):
      key = self.make_rng('noise')
    else:
      key = jax.random.fold_in(jax.random.PRNGKey(0), zlib.crc32('/'.join(self.path).encode()))
    return jax.random.normal(key, zeros_like_strided(x, self.stride).shape, x.dtype)


def make_op(name: str, features: int, stride: int, affine: bool, *, conv: ModuleDef,
            norm: ModuleDef, max_pool: Callable, avg_pool: Callable,
            module_name: Optional[str] = None, blocks: int = 1):
  """One of `genotypes.OPS` as a callable `op(x)`; `None` for `none` and identity.

  `none` and stride-1 `skip_connect` have no parameters; callers handle them
  directly (zeros cost nothing, identities are free), which is why they map to None.
  `conv` and `norm` are the network's bound convolution and batch norm, `max_pool` and
  `avg_pool` its kernel set's. `blocks` > 1 applies `blocks` independent copies of the op at
  once to `blocks` equal channel blocks of the input (`features` counts all of them): the
  search cell's edges computed together. Per-channel parts (depthwise convolutions, pools,
  batch norms without affine weights) need nothing for that; 1x1 convolutions become
  grouped ones.
  """
  if name == 'none' or (name == 'skip_connect' and stride == 1):
    return None
  layers = dict(affine=affine, conv=conv, norm=norm, blocks=blocks, name=module_name)
  if name == 'skip_connect':
    return FactorizedReduce(features, **layers)
  if name == 'noise':
    return Noise(stride, name=module_name)
  if name in ('max_pool_3x3', 'avg_pool_3x3'):
    return Pool(max_pool if name == 'max_pool_3x3' else avg_pool, stride,
                None if affine else norm, name=module_name)
  if name == 'sep_conv_3x3':
    return SepConv(features, 3, stride, 1, **layers)
  if name == 'sep_conv_5x5':
    return SepConv(features, 5, stride, 2, **layers)
  if name == 'dil_conv_3x3':
    return DilConv(features, 3, stride, 2, 2, **layers)
  if name == 'dil_conv_5x5':
    return DilConv(features, 5, stride, 4, 2, **layers)
  raise ValueError(f'unknown operation {name!r}.')


def apply_op(name: str, op, x, stride: int):
  """Applies an op built by `make_op` (handling the parameter-free ones)."""
  if name == 'none':
    return zeros_like_strided(x, stride)
  if op is None:  # stride-1 skip_connect
    return x
  return op(x)


def channel_shuffle(x_nhwc, groups: int):
  """ShuffleNet channel shuffle in NHWC: (.., G, C/G) -> (.., C/G, G)."""
  b, h, w, c = x_nhwc.shape
  x = x_nhwc.reshape(b, h, w, groups, c // groups)
  return jnp.swapaxes(x, -1, -2).reshape(b, h, w, c)


def drop_path(key, x, rate):
  """Per-sample drop path (whole example zeroed with probability `rate`), rescaled."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)
