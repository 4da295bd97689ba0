"""Tests for pcp_jax.augment on small batches, all under jax.jit."""

import dataclasses
import functools

import dm_pix as pix
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


def _reference_blur(image, sigma, kernel_size):
  """Direct 2-D convolution with the outer-product Gaussian, reflect-padded, in numpy."""
  radius = kernel_size // 2
  offsets = np.arange(-radius, radius + 1, dtype=np.float64)
  weights = np.exp(-offsets**2 / (2 * sigma**2))
  kernel = np.outer(weights, weights) / weights.sum()**2
  padded = np.pad(np.asarray(image, np.float64), ((radius, radius), (radius, radius), (0, 0)),
                  mode='reflect')
  height, width, _ = image.shape
  out = np.zeros(image.shape)
  for i in range(kernel_size):
    for j in range(kernel_size):
      out += kernel[i, j] * padded[i:i + height, j:j + width]
  return out


@pytest.mark.parametrize('kernel_size', [3, 5])
def test_gaussian_blur_matches_a_direct_convolution(kernel_size):
  x = _images(batch=2)
  blur = _jit(augment.gaussian_blur, sigma=(0.7, 0.7), kernel_size=kernel_size)
  y = blur(jax.random.key(12), x, 1.0)
  for i in range(2):
    np.testing.assert_allclose(y[i], _reference_blur(x[i], 0.7, kernel_size), atol=1e-5)
  np.testing.assert_array_equal(blur(jax.random.key(12), x, 0.0), x)


def test_gaussian_blur_smooths_and_keeps_edges():
  x = _images()
  blur = _jit(augment.gaussian_blur, probability=1.0)

  def roughness(images):
    return np.abs(np.diff(np.asarray(images), axis=2)).mean(axis=(1, 2, 3))

  smooth = blur(jax.random.key(13), x)
  assert (roughness(smooth) <= roughness(x) + 1e-6).all()
  assert roughness(smooth).mean() < 0.8 * roughness(x).mean()
  strong = _jit(augment.gaussian_blur, probability=1.0, sigma=(1.0, 2.0))(
      jax.random.key(13), x)
  assert (roughness(strong) < 0.3 * roughness(x)).all()
  # Reflect padding: a flat image stays flat up to its border (zero padding darkens it).
  np.testing.assert_allclose(blur(jax.random.key(13), jnp.full_like(x, 0.6)), 0.6,
                             atol=1e-6)


def test_gaussian_blur_rejects_even_or_oversized_kernels():
  with pytest.raises(ValueError, match='odd'):
    augment.gaussian_blur(jax.random.key(0), _images(), 1.0, kernel_size=4)
  with pytest.raises(ValueError, match='too large'):
    augment.gaussian_blur(jax.random.key(0), _images(), 1.0, kernel_size=2 * SIZE + 1)


def test_solarize():
  x = _images().at[:, 0, 0].set(0.25)  # values at the threshold are inverted, as in PIL
  solarize = _jit(augment.solarize)
  np.testing.assert_array_equal(solarize(jax.random.key(14), x, 1.0),
                                jnp.where(x >= 0.5, 1 - x, x))
  np.testing.assert_array_equal(_jit(augment.solarize, threshold=0.25)(
      jax.random.key(14), x, 1.0), jnp.where(x >= 0.25, 1 - x, x))
  np.testing.assert_array_equal(solarize(jax.random.key(14), x, 0.0), x)


def test_homography_maps_the_moved_corners_back():
  start = jnp.array([[0., 0.], [31., 0.], [31., 31.], [0., 31.]]) / 15.5 - 1
  end = jnp.array([[2., 3.], [29., 1.], [30., 28.], [3., 30.]]) / 15.5 - 1
  h = np.asarray(augment._homography(start, end), np.float64)
  for (ex, ey), (sx, sy) in zip(np.asarray(end), np.asarray(start)):
    d = h[6] * ex + h[7] * ey + 1
    np.testing.assert_allclose([(h[0] * ex + h[1] * ey + h[2]) / d,
                                (h[3] * ex + h[4] * ey + h[5]) / d], [sx, sy], atol=1e-5)


def test_perspective_without_distortion_is_the_identity():
  x = _images()
  y = _jit(augment.random_perspective, probability=1.0, distortion=0.0)(
      jax.random.key(15), x)
  np.testing.assert_allclose(y, x, atol=1e-5)


