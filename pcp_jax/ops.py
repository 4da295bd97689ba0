"""The DARTS operations in NHWC, in a search flavour and an evaluation flavour.

Search flavour (`affine=False`): batch norms without scale/bias, and every pool in
a mixed op is followed by such a batch norm. Evaluation flavour (`affine=True`):
affine batch norms, no batch norm after pools. Padding is explicit so strided
ops see exactly the pixels PyTorch's symmetric padding gives them.

`op_impl` picks how convolutions and pools are computed. Every choice has the same
variables (each convolution keeps an `nn.Conv`-shaped kernel under the name Flax would
give that `nn.Conv`, so checkpoints are interchangeable) and computes the same function
up to float rounding:
  'xla': XLA's own ops (`conv_general_dilated`, `reduce_window`), best on GPU and TPU;
  'cpu': formulations XLA:CPU runs several times faster at DARTS sizes: depthwise
    convolutions as sums of shifted slices times per-channel weights (hand-written
    gradient, its kernel part by FFTs), 1x1 convolutions (grouped too) as 2-D matrix
    products, other dense convolutions (the stems) as one product of stacked shifted
    windows (im2col), pools as maxima or sums over slices, training-mode batch norm with a
    hand-written gradient.
    A max pool's gradient goes to the first maximum of each window, as under 'xla';
  'auto': 'cpu' on a CPU backend, 'xla' otherwise, decided when traced.
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

Dtype = Any

OP_IMPLS = ('auto', 'xla', 'cpu')


def resolve_op_impl(impl: str) -> str:
  """'xla' or 'cpu' for an `op_impl` setting (see the module docstring)."""
  if impl not in OP_IMPLS:
    raise ValueError(f'op_impl must be one of {OP_IMPLS}, got {impl!r} (config.op_impl).')
  if impl == 'auto':
    return 'cpu' if jax.default_backend() == 'cpu' else 'xla'
  return impl


def compute_dtype(dtype: Dtype):
  """The float type of losses, normalisation statistics and augmentation for a model that
  computes in `dtype`: float32, or float64 for a float64 model (reference runs under
  `jax.enable_x64`); never narrower than float32."""
  return jnp.promote_types(dtype, jnp.float32)


def upcast(x):
  """`x` in `compute_dtype(x.dtype)`: bfloat16 and float16 to float32, float64 kept."""
  return x.astype(compute_dtype(x.dtype))


def batch_norm(train: bool, affine: bool, axis_name: Optional[str], dtype: Dtype,
               name: Optional[str] = None, op_impl: str = 'auto') -> 'BatchNorm':
  # PyTorch momentum 0.1 is Flax momentum 0.9.
  return BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                   use_scale=affine, use_bias=affine, axis_name=axis_name,
                   dtype=dtype, name=name, op_impl=op_impl)


class BatchNorm(nn.BatchNorm):
  """`nn.BatchNorm` (same variables and names) whose running variance is updated with the
  unbiased batch variance (n / (n - 1), n the global batch's count per channel), as PyTorch
  does, so eval-mode statistics agree with the reference code. In training under op_impl
  'cpu' the normalisation has a hand-written gradient, which XLA:CPU runs and compiles faster.
  """
  op_impl: str = 'auto'

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
    normalize = (_normalize_train if resolve_op_impl(self.op_impl) == 'cpu'
                 else _normalize_train_autodiff)
    y, mean, var = normalize(upcast(x), self.epsilon, axis_name)
    if not self.is_initializing():
      count = _count_over(x, axis_name)
      unbiased = var * (count / jnp.maximum(count - 1, 1))
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * unbiased
    if self.use_scale:
      y = y * self.param('scale', self.scale_init, features, self.param_dtype)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, features, self.param_dtype)
    return y.astype(self.dtype or x.dtype)


def _count_over(x, axis_name):
  """Values per channel over the batch (and the devices of `axis_name`)."""
  return np.prod(x.shape[:-1]) * (1 if axis_name is None else lax.psum(1, axis_name))


def _mean_over(x, axis_name):
  mean = jnp.mean(x, axis=tuple(range(x.ndim - 1)))
  return mean if axis_name is None else lax.pmean(mean, axis_name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _normalize_train(x, epsilon: float, axis_name):
  """(x - mean) / sqrt(var + epsilon) with the batch's mean and (biased) variance."""
  return _normalize_train_fwd(x, epsilon, axis_name)[0]


def _normalize_train_fwd(x, epsilon, axis_name):
  mean = _mean_over(x, axis_name)
  centred = x - mean
  var = _mean_over(centred * centred, axis_name)
  inv_std = lax.rsqrt(var + epsilon)
  return (centred * inv_std, mean, var), (centred, inv_std, _count_over(x, axis_name))


def _normalize_train_autodiff(x, epsilon, axis_name):
  """`_normalize_train` differentiated by JAX (op_impl 'xla')."""
  return _normalize_train_fwd(x, epsilon, axis_name)[0]


def _normalize_train_bwd(epsilon, axis_name, residuals, cotangents):
  centred, inv_std, count = residuals
  g_y, g_mean, g_var = cotangents
  x_hat = centred * inv_std
  g_x = inv_std * (g_y - _mean_over(g_y, axis_name)
                   - x_hat * _mean_over(g_y * x_hat, axis_name))
  return (g_x + (g_mean + 2 * g_var * centred) / count,)


_normalize_train.defvjp(_normalize_train_fwd, _normalize_train_bwd)


def _out_size(size: int, kernel: int, stride: int, padding: int, dilation: int = 1) -> int:
  return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _out_hw(x, kernel: int, stride: int, padding: int, dilation: int = 1):
  """(height, width) of a k x k window op's output on the NHWC `x`."""
  return tuple(_out_size(n, kernel, stride, padding, dilation) for n in x.shape[1:3])


def _pad_hw(x, padding: int, value=0.0):
  return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                 constant_values=value)


