"""The DARTS operations in NHWC, in a search flavour and an evaluation flavour.

Search flavour (`affine=False`): batch norms without scale/bias, and every pool in
a mixed op is followed by such a batch norm. Evaluation flavour (`affine=True`):
affine batch norms, no batch norm after pools. Padding is explicit so strided
ops see exactly the pixels PyTorch's symmetric padding gives them.
"""

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def batch_norm(train: bool, affine: bool, axis_name: Optional[str], dtype: Dtype,
               name: Optional[str] = None) -> nn.BatchNorm:
  # PyTorch momentum 0.1 is Flax momentum 0.9.
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      use_scale=affine, use_bias=affine, axis_name=axis_name,
                      dtype=dtype, name=name)


def conv(features: int, kernel: int, stride: int = 1, padding: int = 0, dilation: int = 1,
         groups: int = 1, dtype: Dtype = jnp.float32, name: Optional[str] = None) -> nn.Conv:
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((padding, padding), (padding, padding)),
                 kernel_dilation=(dilation, dilation), feature_group_count=groups,
                 use_bias=False, dtype=dtype, name=name)


class ReLUConvBN(nn.Module):
  """ReLU, conv, BN."""
  features: int
  kernel: int = 1
  stride: int = 1
  padding: int = 0
  affine: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = nn.relu(x)
    x = conv(self.features, self.kernel, self.stride, self.padding, dtype=self.dtype)(x)
    return batch_norm(train, self.affine, self.bn_axis_name, self.dtype)(x)


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

  @nn.compact
  def __call__(self, x, train: bool = True):
    c_in = x.shape[-1]
    x = nn.relu(x)
    x = conv(c_in, self.kernel, self.stride, self.padding, self.dilation, groups=c_in,
             dtype=self.dtype)(x)
    x = conv(self.features, 1, dtype=self.dtype)(x)
    return batch_norm(train, self.affine, self.bn_axis_name, self.dtype)(x)


class SepConv(nn.Module):
  """Two rounds of [ReLU, depthwise kxk, 1x1 conv, BN]; only the first is strided."""
  features: int
  kernel: int
  stride: int
  padding: int
  affine: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    c_in = x.shape[-1]
    common = dict(affine=self.affine, bn_axis_name=self.bn_axis_name, dtype=self.dtype)
    x = DilConv(c_in, self.kernel, self.stride, self.padding, 1, **common)(x, train)
    return DilConv(self.features, self.kernel, 1, self.padding, 1, **common)(x, train)


class FactorizedReduce(nn.Module):
  """ReLU, two 1x1 stride-2 convs (the second on the input shifted by one pixel), BN."""
  features: int
  affine: bool = True
  bn_axis_name: Optional[str] = None
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool = True):
    if self.features % 2:
      raise ValueError(f'FactorizedReduce needs an even channel count, got {self.features}.')
    x = nn.relu(x)
    half = self.features // 2
    a = conv(half, 1, stride=2, dtype=self.dtype)(x)
    b = conv(half, 1, stride=2, dtype=self.dtype)(x[:, 1:, 1:, :])
    x = jnp.concatenate([a, b], axis=-1)
    return batch_norm(train, self.affine, self.bn_axis_name, self.dtype)(x)


def max_pool_3x3(x, stride: int):
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)))


def avg_pool_3x3(x, stride: int):
  return nn.avg_pool(x, (3, 3), strides=(stride, stride), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


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

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = (max_pool_3x3 if self.kind == 'max' else avg_pool_3x3)(x, self.stride)
    if self.bn_after:
      x = batch_norm(train, False, self.bn_axis_name, self.dtype)(x)
    return x


def make_op(name: str, features: int, stride: int, affine: bool,
            bn_axis_name: Optional[str] = None, dtype: Dtype = jnp.float32,
            module_name: Optional[str] = None):
  """One of the PRIMITIVES as a callable `op(x, train)`; `None` for `none` and identity.

  `none` and stride-1 `skip_connect` have no parameters; callers handle them
  directly (zeros cost nothing, identities are free), which is why they map to None.
  """
  common = dict(bn_axis_name=bn_axis_name, dtype=dtype, name=module_name)
  if name in ('none',) or (name == 'skip_connect' and stride == 1):
    return None
  if name == 'skip_connect':
    return FactorizedReduce(features, affine=affine, **common)
  if name in ('max_pool_3x3', 'avg_pool_3x3'):
    return Pool(name[:3], stride, bn_after=not affine, **common)
  if name == 'sep_conv_3x3':
    return SepConv(features, 3, stride, 1, affine=affine, **common)
  if name == 'sep_conv_5x5':
    return SepConv(features, 5, stride, 2, affine=affine, **common)
  if name == 'dil_conv_3x3':
    return DilConv(features, 3, stride, 2, 2, affine=affine, **common)
  if name == 'dil_conv_5x5':
    return DilConv(features, 5, stride, 4, 2, affine=affine, **common)
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


def max_pool_2x2(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')


def drop_path(key, x, rate):
  """Per-sample drop path (whole example zeroed with probability `rate`), rescaled."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(key, keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep, 0).astype(x.dtype)
