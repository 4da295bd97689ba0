"""On-device augmentation: static-shape, per-sample keyed transforms of NHWC batches.

Images are float32 in [0, 1] unless a function says otherwise; every random
transform splits its key once per sample, so results depend only on (key, batch)
and the functions run unchanged under `jax.jit` with a static batch size.
"""

import functools
import math
from typing import Sequence, Tuple

import dm_pix as pix
import jax
import jax.numpy as jnp


def to_float(images_uint8: jax.Array, dtype=jnp.float32) -> jax.Array:
  """Converts uint8 images to floats in [0, 1] (float32 unless `dtype` says otherwise)."""
  return jnp.asarray(images_uint8, dtype) / 255.0


def normalize(x: jax.Array, mean: Sequence[float],
              std: Sequence[float]) -> jax.Array:
  """Standardises each channel with the dataset's mean and std."""
  return (x - jnp.asarray(mean, x.dtype)) / jnp.asarray(std, x.dtype)


def _per_sample(fn, key, x, **kwargs):
  """Maps `fn(key, image, **kwargs)` over the batch with one key per image."""
  keys = jax.random.split(key, x.shape[0])
  return jax.vmap(functools.partial(fn, **kwargs))(keys, x)


def _box_mask(shape, top, left, height, width):
  """A (H, W, 1) mask of rows [top, top + height) and columns [left, left + width)."""
  rows = jnp.arange(shape[0])[:, None, None]
  cols = jnp.arange(shape[1])[None, :, None]
  return ((rows >= top) & (rows < top + height) & (cols >= left) &
          (cols < left + width))


def _crop_flip_one(key, image, padding):
  crop_key, flip_key = jax.random.split(key)
  height, width, channels = image.shape
  padded = jnp.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  top, left = jax.random.randint(crop_key, (2,), 0, 2 * padding + 1)
  image = jax.lax.dynamic_slice(padded, (top, left, 0),
                                (height, width, channels))
  return pix.random_flip_left_right(flip_key, image)


def random_crop_flip(key: jax.Array, x: jax.Array,
                     padding: int = 4) -> jax.Array:
  """Random crop of the zero-padded image plus horizontal flip with p 0.5 (DARTS)."""
  return _per_sample(_crop_flip_one, key, x, padding=padding)


def _cutout_one(key, image, size):
  centre_y, centre_x = jax.random.randint(key, (2,), 0,
                                          jnp.array(image.shape[:2]))
  # DARTS's box spans centre +- size // 2 and is clipped at the borders, so
  # boxes near an edge are smaller.
  half = size // 2
  mask = _box_mask(image.shape, centre_y - half, centre_x - half, 2 * half,
                   2 * half)
  return jnp.where(mask, jnp.zeros_like(image), image)


def cutout(key: jax.Array, x: jax.Array, size: int = 16) -> jax.Array:
  """Zeroes one size x size square per image, centred uniformly (DARTS cutout).

  Apply it after `normalize`, as DARTS does, so the square is the mean colour.
  """
  return _per_sample(_cutout_one, key, x, size=size)