def _window(x, top: int, left: int, stride: int, out_hw):
  """x[:, top::stride, left::stride, :] cut to `out_hw` pixels."""
  b, _, _, c = x.shape
  h_out, w_out = out_hw
  return lax.slice(x, (0, top, left, 0),
                   (b, top + (h_out - 1) * stride + 1, left + (w_out - 1) * stride + 1, c),
                   (1, stride, stride, 1))


def _weighted_windows(x_padded, kernel, stride: int, dilation: int, out_hw, flip=False):
  """sum over taps (i, j) of kernel[i, j, 0] times the (i, j) window of `x_padded`."""
  k = kernel.shape[0]
  out = None
  for i in range(k):
    for j in range(k):
      ti, tj = (k - 1 - i, k - 1 - j) if flip else (i, j)
      term = _window(x_padded, ti * dilation, tj * dilation, stride, out_hw) * kernel[i, j, 0]
      out = term if out is None else out + term
  return out


# Depthwise convolution as shifted slices, with a hand-written gradient. Left to autodiff,
# XLA fuses each of the k*k transposed slices (pads) with the whole forward sum and
# recomputes it per tap; the barriers make it read materialised arrays instead.
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _depthwise_slices(x, kernel, stride: int, padding: int, dilation: int):
  return _depthwise_slices_fwd(x, kernel, stride, padding, dilation)[0]


def _depthwise_slices_fwd(x, kernel, stride, padding, dilation):
  k = kernel.shape[0]
  x_padded = lax.optimization_barrier(_pad_hw(x, padding))
  out_hw = _out_hw(x, k, stride, padding, dilation)
  out = _weighted_windows(x_padded, kernel, stride, dilation, out_hw)
  return out, (x, kernel)


def _fft_length(size: int, size_out: int, k: int, stride: int, padding: int,
                dilation: int) -> int:
  """The shortest FFT length (a product of 2s, 3s and 5s, which FFTs do fast) over which
  the circular correlation of an axis of x (zero-extended) with its output gradient (on the
  input grid) equals, at every kernel tap, the convolution's linear one."""
  last_out = (size_out - 1) * stride  # the gradient spans input positions 0..last_out
  # Tap a reads x at t + a - padding for gradient position t: no index may wrap past the
  # end onto x, nor below 0 onto x either.
  n = max(last_out + (k - 1) * dilation - padding + 1, size + padding, last_out + 1)
  while not _smooth(n):
    n += 1
  return n


def _smooth(n: int) -> bool:
  for f in (2, 3, 5):
    while n % f == 0:
      n //= f
  return n == 1


