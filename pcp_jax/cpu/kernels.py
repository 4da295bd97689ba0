"""XLA:CPU kernels: the DARTS ops' convolutions, pools, batch norm and channel moves written
as XLA:CPU runs them several times faster at DARTS sizes (`KERNELS`, `config.op_impl` 'cpu').

Same variables and, up to float rounding, the same function as `pcp_jax.kernels.XLA`:
  - depthwise convolutions as sums of shifted slices times per-channel weights, with a
    hand-written gradient whose kernel part comes from FFTs and whose input part is computed
    per stride phase;
  - 1x1 convolutions (grouped too) as 2-D matrix products; other dense convolutions (the
    stems, the auxiliary head) as one product of stacked shifted windows (im2col);
  - pools as maxima or sums over slices (a max pool's gradient goes to the first maximum of
    each window, as XLA's does);
  - training-mode batch norm with a hand-written gradient;
  - the sampled partial channels moved by products with one-hot matrices, not gathers;
  - repeated search cells written out, not looped over (`loops=False`): XLA:CPU runs the
    step slower with the loop.
"""

import functools
import itertools

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from pcp_jax import kernels


# Training-mode batch norm with a hand-written gradient, which XLA:CPU runs and compiles
# faster than autodiff's.
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def normalize(x, epsilon: float, axis_name):
  return kernels.normalize_batch(x, epsilon, axis_name)


def _normalize_fwd(x, epsilon, axis_name):
  y, mean, var = kernels.normalize_batch(x, epsilon, axis_name)
  inv_std = lax.rsqrt(var + epsilon)
  return (y, mean, var), (x - mean, inv_std, kernels.count_over(x, axis_name))


def _normalize_bwd(epsilon, axis_name, residuals, cotangents):
  centred, inv_std, count = residuals
  g_y, g_mean, g_var = cotangents
  x_hat = centred * inv_std
  g_x = inv_std * (g_y - kernels.mean_over(g_y, axis_name)
                   - x_hat * kernels.mean_over(g_y * x_hat, axis_name))
  return (g_x + (g_mean + 2 * g_var * centred) / count,)


normalize.defvjp(_normalize_fwd, _normalize_bwd)


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


def _weighted_windows(x_padded, kernel, stride: int, dilation: int, out_hw):
  """sum over taps (i, j) of kernel[i, j, 0] times the (i, j) window of `x_padded`."""
  k = kernel.shape[0]
  out = None
  for i in range(k):
    for j in range(k):
      term = _window(x_padded, i * dilation, j * dilation, stride, out_hw) * kernel[i, j, 0]
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
  g_kernel = _depthwise_kernel_grad(x, g, kernel.shape[0], stride, padding,
                                    dilation).astype(kernel.dtype)
  return _depthwise_input_grad(g, kernel, x.shape[1:3], stride, padding, dilation), g_kernel


