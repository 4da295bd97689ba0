"""Weights start as in the reference code, which keeps PyTorch's defaults: every convolution
and linear weight, and every linear bias, uniform in +-1/sqrt(fan_in); batch norms at 1 and 0."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import genotypes
from pcp_jax import heads
from pcp_jax import kernels as kernels_lib
from pcp_jax import networks
from pcp_jax import supernet


# Two ops per edge: the depthwise, grouped pointwise and dilated kernels, a smaller program.
TWO_OPS = tuple(tuple(p in ('sep_conv_3x3', 'dil_conv_5x5') for p in genotypes.PRIMITIVES)
                for _ in range(genotypes.NUM_EDGES))


def _variables(which, key):
  if which == 'search':
    # 3 cells: a normal cell, a reduction, a reduction after one (a factorised reduce).
    model = supernet.SearchNetwork(num_classes=10, channels=4, layers=3, partial_k=4,
                                   switches_normal=TWO_OPS, switches_reduce=TWO_OPS,
                                   kernels=kernels_lib.XLA)
    return supernet.init_variables(model, key, (16, 16, 3))
  if which == 'eval':
    model = networks.EvalNetwork(genotypes.REFERENCE_GENOTYPES['PDARTS'], num_classes=10,
                                 channels=8, layers=8, auxiliary=True, kernels=kernels_lib.XLA)
    return networks.init_variables(model, key, (32, 32, 3))
  return heads.Projector((64, 32), kernels=kernels_lib.XLA).init(key, jnp.zeros((4, 128)))


def _leaves(params):
  """(path, float64 array) of every parameter."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    yield [p.key for p in path], np.asarray(leaf, np.float64)


@pytest.mark.parametrize('which', ['search', 'eval', 'projector'])
def test_weights_start_as_pytorchs_defaults(which):
  params = _variables(which, jax.random.PRNGKey(0))['params']
  scaled = []  # every kernel entry times sqrt(its fan-in): U(-1, 1) if initialised right
  kernels = {}
  for keys, leaf in _leaves(params):
    if keys[-1] == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))  # (k, k, in / groups, out) or (in, out)
      u = leaf * np.sqrt(fan_in)
      assert np.all(np.abs(u) <= 1 + 1e-6), keys
      if u.size >= 1000:  # large enough to reach both ends of the range
        assert np.abs(u).max() > 0.99, keys
      scaled.append(u.ravel())
      kernels[tuple(keys[:-1])] = fan_in
  assert kernels
  scaled = np.concatenate(scaled)
  # E[u^2] = 1/3 for u ~ U(-1, 1); the mean of n samples has standard deviation sqrt(4/45/n).
  tolerance = 6 * np.sqrt(4 / 45 / scaled.size)
  assert abs(np.mean(scaled ** 2) - 1 / 3) < tolerance
  assert abs(np.mean(scaled)) < 6 * np.sqrt(1 / 3 / scaled.size)

  for keys, leaf in _leaves(params):
    if keys[-1] != 'bias':
      continue
    owner = tuple(keys[:-1])
    if owner in kernels:  # a linear layer's bias, U(+-1/sqrt(fan_in)) like its weight
      bound = 1 / np.sqrt(kernels[owner])
      assert np.all(np.abs(leaf) <= bound * (1 + 1e-6)) and np.any(leaf != 0), keys
    else:  # a batch norm's
      assert np.all(leaf == 0), keys
  for keys, leaf in _leaves(params):
    if keys[-1] == 'scale':
      assert np.all(leaf == 1), keys