def _depthwise_kernel_grad(x, g, k: int, stride: int, padding: int, dilation: int):
  """The (k, k, 1, C) kernel gradient of a depthwise conv of the (unpadded) `x` given the
  output gradient `g`, by FFTs.

  kernel[i, j, c] = sum over n, h, w of x_padded[n, h*s + i*d, w*s + j*d, c] g[n, h, w, c]:
  per channel, the cross-correlation of x with g (spread to the input grid, zeros between
  strided pixels) at the k*k tap offsets, summed over the batch. Its spectrum is the batch
  sum of X * conj(G); one inverse FFT per channel gives every offset. Under XLA:CPU this beats
  both a product batched over kernel rows and XLA's own kernel-gradient convolution (a dense
  C x C one; docs/performance.md has the numbers). The transform of x is the same for every
  op reading x at these sizes: XLA computes it once for them all.
  """
  _, h, w, _ = x.shape
  h_out, w_out = g.shape[1:3]
  lengths = [_fft_length(n_in, n_out, k, stride, padding, dilation)
             for n_in, n_out in ((h, h_out), (w, w_out))]
  x_t = jnp.transpose(x.astype(jnp.float32), (0, 3, 1, 2))  # (N, C, H, W)
  x_t = jnp.pad(x_t, ((0, 0), (0, 0), (0, lengths[0] - h), (0, lengths[1] - w)))
  g_t = jnp.transpose(g.astype(jnp.float32), (0, 3, 1, 2))
  spread = [(0, 0, 0), (0, 0, 0)] + [(0, length - (n_out - 1) * stride - 1, stride - 1)
                                     for length, n_out in zip(lengths, (h_out, w_out))]
  g_t = lax.pad(g_t, jnp.zeros((), jnp.float32), spread)
  spectrum = jnp.sum(jnp.fft.rfft2(x_t) * jnp.conj(jnp.fft.rfft2(g_t)), axis=0)
  corr = jnp.fft.irfft2(spectrum, s=lengths)  # (C, L_h, L_w): corr[c, m, m'] at offset m
  rows, cols = [(np.arange(k) * dilation - padding) % length for length in lengths]
  taps = corr[:, rows[:, None], cols[None, :]]  # (C, k, k)
  return jnp.transpose(taps, (1, 2, 0))[:, :, None, :]


def _depthwise_slices_bwd(stride, padding, dilation, residuals, g):
  x, kernel = residuals
  k = kernel.shape[0]
  h, w = x.shape[1:3]
  h_out, w_out = g.shape[1:3]
  g_kernel = _depthwise_kernel_grad(x, g, k, stride, padding, dilation).astype(kernel.dtype)
  # The input gradient is a stride-1 correlation of g (strides turned into zeros between
  # its pixels, then padded) with the flipped kernel, cut to the unpadded input.
  edge = dilation * (k - 1)
  config = [(0, 0, 0), (0, 0, 0), (0, 0, 0), (0, 0, 0)]
  config[1] = (edge - padding, h + padding - (h_out - 1) * stride - 1, stride - 1)
  config[2] = (edge - padding, w + padding - (w_out - 1) * stride - 1, stride - 1)
  g_padded = lax.optimization_barrier(lax.pad(g, jnp.zeros((), g.dtype), config))
  g_x = _weighted_windows(g_padded, kernel, 1, dilation, (h, w), flip=True)
  return g_x, g_kernel


_depthwise_slices.defvjp(_depthwise_slices_fwd, _depthwise_slices_bwd)


def channel_matmul(x, matrix):
  """x @ matrix over the last axis, as one 2-D product (XLA:CPU runs those much faster
  than the same 4-D dot or a 1x1 convolution)."""
  y = x.reshape(-1, x.shape[-1]) @ matrix
  return y.reshape(x.shape[:-1] + (matrix.shape[-1],))


def block_diagonal(matrix, groups: int):
  """The (c_in, c_out) matrix of a grouped 1x1 convolution's (c_in / groups, c_out) kernel."""
  if groups == 1:
    return matrix
  c_in, c_out = matrix.shape[0] * groups, matrix.shape[1]
  blocks = matrix.reshape(matrix.shape[0], groups, c_out // groups)
  dense = jnp.einsum('igo,gh->giho', blocks, jnp.eye(groups, dtype=matrix.dtype))
  return dense.reshape(c_in, c_out)


def conv2d(x, kernel, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1,
           impl: str = 'auto'):
  """NHWC convolution with an HWIO kernel, as `nn.Conv` computes it (see `op_impl`)."""
  k, _, c_in_per_group, c_out = kernel.shape
  c_in = x.shape[-1]
  if resolve_op_impl(impl) == 'cpu':
    if groups == c_in == c_out:  # depthwise
      return _depthwise_slices(x, kernel, stride, padding, dilation)
    if k == 1 and padding == 0:  # pointwise, maybe grouped
      return channel_matmul(x[:, ::stride, ::stride, :], block_diagonal(kernel[0, 0], groups))
    if groups == 1:  # dense (the stems, the auxiliary head's 2x2)
      return _dense_patches(x, kernel, stride, padding, dilation)
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), ((padding, padding), (padding, padding)),
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups)


