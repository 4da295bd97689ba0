"""Optimisers: the recipes' first updates, the per-epoch cosine schedule, clipping as the
reference code clips, option checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import defaults
from pcp_jax import optim


def test_first_updates_follow_the_recipes():
  params = {'w': jnp.array([1.0, -2.0])}
  grads = {'w': jnp.array([0.5, 0.25])}
  decayed = grads['w'] + 3e-4 * params['w']  # coupled weight decay
  tx, _ = optim.make(defaults.train_config().train.optim)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step is lr * sign (bias-corrected moments of a single gradient).
  np.testing.assert_allclose(updates['w'], -6e-4 * decayed / (jnp.abs(decayed) + 1e-8),
                             rtol=1e-5)
  tx, _ = optim.make(defaults.apply_args(defaults.train_config(), 'sgd').train.optim, 10)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.025 * decayed, rtol=1e-5)


def test_cosine_schedule_changes_once_per_epoch_down_to_lr_min():
  config = defaults.apply_args(defaults.train_config(), 'sgd').train.optim
  config.lr_min = 0.001
  schedule = optim.schedule(config, epochs=10, steps_per_epoch=5)
  assert float(schedule(0)) == pytest.approx(0.025)
  assert float(schedule(4)) == pytest.approx(0.025)
  assert float(schedule(25)) == pytest.approx((0.025 + 0.001) / 2)
  assert float(schedule(50)) == pytest.approx(0.001)
  assert float(schedule(70)) == pytest.approx(0.001)


def test_gradients_are_clipped_before_weight_decay():
  config = defaults.apply_args(defaults.train_config(), 'sgd')
  params, grads = {'w': jnp.zeros(2)}, {'w': jnp.array([30.0, 40.0])}  # norm 50
  tx, _ = optim.make(config.train.optim)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['w'], -0.025 * jnp.array([3.0, 4.0]), rtol=1e-5)


def _torch_clip(grads, max_norm):
  """torch.nn.utils.clip_grad_norm_'s arithmetic, in NumPy float64."""
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
  coef = min(max_norm / (norm + 1e-6), 1.0)
  return {k: g * coef for k, g in grads.items()}


@pytest.mark.parametrize('scale', [1e-3, 0.999, 1.0, 1.001, 7.0])
@jax.enable_x64()
def test_clip_is_pytorchs_clip_grad_norm(scale):
  # Norms below, at and above the threshold 5 (scale 1.0: norm 5 exactly, where PyTorch still
  # scales by 5 / (5 + 1e-6)).
  rng = np.random.default_rng(0)
  grads = {'a': rng.normal(size=(3, 4)), 'b': rng.normal(size=5)}
  norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads.values()))
  grads = {k: g * 5.0 * scale / norm for k, g in grads.items()}
  tx = optim.clip_by_global_norm(5.0)
  got, _ = tx.update(jax.tree_util.tree_map(jnp.asarray, grads), tx.init(grads))
  want = _torch_clip(grads, 5.0)
  for k in grads:
    assert got[k].dtype == jnp.float64
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-15, atol=0)
  if scale < 0.999:
    np.testing.assert_array_equal(np.asarray(got['a']), grads['a'])  # untouched below


@pytest.mark.parametrize('field, value', [('lr', float('inf')), ('weight_decay', float('nan')),
                                          ('grad_clip', float('inf')), ('momentum', -0.1),
                                          ('b2', float('nan'))])
def test_non_finite_or_negative_settings_are_refused(field, value):
  cfg = defaults.train_config().train.optim
  cfg[field] = value
  with pytest.raises(ValueError, match=rf'train\.optim\.{field} must be a finite number'):
    optim.check(cfg, 'train.optim')
