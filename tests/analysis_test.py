"""Tests of the FGSM robustness analysis."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pcp_jax import analysis

NUM_CLASSES = 4
IMAGE_SHAPE = (4, 4, 3)


def linear_model(seed=0):
  """A tiny linear classifier on pixel-space images that normalises inside, as real ones do."""
  rng = np.random.default_rng(seed)
  weights = jnp.asarray(rng.normal(size=(np.prod(IMAGE_SHAPE), NUM_CLASSES)), jnp.float32)
  bias = jnp.asarray(rng.normal(size=NUM_CLASSES), jnp.float32)

  def logits_fn(x_pixels):
    x = (x_pixels - 0.5) / 0.25
    return x.reshape(x.shape[0], -1) @ weights + bias
  return logits_fn


def dataset(num_examples=10, seed=1):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(num_examples,) + IMAGE_SHAPE).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=num_examples)
  return images, labels


def per_example_ce(logits_fn, x, labels):
  return np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits_fn(x), labels))


def test_unclipped_perturbation_has_max_norm_eps():
  logits_fn = linear_model()
  images, labels = dataset()
  eps = 0.03
  x_adv = analysis.fgsm_perturb(logits_fn, images, labels, eps, clip=False)
  delta = np.abs(np.asarray(x_adv) - images)
  np.testing.assert_allclose(delta.max(), eps, rtol=1e-4)
  # A linear model has a nonzero gradient at every pixel, so every pixel moves by eps.
  np.testing.assert_allclose(delta, eps, rtol=1e-3)


def test_perturbation_increases_the_loss_of_every_example():
  logits_fn = linear_model()
  images, labels = dataset()
  eps = 0.01
  clean = per_example_ce(logits_fn, images, labels)
  x_adv = analysis.fgsm_perturb(logits_fn, images, labels, eps, clip=False)
  assert (per_example_ce(logits_fn, x_adv, labels) > clean).all()
  # The opposite step lowers it: the sign is the loss-increasing direction, not any step.
  x_down = 2 * images - x_adv
  assert (per_example_ce(logits_fn, x_down, labels) < clean).all()


def test_clipping_keeps_pixels_in_range():
  logits_fn = linear_model()
  images, labels = dataset()
  unclipped = np.asarray(analysis.fgsm_perturb(logits_fn, images, labels, 0.3, clip=False))
  assert unclipped.min() < 0 or unclipped.max() > 1  # So that clipping has work to do.
  clipped = np.asarray(analysis.fgsm_perturb(logits_fn, images, labels, 0.3))
  assert clipped.min() >= 0 and clipped.max() <= 1
  np.testing.assert_allclose(clipped, np.clip(unclipped, 0, 1))


def count_traces(logits_fn):
  """Wraps logits_fn to count how often JAX traces it (each trace calls it twice)."""
  calls = []

  def counted(x):
    calls.append(x.shape)
    return logits_fn(x)
  return counted, calls


def test_sweep_matches_full_batch_attack_with_partial_last_batch():
  logits_fn = linear_model()
  images, labels = dataset(num_examples=10)
  eps_list = [0.0, 0.02, 0.1]
  counted, calls = count_traces(logits_fn)
  results = analysis.fgsm_sweep(counted, images, labels, eps_list, batch_size=4,
                                example_indices=(0, 9))
  # One trace (a gradient pass and an attacked pass) for 3 batches, one partial, and 3 eps.
  assert len(calls) == 2 and set(calls) == {(4,) + IMAGE_SHAPE}

  assert results['eps'] == eps_list
  for k, eps in enumerate(eps_list):
    x_adv = analysis.fgsm_perturb(logits_fn, images, labels, eps)
    probs = np.asarray(jax.nn.softmax(logits_fn(x_adv)))
    true_prob = probs[np.arange(len(labels)), labels]
    assert results['accuracy'][k] == pytest.approx(np.mean(probs.argmax(1) == labels))
    assert results['mean_true_prob'][k] == pytest.approx(true_prob.mean(), rel=1e-5)
    assert results['examples']['9'][k] == pytest.approx(true_prob[9], rel=1e-5)
  assert set(results['examples']) == {'0', '9'}


def test_sweep_at_eps_zero_gives_clean_accuracy_and_attacks_lower_it():
  logits_fn = linear_model()
  images, labels = dataset(num_examples=12)
  results = analysis.fgsm_sweep(logits_fn, images, labels, [0.0, 0.05, 0.2], batch_size=5,
                                example_indices=(3,))
  clean = np.mean(np.asarray(logits_fn(images)).argmax(1) == labels)
  assert results['accuracy'][0] == pytest.approx(clean)
  assert results['mean_true_prob'][2] < results['mean_true_prob'][0]
  assert json.loads(json.dumps(results)) == results


def test_sweep_rejects_out_of_range_examples():
  images, labels = dataset(num_examples=3)
  with pytest.raises(ValueError, match='out of range'):
    analysis.fgsm_sweep(linear_model(), images, labels, [0.0], example_indices=(5,))