def _phase_taps(size: int, size_out: int, k: int, stride: int, padding: int, dilation: int):
  """Along one axis, per phase r (the input pixels y = q * stride + r): its length and the
  (tap, offset) pairs that reach it, input pixel q * stride + r receiving tap i of output
  pixel q + offset; and the (low, high) zero padding of the output gradient that keeps
  every phase's windows inside it."""
  phases = []
  for r in range(stride):
    shifts = [r + padding - i * dilation for i in range(k)]
    phases.append((-(-(size - r) // stride),
                   [(i, d // stride) for i, d in enumerate(shifts) if d % stride == 0]))
  offsets = [(n, o) for n, taps in phases for _, o in taps]
  low = max([0] + [-o for _, o in offsets])
  high = max([0] + [n - 1 + o - (size_out - 1) for n, o in offsets])
  return phases, (low, high)


def _depthwise_input_grad(g, kernel, in_hw, stride: int, padding: int, dilation: int):
  """The input gradient of a depthwise conv, phase by phase: the input pixels of one phase
  per axis (y % stride == r) each receive a stride-1 correlation of `g` with the kernel taps
  that reach that phase, and the phases are interleaved at the end. (Spreading `g` over the
  input grid instead, zeros between its pixels, would spend all but 1/stride^2 of a
  strided convolution's products on those zeros.)"""
  k = kernel.shape[0]
  b, h_out, w_out, c = g.shape
  (rows, pad_h), (cols, pad_w) = [
      _phase_taps(n, n_out, k, stride, padding, dilation)
      for n, n_out in zip(in_hw, (h_out, w_out))]
  g_padded = lax.optimization_barrier(
      lax.pad(g, jnp.zeros((), g.dtype), [(0, 0, 0), (*pad_h, 0), (*pad_w, 0), (0, 0, 0)]))
  n_h, n_w = rows[0][0], cols[0][0]  # phase 0 is the longest
  grid = []
  for n_r, row_taps in rows:
    grid.append([])
    for n_c, col_taps in cols:
      phase = None
      for (i, o_i), (j, o_j) in itertools.product(row_taps, col_taps):
        top, left = o_i + pad_h[0], o_j + pad_w[0]
        term = _window(g_padded, top, left, 1, (n_r, n_c)) * kernel[i, j, 0]
        phase = term if phase is None else phase + term
      if phase is None:  # no tap reaches this phase (a dilated kernel at stride 2)
        phase = jnp.zeros((b, n_r, n_c, c), g.dtype)
      grid[-1].append(jnp.pad(phase, ((0, 0), (0, n_h - n_r), (0, n_w - n_c), (0, 0))))
  if stride == 1:
    return grid[0][0]
  interleaved = jnp.stack([jnp.stack(row, axis=3) for row in grid], axis=2)
  return interleaved.reshape(b, n_h * stride, n_w * stride, c)[:, :in_hw[0], :in_hw[1], :]


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


def conv2d(x, kernel, stride: int = 1, padding: int = 0, dilation: int = 1, groups: int = 1):
  """NHWC convolution with an HWIO kernel, as `nn.Conv` computes it."""
  k, _, _, c_out = kernel.shape
  c_in = x.shape[-1]
  if groups == c_in == c_out:  # depthwise
    return _depthwise_slices(x, kernel, stride, padding, dilation)
  if k == 1 and padding == 0:  # pointwise, maybe grouped
    return channel_matmul(x[:, ::stride, ::stride, :], block_diagonal(kernel[0, 0], groups))
  if groups == 1:  # dense (the stems, the auxiliary head's 2x2)
    return _dense_patches(x, kernel, stride, padding, dilation)
  return kernels.XLA.conv2d(x, kernel, stride, padding, dilation, groups)


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


# Max pooling as a maximum over shifted slices. Its gradient goes, like XLA's
# select-and-scatter, to the first maximum of each window in row-major order, so both kernel
# sets agree even where values tie (e.g. flat image borders).
@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, kernel: int, stride: int, padding: int):
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


max_pool.defvjp(_max_pool_slices_fwd, _max_pool_slices_bwd)


def avg_pool(x, window: int, stride: int, padding: int):
  """The average over each window's pixels inside the image (padding not counted)."""
  _, h, w, c = x.shape
  inside = np.pad(np.ones((h, w), np.float32), padding)
  out_hw = _out_hw(x, window, stride, padding)
  counts = sum(inside[i:i + (out_hw[0] - 1) * stride + 1:stride,
                      j:j + (out_hw[1] - 1) * stride + 1:stride]
               for i in range(window) for j in range(window))
  sums = _depthwise_slices(x, jnp.ones((window, window, 1, c), x.dtype), stride, padding, 1)
  return sums * (1.0 / counts)[:, :, None].astype(x.dtype)


def take_channels(x, indices):
  """The channels of `x` at `indices` (edges, n), by a product with one-hot rows: XLA:CPU runs
  those several times faster than gathers and their scatter gradients."""
  return channel_matmul(x, jax.nn.one_hot(indices.reshape(-1), x.shape[-1], dtype=x.dtype).T)


def put_channels(x, y, perm):
  """`x` with its channels perm[:n] replaced by `y`'s n channels, by one-hot products."""
  chosen = jax.nn.one_hot(perm[:y.shape[-1]], x.shape[-1], dtype=x.dtype)  # (n, C)
  return x * (1 - jnp.sum(chosen, axis=0)) + channel_matmul(y, chosen)


KERNELS = kernels.Kernels('cpu', conv2d, normalize, max_pool, avg_pool, take_channels,
                          put_channels, loops=False)