def _resized_crop_one(key, image, scale, ratio):
  area_key, ratio_key, position_key = jax.random.split(key, 3)
  height, width, _ = image.shape
  area = height * width * jax.random.uniform(
      area_key, minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(
      ratio_key, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  # torchvision resamples boxes that do not fit; clipping keeps shapes static
  # at the cost of slightly squarer large crops.
  size = jnp.stack([jnp.clip(jnp.sqrt(area / aspect), 1.0, height),
                    jnp.clip(jnp.sqrt(area * aspect), 1.0, width)])
  corner = jax.random.uniform(position_key, (2,)) * (
      jnp.array([height, width]) - size)
  zoom = jnp.array([height, width]) / size
  resized = jax.image.scale_and_translate(
      image, image.shape, (0, 1), zoom, -corner * zoom, method='linear',
      antialias=False)
  return jnp.clip(resized, 0.0, 1.0)  # rounding can step just outside


def random_resized_crop(key: jax.Array, x: jax.Array,
                        scale: Tuple[float, float] = (0.08, 1.0),
                        ratio: Tuple[float, float] = (3 / 4, 4 / 3)) -> jax.Array:
  """Crops a box of random area fraction and aspect ratio, resized back bilinearly."""
  return _per_sample(_resized_crop_one, key, x, scale=scale, ratio=ratio)


def _color_jitter_one(key, image, probability, brightness, contrast,
                      saturation, hue):
  apply_key, b_key, c_key, s_key, h_key = jax.random.split(key, 5)

  def factor(k, strength):
    return jax.random.uniform(k, minval=max(0.0, 1 - strength),
                              maxval=1 + strength)

  # Brightness is multiplicative as in torchvision (pix's is additive).
  jittered = jnp.clip(image * factor(b_key, brightness), 0.0, 1.0)
  jittered = jnp.clip(pix.adjust_contrast(jittered, factor(c_key, contrast)),
                      0.0, 1.0)
  if image.shape[-1] == 3:
    jittered = pix.adjust_saturation(jittered, factor(s_key, saturation))
    jittered = pix.adjust_hue(
        jittered, jax.random.uniform(h_key, minval=-hue, maxval=hue))
  jittered = jnp.clip(jittered, 0.0, 1.0)
  return jnp.where(jax.random.bernoulli(apply_key, probability), jittered,
                   image)


def color_jitter(key: jax.Array, x: jax.Array, probability: float = 0.8,
                 brightness: float = 0.4, contrast: float = 0.4,
                 saturation: float = 0.2, hue: float = 0.1) -> jax.Array:
  """With the given probability, jitters brightness, contrast, saturation and hue.

  The four adjustments run in this fixed order; saturation and hue are skipped
  for single-channel images.
  """
  return _per_sample(_color_jitter_one, key, x, probability=probability,
                     brightness=brightness, contrast=contrast,
                     saturation=saturation, hue=hue)


def _grayscale_one(key, image, probability):
  gray = pix.rgb_to_grayscale(image, keep_dims=True)
  return jnp.where(jax.random.bernoulli(key, probability), gray, image)


def random_grayscale(key: jax.Array, x: jax.Array,
                     probability: float = 0.2) -> jax.Array:
  """With the given probability, replaces RGB by its luma, kept as 3 channels."""
  if x.shape[-1] != 3:
    return x
  return _per_sample(_grayscale_one, key, x, probability=probability)


def _erasing_one(key, image, probability, scale, ratio, value):
  apply_key, area_key, ratio_key, position_key = jax.random.split(key, 4)
  height, width, _ = image.shape
  area = height * width * jax.random.uniform(
      area_key, minval=scale[0], maxval=scale[1])
  aspect = jnp.exp(jax.random.uniform(
      ratio_key, minval=math.log(ratio[0]), maxval=math.log(ratio[1])))
  box = jnp.stack([jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, height),
                   jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, width)])
  corner = jnp.floor(jax.random.uniform(position_key, (2,)) *
                     (jnp.array([height, width]) - box + 1))
  mask = _box_mask(image.shape, corner[0], corner[1], box[0], box[1])
  erased = jnp.where(mask, jnp.asarray(value, image.dtype), image)
  return jnp.where(jax.random.bernoulli(apply_key, probability), erased, image)


def random_erasing(key: jax.Array, x: jax.Array, probability: float = 0.5,
                   scale: Tuple[float, float] = (0.02, 0.33),
                   ratio: Tuple[float, float] = (0.3, 3.3),
                   value: float = 0.0) -> jax.Array:
  """With the given probability, fills a box of random area and aspect with value."""
  return _per_sample(_erasing_one, key, x, probability=probability,
                     scale=scale, ratio=ratio, value=value)


def barlow_twins_view(key: jax.Array, x: jax.Array) -> jax.Array:
  """One Barlow Twins view at CIFAR scale: crop, flip, jitter, grayscale, erasing."""
  crop_key, flip_key, jitter_key, gray_key, erase_key = jax.random.split(key, 5)
  x = random_resized_crop(crop_key, x)
  x = _per_sample(pix.random_flip_left_right, flip_key, x)
  x = color_jitter(jitter_key, x)
  x = random_grayscale(gray_key, x)
  return random_erasing(erase_key, x)


def barlow_twins_views(key: jax.Array,
                       x: jax.Array) -> Tuple[jax.Array, jax.Array]:
  """Two independently augmented views of the same batch."""
  key_a, key_b = jax.random.split(key)
  return barlow_twins_view(key_a, x), barlow_twins_view(key_b, x)