def _dense_patches(x, kernel, stride: int, padding: int, dilation: int):
  """A dense convolution as one 2-D product of the input's k*k shifted windows (im2col)
  and the kernel. XLA:CPU computes the kernel gradient of a convolution with few input
  channels (a stem's 3) many times slower than the product's (a matrix product too)."""
  k, _, c_in, c_out = kernel.shape
  out_hw = _out_hw(x, k, stride, padding, dilation)
  x_padded = _pad_hw(x, padding)
  patches = jnp.concatenate(
      [_window(x_padded, i * dilation, j * dilation, stride, out_hw)
       for i in range(k) for j in range(k)], axis=-1)  # (N, H', W', k*k*c_in), HWI order
  return channel_matmul(patches, kernel.reshape(k * k * c_in, c_out))


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
  op_impl: str = 'auto'
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (k, k, x.shape[-1] // self.groups, self.features), jnp.float32)
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding,
                  self.dilation, self.groups, self.op_impl)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
         groups: int = 1, dtype: Dtype = jnp.float32, name: Optional[str] = None,
         op_impl: str = 'auto') -> Conv:
  return Conv(features, kernel, stride, padding, dilation, groups, op_impl, dtype, name=name)


class ReLUConvBN(nn.Module):
  """ReLU, conv, BN."""
  features: int
  kernel: int = 1
  stride: int = 1
  padding: int = 0
  affine: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  op_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(x)
    x = conv(self.features, self.kernel, self.stride, self.padding, dtype=self.dtype,
             op_impl=self.op_impl)(x)
    return batch_norm(train, self.affine, self.bn_axis_name, self.dtype,
                      op_impl=self.op_impl)(x)


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
  op_impl: str = 'auto'
  blocks: int = 1  # independent channel blocks (see make_op)

  @nn.compact
  def __call__(self, x, train: bool = True):
    c_in = x.shape[-1]
    x = nn.relu(x)
    x = conv(c_in, self.kernel, self.stride, self.padding, self.dilation, groups=c_in,
             dtype=self.dtype, op_impl=self.op_impl)(x)
    x = conv(self.features, 1, groups=self.blocks, dtype=self.dtype, op_impl=self.op_impl)(x)
    return batch_norm(train, self.affine, self.bn_axis_name, self.dtype,
                      op_impl=self.op_impl)(x)


class SepConv(nn.Module):
  """Two rounds of [ReLU, depthwise kxk, 1x1 conv, BN]; only the first is strided."""
  features: int
  kernel: int
  stride: int
  padding: int
  affine: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  op_impl: str = 'auto'
  blocks: int = 1  # independent channel blocks (see make_op)

  @nn.compact
  def __call__(self, x, train: bool = True):
    c_in = x.shape[-1]
    common = dict(affine=self.affine, bn_axis_name=self.bn_axis_name, dtype=self.dtype,
                  op_impl=self.op_impl, blocks=self.blocks)
    x = DilConv(c_in, self.kernel, self.stride, self.padding, 1, **common)(x, train)
    return DilConv(self.features, self.kernel, 1, self.padding, 1, **common)(x, train)


