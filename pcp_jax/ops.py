"""The DARTS operations in NHWC, in a search flavour and an evaluation flavour, and the kernels
they compute with.

Search flavour (`affine=False`): batch norms without scale/bias, and every pool in
a mixed op is followed by such a batch norm. Evaluation flavour (`affine=True`):
affine batch norms, no batch norm after pools. Padding is explicit so strided
ops see exactly the pixels PyTorch's symmetric padding gives them.

Every op computes its convolutions, pools, training-mode batch norms and partial-channel
moves with the functions of one `Kernels` set, a module field chosen where the model is
built (`select_kernels(config.op_impl)`): `XLA`, XLA's own ops, for GPUs and TPUs, or the CPU
wing's (`pcp_jax.cpu.kernels`), which XLA:CPU runs several times faster. Both have the same
variables (each convolution keeps an `nn.Conv`-shaped kernel under the name Flax would give
that `nn.Conv`, so checkpoints are interchangeable) and compute the same function up to float
rounding.

Weights start as in the reference code, which keeps PyTorch's defaults: a convolution's or a
linear layer's weight, and a linear layer's bias, uniform in +-1/sqrt(fan_in) (`WEIGHT_INIT`,
`bias_init`; `dense` makes such a linear layer), batch norms at scale 1 and bias 0.
"""

import dataclasses
import math
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
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


def select_kernels(op_impl: str) -> Kernels:
  """The kernel set `config.op_impl` names: 'xla', 'cpu', or 'auto' (the CPU wing's on a
  CPU backend, else XLA's)."""
  if op_impl not in OP_IMPLS:
    raise ValueError(f'op_impl must be one of {OP_IMPLS}, got {op_impl!r} (config.op_impl).')
  if op_impl == 'xla' or (op_impl == 'auto' and jax.default_backend() != 'cpu'):
    return XLA
  from pcp_jax.cpu import kernels  # pylint: disable=g-import-not-at-top
  return kernels.KERNELS


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


def dense(x, features: int, use_bias: bool = True, name: Optional[str] = None):
  """`nn.Dense(features)(x)` initialised as PyTorch's nn.Linear (call inside a compact
  method; same variables and names as that `nn.Dense`)."""
  return nn.Dense(features, use_bias=use_bias, kernel_init=WEIGHT_INIT,
                  bias_init=bias_init(x.shape[-1]), name=name)(x)


