"""The evaluation network: reference parameter counts, shapes, auxiliary head, drop-path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import genotypes
from pcp_jax import kernels
from pcp_jax import networks

REFERENCE_COUNTS = {'DARTS_V2': 3349342, 'PC_DARTS_cifar': 3634678, 'PDARTS': 3433798}


@pytest.mark.parametrize('name', sorted(REFERENCE_COUNTS))
def test_parameter_counts_match_the_reference_code(name):
  genotype = genotypes.REFERENCE_GENOTYPES[name]
  count = networks.count_params(genotype, channels=36, layers=20, num_classes=10)
  assert count == REFERENCE_COUNTS[name]
  with_aux = networks.count_params(genotype, 36, 20, 10, auxiliary=True)
  # The auxiliary head: 1x1 conv 576->128, BN, 2x2 conv 128->768, BN, linear 768->10.
  assert with_aux - count == 576 * 128 + 2 * 128 + 4 * 128 * 768 + 2 * 768 + 768 * 10 + 10


@pytest.mark.parametrize('shape', [(32, 32, 3), (28, 28, 1)])
def test_shapes_and_auxiliary_only_in_training(shape):
  model = networks.EvalNetwork(genotypes.REFERENCE_GENOTYPES['PDARTS'], num_classes=5,
                               channels=4, layers=5, kernels=kernels.XLA)
  x = jnp.zeros((2,) + shape)

  def run(key):
    variables = networks.init_variables(model, key, shape)
    (logits, aux), _ = model.apply(variables, x, train=True, drop_path_rate=0.1,
                                   rngs={'drop_path': key}, mutable=['batch_stats'])
    eval_logits, eval_aux = model.apply(variables, x, train=False)
    return variables, logits, aux, eval_logits, eval_aux

  variables, logits, aux, eval_logits, eval_aux = jax.eval_shape(run, jax.random.PRNGKey(0))
  assert logits.shape == aux.shape == eval_logits.shape == (2, 5)
  assert eval_aux is None
  assert 'auxiliary_head' in variables['params']
  assert set(variables) == {'params', 'batch_stats'}


def test_drop_path_only_in_training_and_keyed():
  model = networks.EvalNetwork(genotypes.REFERENCE_GENOTYPES['PC_DARTS_cifar'], num_classes=3,
                               channels=4, layers=3, auxiliary=False, kernels=kernels.XLA)
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 3))
  variables = jax.jit(lambda k: networks.init_variables(model, k, (8, 8, 3)))(
      jax.random.PRNGKey(1))

  @jax.jit
  def train_logits(key, rate):
    return model.apply(variables, x, train=True, drop_path_rate=rate,
                       rngs={'drop_path': key}, mutable=['batch_stats'])[0][0]

  a = train_logits(jax.random.PRNGKey(2), 0.5)
  b = train_logits(jax.random.PRNGKey(3), 0.5)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, train_logits(jax.random.PRNGKey(2), 0.5))
  no_drop = train_logits(jax.random.PRNGKey(2), 0.0)
  assert not np.allclose(a, no_drop)
  eval_plain, eval_rate = jax.jit(lambda: (
      model.apply(variables, x, train=False)[0],
      model.apply(variables, x, train=False, drop_path_rate=0.5,
                  rngs={'drop_path': jax.random.PRNGKey(2)})[0]))()
  np.testing.assert_array_equal(eval_plain, eval_rate)