class FactorizedReduce(nn.Module):
  """ReLU, two 1x1 stride-2 convs (the second on the input shifted by one pixel), BN."""
  features: int
  affine: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32
  op_impl: str = 'auto'
  blocks: int = 1  # independent channel blocks (see make_op)

  @nn.compact
  def __call__(self, x, train: bool = True):
    n = self.blocks
    if self.features % (2 * n):
      raise ValueError(f'FactorizedReduce needs an even channel count per block, got '
                       f'{self.features} channels in {n} block(s).')
    x = nn.relu(x)
    half = self.features // 2
    common = dict(stride=2, groups=n, dtype=self.dtype, op_impl=self.op_impl)
    a = conv(half, 1, **common)(x)
    b = conv(half, 1, **common)(x[:, 1:, 1:, :])
    # Per block: its half of a, then its half of b.
    x = jnp.concatenate([a.reshape(a.shape[:-1] + (n, half // n)),
                         b.reshape(b.shape[:-1] + (n, half // n))], axis=-1)
    x = x.reshape(a.shape[:-1] + (self.features,))
    return batch_norm(train, self.affine, self.bn_axis_name, self.dtype,
                      op_impl=self.op_impl)(x)


def max_pool_3x3(x, stride: int, impl: str = 'auto'):
  if resolve_op_impl(impl) == 'xla':
    return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))
  return _max_pool_slices(x, 3, stride, 1)


# Max pooling as a maximum over shifted slices. Its gradient goes, like XLA's
# select-and-scatter, to the first maximum of each window in row-major order, so both
# implementations agree even where values tie (e.g. flat image borders).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def _max_pool_slices(x, kernel: int, stride: int, padding: int):
  return _max_pool_slices_fwd(x, kernel, stride, padding)[0]


def _max_pool_slices_fwd(x, kernel, stride, padding):
  _, h, w, _ = x.shape
  x_padded = lax.optimization_barrier(_pad_hw(x, padding, -jnp.inf))
  out_hw = _out_hw(x, kernel, stride, padding)
  out = None
  for i in range(kernel):
    for j in range(kernel):
      window = _window(x_padded, i, j, stride, out_hw)
      out = window if out is None else jnp.maximum(out, window)
  return out, (x_padded, out, (h, w))


def _max_pool_slices_bwd(kernel, stride, padding, residuals, g):
  x_padded, out, (h, w) = residuals
  taps = [(i, j) for i in range(kernel) for j in range(kernel)]
  first = jnp.full(out.shape, len(taps), jnp.int32)
  for t in reversed(range(len(taps))):
    window = _window(x_padded, taps[t][0], taps[t][1], stride, out.shape[1:3])
    first = jnp.where(window == out, t, first)
  # Spread g back through the windows as the depthwise gradient does: strides become
  # holes (tap -1, matching none), then each input pixel gathers from the k*k outputs
  # whose window covers it, keeping those that chose it.
  edge = kernel - 1
  config = [(0, 0, 0), (edge - padding, h + padding - (out.shape[1] - 1) * stride - 1,
                        stride - 1),
            (edge - padding, w + padding - (out.shape[2] - 1) * stride - 1, stride - 1),
            (0, 0, 0)]
  g_spread = lax.optimization_barrier(lax.pad(g, jnp.zeros((), g.dtype), config))
  first_spread = lax.optimization_barrier(lax.pad(first, jnp.int32(-1), config))
  g_x = None
  for t, (i, j) in enumerate(taps):
    top, left = edge - i, edge - j
    chosen = _window(first_spread, top, left, 1, (h, w)) == t
    term = jnp.where(chosen, _window(g_spread, top, left, 1, (h, w)), 0)
    g_x = term if g_x is None else g_x + term
  return (g_x,)


_max_pool_slices.defvjp(_max_pool_slices_fwd, _max_pool_slices_bwd)


def avg_pool_3x3(x, stride: int, impl: str = 'auto'):
  """3x3 average over the pixels inside the image (padding not counted)."""
  if resolve_op_impl(impl) == 'xla':
    return nn.avg_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                       count_include_pad=False)
  _, h, w, c = x.shape
  inside = np.pad(np.ones((h, w), np.float32), 1)
  out_hw = _out_hw(x, 3, stride, 1)
  counts = sum(inside[i:i + (out_hw[0] - 1) * stride + 1:stride,
                      j:j + (out_hw[1] - 1) * stride + 1:stride]
               for i in range(3) for j in range(3))
  sums = _depthwise_slices(x, jnp.ones((3, 3, 1, c), x.dtype), stride, 1, 1)
  return sums * (1.0 / counts)[:, :, None].astype(x.dtype)


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
  op_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.kind == 'max':
      x = max_pool_3x3(x, self.stride, self.op_impl)
    else:
      x = avg_pool_3x3(x, self.stride, self.op_impl)
    if self.bn_after:
      x = batch_norm(train, False, self.bn_axis_name, self.dtype, op_impl=self.op_impl)(x)
    return x


def make_op(name: str, features: int, stride: int, affine: bool,
            bn_axis_name: Optional[str] = None, dtype: Dtype = jnp.float32,
            module_name: Optional[str] = None, op_impl: str = 'auto', blocks: int = 1):
  """One of the PRIMITIVES as a callable `op(x, train)`; `None` for `none` and identity.

  `none` and stride-1 `skip_connect` have no parameters; callers handle them
  directly (zeros cost nothing, identities are free), which is why they map to None.
  `blocks` > 1 applies `blocks` independent copies of the op at once to `blocks` equal
  channel blocks of the input (`features` counts all of them): the search cell's edges
  computed together. Per-channel parts (depthwise convolutions, pools, batch norms without
  affine weights) need nothing for that; 1x1 convolutions become grouped ones.
  """
  common = dict(bn_axis_name=bn_axis_name, dtype=dtype, name=module_name, op_impl=op_impl)
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


def max_pool_2x2(x, impl: str = 'auto'):
  if resolve_op_impl(impl) == 'xla':
    return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')
  return _max_pool_slices(x, 2, 2, 0)


def drop_path(key, x, rate):
  """Per-sample drop path (whole example zeroed with probability `rate`), rescaled."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)