def batch_norm(train: bool, affine: bool, axis_name: Optional[str], dtype: Dtype,
               name: Optional[str] = None, kernels: Kernels = XLA) -> 'BatchNorm':
  # PyTorch momentum 0.1 is Flax momentum 0.9.
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   use_scale=affine, use_bias=affine, axis_name=axis_name,
                   dtype=dtype, name=name, kernels=kernels)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` (same variables and names) whose running variance is updated with the
  unbiased batch variance (n / (n - 1), n the global batch's count per channel), as PyTorch
  does, so eval-mode statistics agree with the reference code. Training mode normalises with
  `kernels.normalize`.
  """
  kernels: Kernels = XLA

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
    y, mean, var = self.kernels.normalize(upcast(x), self.epsilon, axis_name)
    if not self.is_initializing():
      count = count_over(x, axis_name)
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
  kernels: Kernels = XLA
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', WEIGHT_INIT,
                        (k, k, x.shape[-1] // self.groups, self.features), jnp.float32)
    return self.kernels.conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride,
                               self.padding, self.dilation, self.groups)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
         groups: int = 1, dtype: Dtype = jnp.float32, name: Optional[str] = None,
         kernels: Kernels = XLA) -> Conv:
  return Conv(features, kernel, stride, padding, dilation, groups, kernels, dtype, name=name)


class ReLUConvBN(nn.Module):
  """ReLU, conv, BN."""
  features: int
  kernel: int = 1
  stride: int = 1
  padding: int = 0
  affine: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(x)
    x = conv(self.features, self.kernel, self.stride, self.padding, dtype=self.dtype,
             kernels=self.kernels)(x)
    return batch_norm(train, self.affine, self.bn_axis_name, self.dtype,
                      kernels=self.kernels)(x)


class DilConv(nn.Module):
  """ReLU, depthwise kxk (dilated), 1x1 conv, BN."""
  features: int
  kernel: int
  stride: int
  padding: int
  dilation: int
  affine: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA
  blocks: int = 1  # independent channel blocks (see make_op)

  @nn.compact
  def __call__(self, x, train: bool = True):
    c_in = x.shape[-1]
    x = nn.relu(x)
    x = conv(c_in, self.kernel, self.stride, self.padding, self.dilation, groups=c_in,
             dtype=self.dtype, kernels=self.kernels)(x)
    x = conv(self.features, 1, groups=self.blocks, dtype=self.dtype, kernels=self.kernels)(x)
    return batch_norm(train, self.affine, self.bn_axis_name, self.dtype,
                      kernels=self.kernels)(x)


class SepConv(nn.Module):
  """Two rounds of [ReLU, depthwise kxk, 1x1 conv, BN]; only the first is strided."""
  features: int
  kernel: int
  stride: int
  padding: int
  affine: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA
  blocks: int = 1  # independent channel blocks (see make_op)

  @nn.compact
  def __call__(self, x, train: bool = True):
    c_in = x.shape[-1]
    common = dict(affine=self.affine, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                  kernels=self.kernels, blocks=self.blocks)
    x = DilConv(c_in, self.kernel, self.stride, self.padding, 1, **common)(x, train)
    return DilConv(self.features, self.kernel, 1, self.padding, 1, **common)(x, train)


class FactorizedReduce(nn.Module):
  """ReLU, two 1x1 stride-2 convs (the second on the input shifted by one pixel), BN."""
  features: int
  affine: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA
  blocks: int = 1  # independent channel blocks (see make_op)

  @nn.compact
  def __call__(self, x, train: bool = True):
    n = self.blocks
    if self.features % (2 * n):
      raise ValueError(f'FactorizedReduce needs an even channel count per block, got '
                       f'{self.features} channels in {n} block(s).')
    x = nn.relu(x)
    half = self.features // 2
    common = dict(stride=2, groups=n, dtype=self.dtype, kernels=self.kernels)
    a = conv(half, 1, **common)(x)
    b = conv(half, 1, **common)(x[:, 1:, 1:, :])
    # Per block: its half of a, then its half of b.
    x = jnp.concatenate([a.reshape(a.shape[:-1] + (n, half // n)),
                         b.reshape(b.shape[:-1] + (n, half // n))], axis=-1)
    x = x.reshape(a.shape[:-1] + (self.features,))
    return batch_norm(train, self.affine, self.bn_axis_name, self.dtype,
                      kernels=self.kernels)(x)


def zeros_like_strided(x, stride: int):
  b, h, w, c = x.shape
  return jnp.zeros((b, -(-h // stride), -(-w // stride), c), x.dtype)


class Pool(nn.Module):
  """3x3 max or average pool; in the search flavour followed by a BN without affine."""
  kind: str
  stride: int
  bn_after: bool = False
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  kernels: Kernels = XLA

  @nn.compact
  def __call__(self, x, train: bool = True):
    pool = self.kernels.max_pool if self.kind == 'max' else self.kernels.avg_pool
    x = pool(x, 3, self.stride, 1)
    if self.bn_after:
      x = batch_norm(train, False, self.bn_axis_name, self.dtype, kernels=self.kernels)(x)
    return x


def make_op(name: str, features: int, stride: int, affine: bool,
            bn_axis_name: Optional[str] = None, dtype: Dtype = jnp.float32,
            module_name: Optional[str] = None, kernels: Kernels = XLA, blocks: int = 1):
  """One of the PRIMITIVES as a callable `op(x, train)`; `None` for `none` and identity.

  `none` and stride-1 `skip_connect` have no parameters; callers handle them
  directly (zeros cost nothing, identities are free), which is why they map to None.
  `blocks` > 1 applies `blocks` independent copies of the op at once to `blocks` equal
  channel blocks of the input (`features` counts all of them): the search cell's edges
  computed together. Per-channel parts (depthwise convolutions, pools, batch norms without
  affine weights) need nothing for that; 1x1 convolutions become grouped ones.
  """
  common = dict(bn_axis_name=bn_axis_name, dtype=dtype, name=module_name, kernels=kernels)
  if name in ('none',) or (name == 'skip_connect' and stride == 1):
    return None
  if name == 'skip_connect':
    return FactorizedReduce(features, affine=affine, blocks=blocks, **common)
  if name in ('max_pool_3x3', 'avg_pool_3x3'):
    return Pool(name[:3], stride, bn_after=not affine, **common)
  if name == 'sep_conv_3x3':
    return SepConv(features, 3, stride, 1, affine=affine, blocks=blocks, **common)
  if name == 'sep_conv_5x5':
    return SepConv(features, 5, stride, 2, affine=affine, blocks=blocks, **common)
  if name == 'dil_conv_3x3':
    return DilConv(features, 3, stride, 2, 2, affine=affine, blocks=blocks, **common)
  if name == 'dil_conv_5x5':
    return DilConv(features, 5, stride, 4, 2, affine=affine, blocks=blocks, **common)
  raise ValueError(f'unknown operation {name!r}.')


def apply_op(name: str, op, x, stride: int, train: bool):
  """Applies an op built by `make_op` (handling the parameter-free ones)."""
  if name == 'none':
    return zeros_like_strided(x, stride)
  if op is None:  # stride-1 skip_connect
    return x
  return op(x, train)


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
