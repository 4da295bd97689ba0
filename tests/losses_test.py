"""Tests of the losses and the Barlow Twins projector head."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pcp_jax import heads
from pcp_jax import kernels
from pcp_jax import losses


def numpy_barlow_twins(z_a, z_b, lambd):
  """The Barlow Twins loss as its paper writes it, in float64."""
  z_a, z_b = np.asarray(z_a, np.float64), np.asarray(z_b, np.float64)
  z_a = (z_a - z_a.mean(0)) / np.sqrt(z_a.var(0) + 1e-5)
  z_b = (z_b - z_b.mean(0)) / np.sqrt(z_b.var(0) + 1e-5)
  c = z_a.T @ z_b / len(z_a)
  off_diagonal = c[~np.eye(len(c), dtype=bool)]
  return np.sum((1 - np.diag(c)) ** 2) + lambd * np.sum(off_diagonal ** 2)


def test_losses_compute_in_float32_or_wider():
  # bfloat16 inputs are upcast; a float64 model (reference runs) keeps float64 throughout.
  logits = np.array([[2.0, 0.0, -1.0], [0.1, 0.3, 0.2]], np.float32)
  labels = np.array([0, 2])
  z_a, z_b = random_views(0, batch=8, dim=4)
  assert losses.cross_entropy(jnp.asarray(logits, jnp.bfloat16), labels).dtype == jnp.float32
  assert losses.barlow_twins_loss(jnp.asarray(z_a, jnp.bfloat16),
                                  jnp.asarray(z_b, jnp.bfloat16)).dtype == jnp.float32
  with jax.enable_x64():
    ce = losses.cross_entropy(jnp.asarray(logits, jnp.float64), labels)
    bt = losses.barlow_twins_loss(jnp.asarray(z_a, jnp.float64), jnp.asarray(z_b, jnp.float64))
    assert ce.dtype == bt.dtype == jnp.float64
    np.testing.assert_allclose(bt, numpy_barlow_twins(z_a, z_b, 0.0051), rtol=1e-12)


def random_views(seed, batch=32, dim=6):
  rng = np.random.default_rng(seed)
  z_a = rng.normal(size=(batch, dim)).astype(np.float32)
  z_b = (0.7 * z_a + 0.5 * rng.normal(size=(batch, dim))).astype(np.float32)
  return z_a, z_b


def test_cross_entropy_and_accuracy_match_numpy():
  logits = np.array([[2.0, 0.0, -1.0], [0.1, 0.3, 0.2], [-1.0, 0.0, 4.0]], np.float32)
  labels = np.array([0, 2, 1])
  log_probs = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  expected = -log_probs[np.arange(3), labels].mean()
  np.testing.assert_allclose(losses.cross_entropy(logits, labels), expected, rtol=1e-6)
  assert float(losses.accuracy(logits, labels)) == pytest.approx(1 / 3)


def test_cross_entropy_of_bfloat16_logits_is_float32():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.1, 0.3, 0.2]], jnp.bfloat16)
  loss = losses.cross_entropy(logits, jnp.array([0, 2]))
  assert loss.dtype == jnp.float32
  expected = losses.cross_entropy(logits.astype(jnp.float32), jnp.array([0, 2]))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize('seed,lambd', [(0, 0.0051), (1, 0.1)])
def test_barlow_twins_matches_numpy(seed, lambd):
  z_a, z_b = random_views(seed)
  loss = losses.barlow_twins_loss(z_a, z_b, lambd=lambd)
  np.testing.assert_allclose(loss, numpy_barlow_twins(z_a, z_b, lambd), rtol=1e-5)


def test_barlow_twins_computes_bfloat16_inputs_in_float32():
  z_a, z_b = random_views(2)
  loss = losses.barlow_twins_loss(jnp.asarray(z_a, jnp.bfloat16), jnp.asarray(z_b, jnp.bfloat16))
  assert loss.dtype == jnp.float32
  rounded = [np.asarray(jnp.asarray(z, jnp.bfloat16), np.float32) for z in (z_a, z_b)]
  np.testing.assert_allclose(loss, numpy_barlow_twins(*rounded, 0.0051), rtol=1e-5)


def test_barlow_twins_is_near_zero_for_identical_decorrelated_views():
  batch, dim = 64, 8
  x = np.random.default_rng(0).normal(size=(batch, dim))
  q, _ = np.linalg.qr(x - x.mean(0))  # Zero-mean, mutually orthogonal features.
  z = (5.0 * q + 3.0).astype(np.float32)  # Shift and scale must not matter.
  assert float(losses.barlow_twins_loss(z, z)) < 1e-3


def test_barlow_twins_is_high_for_collapsed_views():
  batch, dim, lambd = 64, 8, 0.0051
  column = np.random.default_rng(0).normal(size=(batch, 1))
  # Every feature the same: all correlations are 1, so only the off-diagonal terms remain.
  same_features = np.repeat(column, dim, axis=1).astype(np.float32)
  loss = float(losses.barlow_twins_loss(same_features, same_features, lambd=lambd))
  assert loss == pytest.approx(lambd * dim * (dim - 1), rel=1e-2)
  # Every example the same: the normalised features are 0, so each diagonal term is 1.
  constant = np.ones((batch, dim), np.float32)
  assert float(losses.barlow_twins_loss(constant, constant)) == pytest.approx(dim)


def test_barlow_twins_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match='one shape'):
    losses.barlow_twins_loss(jnp.zeros((4, 3)), jnp.zeros((4, 2)))


def test_barlow_twins_over_a_mapped_axis_equals_the_single_batch_loss():
  z_a, z_b = random_views(3, batch=16)
  # Shift one shard so that local and global statistics differ.
  z_a[8:] += 2.0
  expected = losses.barlow_twins_loss(z_a, z_b)
  sharded = jax.vmap(
      functools.partial(losses.barlow_twins_loss, axis_name='devices'), axis_name='devices')(
          z_a.reshape(2, 8, -1), z_b.reshape(2, 8, -1))
  np.testing.assert_allclose(sharded, [expected, expected], rtol=1e-5)
  unsynced = jax.vmap(losses.barlow_twins_loss)(z_a.reshape(2, 8, -1), z_b.reshape(2, 8, -1))
  assert not np.allclose(unsynced, expected, rtol=1e-3)


def test_mixed_arch_loss_mixes_the_two_losses():
  assert float(losses.mixed_arch_loss(jnp.float32(2.0), jnp.float32(10.0), 0.25)) == 4.0
  traced_factor = jnp.float32(0.75)
  assert float(losses.mixed_arch_loss(jnp.float32(2.0), jnp.float32(10.0), traced_factor)) == 8.0
  with pytest.raises(ValueError, match='ss_factor'):
    losses.mixed_arch_loss(jnp.float32(2.0), jnp.float32(10.0), 1.5)


def test_mixed_arch_loss_at_zero_has_exactly_the_cross_entropy_gradient():
  logits_w = jnp.array([[0.3, -0.2], [0.1, 0.4]])
  x = jnp.array([[1.0, 2.0], [-1.0, 0.5]])
  labels = jnp.array([0, 1])

  def ce(w):
    return losses.cross_entropy(x @ w, labels)

  def mixed(w, ss_factor):
    bt = jnp.sqrt(-jnp.sum(w ** 2))  # NaN in value and gradient.
    return losses.mixed_arch_loss(ce(w), bt, ss_factor)

  value, grad = jax.value_and_grad(mixed)(logits_w, 0.0)
  expected_value, expected_grad = jax.value_and_grad(ce)(logits_w)
  assert float(value) == float(expected_value)
  np.testing.assert_array_equal(grad, expected_grad)
  # The guard is what keeps the NaN out: a small nonzero factor lets it through.
  assert np.isnan(jax.grad(mixed)(logits_w, 1e-3)).all()


def projector_and_views(sizes=(16, 8), bn_axis_name=None):
  rng = np.random.default_rng(0)
  features = rng.normal(size=(12, 10)).astype(np.float32)
  view_a = features + 0.3 * rng.normal(size=features.shape).astype(np.float32)
  view_b = features + 0.3 * rng.normal(size=features.shape).astype(np.float32)
  model = heads.Projector(sizes=sizes, bn_axis_name=bn_axis_name, kernels=kernels.XLA)
  variables = model.init(jax.random.key(0), view_a)
  return model, variables, view_a, view_b


def test_projector_output_shape_and_collections():
  model, variables, view_a, _ = projector_and_views(sizes=(16, 16, 5))
  assert set(variables) == {'params', 'batch_stats'}
  z, updates = model.apply(variables, view_a, mutable=['batch_stats'])
  assert z.shape == (12, 5)
  # Training updates the running statistics; evaluation uses them without mutation.
  assert not np.allclose(updates['batch_stats']['BatchNorm_0']['mean'], 0.0)
  assert model.apply(variables, view_a, train=False).shape == (12, 5)


def test_projector_can_be_trained_with_barlow_twins():
  model, variables, view_a, view_b = projector_and_views()

  def loss_fn(params):
    z_a, _ = model.apply({**variables, 'params': params}, view_a, mutable=['batch_stats'])
    z_b, _ = model.apply({**variables, 'params': params}, view_b, mutable=['batch_stats'])
    return losses.barlow_twins_loss(z_a, z_b, lambd=0.01)

  loss_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  params = variables['params']
  initial, grads = loss_and_grad(params)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)
  for _ in range(15):
    _, grads = loss_and_grad(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  assert float(loss_and_grad(params)[0]) < 0.7 * float(initial)


def test_projector_batch_norm_over_a_mapped_axis_uses_the_global_batch():
  model, variables, view_a, _ = projector_and_views(bn_axis_name='devices')
  plain = heads.Projector(sizes=(16, 8), kernels=kernels.XLA)
  expected, _ = plain.apply(variables, view_a, mutable=['batch_stats'])
  sharded, _ = jax.vmap(
      lambda x: model.apply(variables, x, mutable=['batch_stats']), axis_name='devices')(
          view_a.reshape(2, 6, -1))
  np.testing.assert_allclose(sharded.reshape(12, -1), expected, rtol=1e-4, atol=1e-5)
