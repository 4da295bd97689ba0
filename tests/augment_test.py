"""Tests for pcp_jax.augment on small batches, all under jax.jit."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import augment

BATCH, SIZE = 8, 32


@pytest.fixture(autouse=True, scope='module')
def _fast_compile():
  # Compilation dominates these tiny batches; restore the flag for other files.
  previous = jax.config.read('jax_disable_most_optimizations')
  jax.config.update('jax_disable_most_optimizations', True)
  yield
  jax.config.update('jax_disable_most_optimizations', previous)


def _images(channels=3, seed=0, batch=BATCH):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(size=(batch, SIZE, SIZE, channels)),
                     jnp.float32)


def _jit(fn, **kwargs):
  return jax.jit(functools.partial(fn, **kwargs))


@functools.lru_cache(maxsize=None)
def _views_fn():
  return jax.jit(augment.barlow_twins_views)


def test_to_float_and_normalize():
  x = augment.to_float(np.array([[[[0, 51, 255]]]], np.uint8))
  assert x.dtype == jnp.float32
  np.testing.assert_allclose(x[0, 0, 0], [0.0, 0.2, 1.0])
  y = augment.normalize(x, mean=(0.0, 0.2, 0.5), std=(1.0, 0.5, 0.25))
  np.testing.assert_allclose(y[0, 0, 0], [0.0, 0.0, 2.0], atol=1e-6)


def test_crop_without_padding_only_flips():
  x = _images(batch=16)
  y = np.asarray(_jit(augment.random_crop_flip, padding=0)(
      jax.random.key(0), x))
  flipped = [np.array_equal(y[i], x[i, :, ::-1]) for i in range(16)]
  kept = [np.array_equal(y[i], x[i]) for i in range(16)]
  assert all(f or k for f, k in zip(flipped, kept))
  assert any(flipped) and any(kept)


def _find_window(output, image, padding):
  """Returns (top, left, flipped) of the padded-image window equal to output."""
  size = image.shape[0]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  for top in range(2 * padding + 1):
    for left in range(2 * padding + 1):
      window = padded[top:top + size, left:left + size]
      for flipped, candidate in ((False, window), (True, window[:, ::-1])):
        if np.array_equal(output, candidate):
          return top, left, flipped
  return None


def test_crop_is_a_window_of_the_zero_padded_image_at_every_offset():
  x = np.random.default_rng(1).uniform(size=(64, 8, 8, 3)).astype(np.float32)
  y = np.asarray(_jit(augment.random_crop_flip, padding=2)(
      jax.random.key(1), x))
  windows = [_find_window(y[i], x[i], 2) for i in range(len(x))]
  assert None not in windows
  tops, lefts, flips = zip(*windows)
  assert set(tops) == set(lefts) == set(range(5))
  assert set(flips) == {False, True}


def test_random_ops_depend_only_on_the_key():
  x = _images()
  crop = _jit(augment.random_crop_flip, padding=4)
  np.testing.assert_array_equal(crop(jax.random.key(3), x),
                                crop(jax.random.key(3), x))
  assert not np.array_equal(crop(jax.random.key(3), x),
                            crop(jax.random.key(4), x))


def _zero_boxes(y):
  """Per image, the (top, bottom, left, right) box of its zeros; checks it is filled."""
  boxes = []
  for image in np.asarray(y):
    zero = (image == 0).all(-1)
    rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
    box = (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1)
    assert zero.sum() == (box[1] - box[0]) * (box[3] - box[2])
    assert not (image == 0).any(-1)[~zero].any()  # all channels or none
    boxes.append(box)
  return boxes


def test_cutout_zeroes_one_square_clipped_at_the_border():
  ones = jnp.ones((32, SIZE, SIZE, 3))
  y = _jit(augment.cutout, size=8)(jax.random.key(5), ones)
  interior = 0
  for top, bottom, left, right in _zero_boxes(y):
    assert bottom - top <= 8 and right - left <= 8
    if 0 < top and bottom < SIZE and 0 < left and right < SIZE:
      interior += 1
      assert (bottom - top, right - left) == (8, 8)
  assert interior > 0


def test_resized_crop_of_the_whole_image_is_the_identity():
  x = _images()
  y = _jit(augment.random_resized_crop, scale=(1.0, 1.0), ratio=(1.0, 1.0))(
      jax.random.key(6), x)
  np.testing.assert_allclose(y, x, atol=1e-5)


def test_resized_crop_zooms_without_dark_borders():
  x = _images()
  crop = _jit(augment.random_resized_crop, scale=(0.1, 0.3))
  constant = crop(jax.random.key(7), jnp.full_like(x, 0.5))
  np.testing.assert_allclose(constant, 0.5, atol=1e-5)
  y = crop(jax.random.key(7), x)
  # Upsampling a small box smooths the image: neighbours get closer.
  assert np.abs(np.diff(y, axis=2)).mean() < 0.5 * np.abs(
      np.diff(x, axis=2)).mean()


def test_random_erasing_fills_one_box_of_bounded_area():
  ones = jnp.ones((16, SIZE, SIZE, 3))
  always = _jit(augment.random_erasing, probability=1.0)(
      jax.random.key(8), ones)
  for top, bottom, left, right in _zero_boxes(always):
    assert 1 <= (bottom - top) * (right - left) <= 0.33 * SIZE * SIZE + SIZE
  never = _jit(augment.random_erasing, probability=0.0)(
      jax.random.key(8), ones)
  np.testing.assert_array_equal(never, ones)


def test_color_jitter_and_grayscale_probabilities():
  x = _images()
  jittered = _jit(augment.color_jitter, probability=1.0)(jax.random.key(9), x)
  assert bool((jnp.abs(jittered - x).mean(axis=(1, 2, 3)) > 1e-3).all())
  assert float(jittered.min()) >= 0.0 and float(jittered.max()) <= 1.0
  untouched = _jit(augment.color_jitter, probability=0.0)(jax.random.key(9), x)
  np.testing.assert_array_equal(untouched, x)
  gray = _jit(augment.random_grayscale, probability=1.0)(jax.random.key(9), x)
  np.testing.assert_allclose(gray[..., 0], gray[..., 2])
  np.testing.assert_allclose(gray[..., 0], 0.2989 * x[..., 0] +
                             0.587 * x[..., 1] + 0.114 * x[..., 2], atol=1e-5)


@pytest.mark.parametrize('channels', [3, 1])
def test_barlow_twins_views(channels):
  x = _images(channels)
  view_a, view_b = _views_fn()(jax.random.key(10), x)
  for view in (view_a, view_b):
    assert view.shape == x.shape and view.dtype == jnp.float32
    assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0
    assert bool((jnp.abs(view - x).mean(axis=(1, 2, 3)) > 1e-2).all())
  assert bool((jnp.abs(view_a - view_b).mean(axis=(1, 2, 3)) > 1e-2).all())
  again_a, _ = _views_fn()(jax.random.key(10), x)
  np.testing.assert_array_equal(again_a, view_a)
  other_a, _ = _views_fn()(jax.random.key(11), x)
  assert not np.array_equal(other_a, view_a)