def test_perspective_distorts_with_zero_fill():
  x = _images(batch=16)
  warp = _jit(augment.random_perspective, distortion=0.5)
  y = np.asarray(warp(jax.random.key(16), x, 1.0))
  assert (np.abs(y - np.asarray(x)).mean(axis=(1, 2, 3)) > 1e-2).all()
  assert y.min() >= 0.0 and y.max() <= 1.0
  ones = np.asarray(warp(jax.random.key(16), jnp.ones_like(x), 1.0))
  # Pixels outside the moved corners sample outside the image: black; the centre stays.
  assert ((ones < 0.5).all(-1).sum(axis=(1, 2)) > 0).mean() > 0.9
  np.testing.assert_allclose(ones[:, SIZE // 2, SIZE // 2], 1.0, atol=1e-5)
  np.testing.assert_array_equal(warp(jax.random.key(16), x, 0.0), x)


MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
_OFF = dict(blur=0.0, solarize=0.0, perspective=0.0, erasing=0.0, jitter=0.0,
            grayscale=0.0)


def _views(recipe='asymmetric', channels=3):
  return jax.jit(functools.partial(augment.barlow_twins_views, mean=MEAN[:channels],
                                   std=STD[:channels], recipe=recipe))


@pytest.mark.parametrize('channels', [3, 1])
def test_barlow_twins_views(channels):
  x = _images(channels)
  views = _views(channels=channels)
  view_a, view_b = views(jax.random.key(10), x)
  low = -np.asarray(MEAN[:channels]) / STD[:channels]
  high = (1 - np.asarray(MEAN[:channels])) / STD[:channels]
  plain = augment.normalize(x, MEAN[:channels], STD[:channels])
  for view in (view_a, view_b):
    assert view.shape == x.shape and view.dtype == jnp.float32
    assert (np.asarray(view) >= low - 1e-5).all() and (np.asarray(view) <= high + 1e-5).all()
    assert bool((jnp.abs(view - plain).mean(axis=(1, 2, 3)) > 1e-2).all())
  assert bool((jnp.abs(view_a - view_b).mean(axis=(1, 2, 3)) > 1e-2).all())
  again_a, again_b = views(jax.random.key(10), x)
  np.testing.assert_array_equal(again_a, view_a)
  np.testing.assert_array_equal(again_b, view_b)
  other_a, other_b = views(jax.random.key(11), x)
  assert not np.array_equal(other_a, view_a) and not np.array_equal(other_b, view_b)


def test_erasing_happens_after_normalisation():
  only_erasing = augment.ViewRecipe(**{**_OFF, 'erasing': 1.0})
  x = jnp.full((8, SIZE, SIZE, 3), 0.9)
  view_a, view_b = _views((only_erasing, only_erasing))(jax.random.key(17), x)
  kept = (0.9 - np.asarray(MEAN)) / STD
  for view in (view_a, view_b):
    boxes = _zero_boxes(view)  # every image has one filled box of exact zeros (mean colour)
    assert len(boxes) == len(x)
    outside = np.asarray(view)[(np.asarray(view) != 0).all(-1)]
    np.testing.assert_allclose(outside, np.broadcast_to(kept, outside.shape), atol=1e-4)
    # Erasing before normalising would have left -mean / std in the box.
    assert not np.isclose(view, -np.asarray(MEAN) / STD, atol=1e-3).all(-1).any()


def _bright_checkerboards(batch):
  """Gray images whose every pixel is >= 0.55, so any solarised image is <= 0.45."""
  board = (np.indices((SIZE, SIZE)).sum(0) % 2)[..., None]
  levels = np.linspace(0.0, 1.0, batch)[:, None, None, None]
  return jnp.asarray(0.55 + 0.4 * board * np.ones((batch, 1, 1, 3)) * (0.5 + 0.5 * levels),
                     jnp.float32)


def test_asymmetric_views_blur_a_and_solarise_b():
  recipe_a, recipe_b = augment.BT_VIEWS['asymmetric']
  assert (recipe_a.blur, recipe_a.solarize, recipe_b.blur, recipe_b.solarize) == (
      1.0, 0.0, 0.1, 0.2)
  assert recipe_a.erasing != recipe_b.erasing
  for recipe in (recipe_a, recipe_b):
    assert (recipe.jitter, recipe.grayscale, recipe.perspective) == (0.8, 0.2, 0.5)
  x = _bright_checkerboards(64)
  # Only each view's own blur and solarisation on (crop and flip always run), identity
  # normalisation; the same key with blur off gives the unblurred counterparts.
  identity = functools.partial(augment.barlow_twins_views, mean=(0.0,) * 3, std=(1.0,) * 3)

  def only(blur):
    return tuple(augment.ViewRecipe(**{**_OFF, 'blur': blur and r.blur, 'solarize': r.solarize})
                 for r in (recipe_a, recipe_b))

  views = jax.jit(functools.partial(identity, recipe=only(True)))(jax.random.key(18), x)
  unblurred = jax.jit(functools.partial(identity, recipe=only(False)))(jax.random.key(18), x)
  solarised = [np.asarray(v).max(axis=(1, 2, 3)) <= 0.45 + 1e-5 for v in views]
  assert all(((np.asarray(v).min(axis=(1, 2, 3)) >= 0.55 - 1e-5) | s).all()
             for v, s in zip(views, solarised))
  assert not solarised[0].any()
  # Binomial(64, 0.2): mean 12.8, sd 3.2; the key is fixed, so this cannot flake.
  assert 4 <= solarised[1].sum() <= 24
  blurred = [(np.asarray(v) != np.asarray(u)).any(axis=(1, 2, 3))
             for v, u in zip(views, unblurred)]
  # A blurs every image, but a sigma near 0.1 leaves a float32 image unchanged (about 5%).
  assert blurred[0].sum() >= 56
  assert blurred[1].sum() <= 16


def test_symmetric_recipe_reproduces_the_older_views_with_erasing_after_normalising():
  recipe_a, recipe_b = augment.BT_VIEWS['symmetric']
  assert recipe_a == recipe_b == augment.ViewRecipe(blur=0.0, solarize=0.0, perspective=0.0,
                                                    erasing=0.5)
  x = _images()

  @jax.jit
  def older_views(key):
    # The pipeline before the recipes, with a sentinel fill to locate the erased boxes.
    views = []
    for view_key in jax.random.split(key):
      crop_key, flip_key, jitter_key, gray_key, erase_key = jax.random.split(view_key, 5)
      y = augment.random_resized_crop(crop_key, x)
      y = jax.vmap(pix.random_flip_left_right)(jax.random.split(flip_key, len(x)), y)
      y = augment.random_grayscale(gray_key, augment.color_jitter(jitter_key, y))
      views.append(augment.random_erasing(erase_key, y, value=-1.0))
    return views

  erased_any = []
  for old, new in zip(older_views(jax.random.key(19)), _views('symmetric')(
      jax.random.key(19), x)):
    box = np.asarray(old == -1.0).all(-1, keepdims=True)
    expected = np.where(box, 0.0, augment.normalize(old, MEAN, STD))
    np.testing.assert_allclose(new, expected, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(new)[np.broadcast_to(box, new.shape)], 0.0)
    erased_any.append(box.any(axis=(1, 2, 3)))
  assert np.concatenate(erased_any).any() and not np.concatenate(erased_any).all()


def test_unknown_recipe_names_the_config_field():
  with pytest.raises(ValueError, match=r"search\.bt_views.*'asymmetric', 'symmetric'"):
    augment.barlow_twins_views(jax.random.key(0), _images(), MEAN, STD, recipe='strong')


def test_view_recipe_probabilities_are_checked():
  with pytest.raises(ValueError, match='ViewRecipe.blur'):
    augment.ViewRecipe(blur=1.5, solarize=0.0, perspective=0.0, erasing=0.0)
  with pytest.raises(dataclasses.FrozenInstanceError):
    augment.BT_VIEWS['symmetric'][0].blur = 1.0


def test_saturation_and_hue_match_dm_pix():
  # The same functions as dm_pix's (which pick the hue's case by equality with the channel
  # maximum, fragile across kernels that round differently), including exact ties.
  import dm_pix as pix  # pylint: disable=g-import-not-at-top
  x = _images(3)
  x = x.at[0, 0, 0].set(jnp.array([0.5, 0.5, 0.2])).at[0, 0, 1].set(jnp.array([0.3, 0.3, 0.3]))
  x = x.at[0, 0, 2].set(jnp.array([0.1, 0.6, 0.6])).at[0, 0, 3].set(jnp.array([0.7, 0.2, 0.7]))
  for factor in (0.0, 0.6, 1.3):
    np.testing.assert_allclose(augment.adjust_saturation(x, factor),
                               pix.adjust_saturation(x, factor), atol=1e-6)
  for delta in (-0.1, 0.0, 0.07):
    np.testing.assert_allclose(augment.adjust_hue(x, delta), pix.adjust_hue(x, delta),
                               atol=1e-6)
