"""Search spaces: RobustDARTS's S1-S4 as op switches, the S4 noise op, a genotype with it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import genotypes
from pcp_jax import kernels
from pcp_jax import networks
from pcp_jax import ops
from pcp_jax import spaces


def ops_of(switches, edge):
  return {genotypes.OPS[k] for k in np.flatnonzero(switches[edge])}


@pytest.mark.parametrize('space, expected', [
    ('s2', {'skip_connect', 'sep_conv_3x3'}),
    ('s3', {'none', 'skip_connect', 'sep_conv_3x3'}),
    ('s4', {'noise', 'sep_conv_3x3'}),
])
def test_uniform_spaces_put_the_same_ops_on_every_edge_of_both_cells(space, expected):
  switches = spaces.initial_switches(space, genotypes.PRIMITIVES)
  for cell in genotypes.CELLS:
    assert all(ops_of(switches[cell], e) == expected for e in range(genotypes.NUM_EDGES))
    genotypes.check_switches(switches[cell])


def test_s1_pairs_differ_per_edge_and_cell():
  switches = spaces.initial_switches('s1', genotypes.PRIMITIVES)
  assert ops_of(switches['normal'], 5) == {'max_pool_3x3', 'skip_connect'}
  assert ops_of(switches['normal'], 13) == {'dil_conv_3x3', 'dil_conv_5x5'}
  assert ops_of(switches['reduce'], 0) == {'max_pool_3x3', 'avg_pool_3x3'}
  assert ops_of(switches['reduce'], 4) == {'skip_connect', 'dil_conv_5x5'}
  assert all(row.sum() == 2 for cell in genotypes.CELLS for row in switches[cell])
  assert not any('none' in ops_of(switches['normal'], e) for e in range(14))


def test_darts_space_is_the_initial_ops_everywhere_and_noise_never():
  switches = spaces.initial_switches('darts', genotypes.PRIMITIVES)
  assert (switches['normal'] == genotypes.all_switches()).all()
  assert not switches['reduce'][:, genotypes.OPS.index('noise')].any()
  with pytest.raises(ValueError, match="search.space must be one of"):
    spaces.initial_switches('s7', genotypes.PRIMITIVES)


def test_old_eight_column_switches_read_as_the_darts_ops():
  old = np.ones((14, 8), bool)
  assert (genotypes.check_switches(old) == genotypes.all_switches()).all()


class TwoNoises(nn.Module):
  @nn.compact
  def __call__(self, x):
    return ops.Noise(2, name='a')(x), ops.Noise(1, name='b')(x)


def test_noise_ignores_its_input_and_draws_from_the_noise_stream():
  x = jnp.ones((4, 8, 8, 3))
  model = TwoNoises()
  variables = model.init({'noise': jax.random.PRNGKey(0)}, x)
  a, b = model.apply(variables, x, rngs={'noise': jax.random.PRNGKey(1)})
  assert a.shape == (4, 4, 4, 3) and b.shape == (4, 8, 8, 3)
  a2, _ = model.apply(variables, 5 * x, rngs={'noise': jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(a, a2)  # whatever the input
  a3, _ = model.apply(variables, x, rngs={'noise': jax.random.PRNGKey(2)})
  assert not np.allclose(a, a3)  # a fresh draw per key
  big = np.asarray(b).ravel()
  assert abs(big.mean()) < 0.15 and abs(big.std() - 1) < 0.15  # N(0, 1)
  # Without the stream (evaluation): a fixed draw per op, repeatable, different per op.
  e1, f1 = model.apply(variables, x)
  e2, _ = model.apply(variables, x)
  np.testing.assert_array_equal(e1, e2)
  assert not np.allclose(np.asarray(e1)[..., 0], np.asarray(f1)[:, ::2, ::2, 0])


@pytest.mark.slow  # builds and runs a network: the quick suite keeps the op's own test
def test_a_genotype_with_noise_is_valid_and_builds_an_evaluation_network():
  normal = (('noise', 0), ('sep_conv_3x3', 1)) * 4
  genotype = genotypes.validate(genotypes.Genotype(normal, (2, 3, 4, 5), normal, (2, 3, 4, 5)))
  assert genotypes.parse(genotypes.to_string(genotype)) == genotype
  net = networks.EvalNetwork(genotype, num_classes=10, channels=4, layers=3, auxiliary=False,
                             kernels=kernels.XLA)
  x = jnp.zeros((2, 8, 8, 3))
  variables = net.init({'params': jax.random.PRNGKey(0)}, x, train=False)
  logits, _ = net.apply(variables, x, train=False)
  again, _ = net.apply(variables, x, train=False)
  np.testing.assert_array_equal(logits, again)
  (one, _), _ = net.apply(variables, x, train=True, rngs={'noise': jax.random.PRNGKey(1)},
                          mutable=['batch_stats'])
  (two, _), _ = net.apply(variables, x, train=True, rngs={'noise': jax.random.PRNGKey(2)},
                          mutable=['batch_stats'])
  assert logits.shape == (2, 10) and not np.allclose(one, two)
