"""On-device augmentation: static-shape, per-sample keyed transforms of NHWC batches.

Images are float32 in [0, 1] unless a function says otherwise; every random
transform splits its key once per sample, so results depend only on (key, batch)
and the functions run unchanged under `jax.jit` with a static batch size.
"""

import dataclasses
import functools
import math
from typing import Sequence, Tuple, Union

import dm_pix as pix
import jax
import jax.numpy as jnp
from jax.scipy import ndimage


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


def _rgb_to_hsv(image):
  """dm_pix's RGB -> HSV (hue, saturation, value planes), the hue's case chosen by comparing
  the channels with each other. dm_pix tests each channel for equality with their maximum;
  XLA may compute the maximum and the channel in kernels that round differently (seen on
  XLA:CPU at optimisation level 0, one kernel with fused multiply-adds, one without), and a
  pixel's hue then jumps by up to half a turn. Comparisons between the channels agree with
  themselves, ties go to red, then green, as in dm_pix, and near a tie both cases give the
  same hue."""
  red, green, blue = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.maximum(jnp.maximum(red, green), blue)
  range_ = value - jnp.minimum(jnp.minimum(red, green), blue)
  # Safe divisors: masked divisions by zero would still give NaN gradients.
  saturation = jnp.where(value > 0, range_ / jnp.where(value > 0, value, 1.0), 0.0)
  norm = 1.0 / (6.0 * jnp.where(range_ > 0, range_, 1.0))
  hue = jnp.where((red >= green) & (red >= blue), norm * (green - blue),
                  jnp.where(green >= blue, norm * (blue - red) + 2.0 / 6.0,
                            norm * (red - green) + 4.0 / 6.0))
  hue = jnp.where(range_ > 0, hue, 0.0) + (hue < 0.0)
  return hue, saturation, value


def adjust_saturation(image, factor):
  """`pix.adjust_saturation` on an RGB image, through `_rgb_to_hsv`."""
  hue, saturation, value = _rgb_to_hsv(image)
  saturation = jnp.clip(saturation * jnp.asarray(factor, image.dtype), 0.0, 1.0)
  return pix.hsv_to_rgb(jnp.stack([hue, saturation, value], axis=-1))


def adjust_hue(image, delta):
  """`pix.adjust_hue` on an RGB image, through `_rgb_to_hsv`."""
  hue, saturation, value = _rgb_to_hsv(image)
  return pix.hsv_to_rgb(jnp.stack([(hue + delta) % 1.0, saturation, value], axis=-1))


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
    jittered = adjust_saturation(jittered, factor(s_key, saturation))
    jittered = adjust_hue(jittered, jax.random.uniform(h_key, minval=-hue, maxval=hue))
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


def _blur_kernel(sigma, kernel_size, dtype):
  radius = kernel_size // 2
  offsets = jnp.arange(-radius, radius + 1, dtype=dtype)
  weights = jnp.exp(-0.5 * jnp.square(offsets / sigma))
  return weights / jnp.sum(weights)


def _blur_image(image, sigma, kernel_size):
  """Separable Gaussian blur of one (H, W, C) image, reflect-padded as torchvision pads."""
  radius = kernel_size // 2
  height, width, _ = image.shape
  weights = _blur_kernel(sigma, kernel_size, image.dtype)
  padded = jnp.pad(image, ((radius, radius), (radius, radius), (0, 0)), mode='reflect')
  rows = sum(weights[i] * padded[i:i + height] for i in range(kernel_size))
  return sum(weights[j] * rows[:, j:j + width] for j in range(kernel_size))


def _blur_one(key, image, probability, sigma, kernel_size):
  apply_key, sigma_key = jax.random.split(key)
  dtype = jnp.promote_types(image.dtype, jnp.float32)
  drawn = jax.random.uniform(sigma_key, (), dtype, minval=sigma[0], maxval=sigma[1])
  blurred = jnp.clip(_blur_image(image.astype(dtype), drawn, kernel_size), 0.0, 1.0)
  return jnp.where(jax.random.bernoulli(apply_key, probability),
                   blurred.astype(image.dtype), image)


def gaussian_blur(key: jax.Array, x: jax.Array, probability: float,
                  sigma: Tuple[float, float] = (0.1, 2.0),
                  kernel_size: int = 3) -> jax.Array:
  """With the given probability, blurs each image with a sigma drawn uniformly from `sigma`.

  Barlow Twins/BYOL blur 224 px images with a 23 px kernel, about a tenth of the side;
  3 px is the same fraction of a CIFAR image. Sigma stays in pixels as in the reference, so
  large sigmas flatten the 3 px kernel towards a box filter. Borders are reflect-padded, so
  the image keeps its size and its edges keep their brightness (dm_pix's `gaussian_blur`
  zero-pads, darkening them).
  """
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f'gaussian_blur needs an odd positive kernel_size, got {kernel_size}')
  if kernel_size // 2 >= min(x.shape[1:3]):
    raise ValueError(f'kernel_size {kernel_size} is too large for {x.shape[1:3]} images '
                     '(reflect padding needs a radius below the image size)')
  return _per_sample(_blur_one, key, x, probability=probability,
                     sigma=tuple(sigma), kernel_size=kernel_size)


def _solarize_one(key, image, probability, threshold):
  solarized = jnp.where(image >= threshold, 1 - image, image)
  return jnp.where(jax.random.bernoulli(key, probability), solarized, image)


def solarize(key: jax.Array, x: jax.Array, probability: float,
             threshold: float = 0.5) -> jax.Array:
  """With the given probability, inverts every value >= threshold (x -> 1 - x), as PIL does."""
  return _per_sample(_solarize_one, key, x, probability=probability,
                     threshold=threshold)


def _homography(start, end):
  """The 8 coefficients of the projective map taking the 4 `end` points to `start`.

  (x, y) -> ((h0 x + h1 y + h2) / d, (h3 x + h4 y + h5) / d), d = h6 x + h7 y + 1.
  """
  ex, ey, sx, sy = end[:, 0], end[:, 1], start[:, 0], start[:, 1]
  zeros, ones = jnp.zeros_like(ex), jnp.ones_like(ex)
  a = jnp.concatenate([
      jnp.stack([ex, ey, ones, zeros, zeros, zeros, -sx * ex, -sx * ey], -1),
      jnp.stack([zeros, zeros, zeros, ex, ey, ones, -sy * ex, -sy * ey], -1)])
  return jnp.linalg.solve(a, jnp.concatenate([sx, sy]))


def _perspective_one(key, image, probability, distortion):
  apply_key, corner_key = jax.random.split(key)
  height, width, _ = image.shape
  dtype = jnp.promote_types(image.dtype, jnp.float32)
  # torchvision's RandomPerspective: each corner moves inward, independently in x and y,
  # by a whole number of pixels drawn uniformly from [0, int(distortion * (size // 2))].
  max_shift = jnp.array([int(distortion * (width // 2)), int(distortion * (height // 2))])
  shift = jax.random.randint(corner_key, (4, 2), 0, max_shift + 1)
  start = jnp.array([[0, 0], [width - 1, 0], [width - 1, height - 1], [0, height - 1]],
                    dtype)
  end = start + jnp.array([[1, 1], [-1, 1], [-1, -1], [1, -1]], dtype) * shift
  # Output pixels map back to the input through the homography end -> start, solved in
  # coordinates scaled to [-1, 1] so the 8x8 system stays well conditioned in float32.
  half = jnp.array([width - 1, height - 1], dtype) / 2
  h = _homography(start / half - 1, end / half - 1)
  # torchvision evaluates the map at pixel centres (index + 0.5) and grid_sample
  # (align_corners=False) reads the result back shifted by -0.5; kept for its semantics.
  u = (jnp.arange(width, dtype=dtype)[None, :] + 0.5) / half[0] - 1
  v = (jnp.arange(height, dtype=dtype)[:, None] + 0.5) / half[1] - 1
  d = h[6] * u + h[7] * v + 1
  src_x = ((h[0] * u + h[1] * v + h[2]) / d + 1) * half[0] - 0.5
  src_y = ((h[3] * u + h[4] * v + h[5]) / d + 1) * half[1] - 0.5
  # Bilinear with zeros outside, like grid_sample's padding_mode='zeros': samples straddling
  # the border blend with black.
  warp = lambda channel: ndimage.map_coordinates(channel, (src_y, src_x), order=1,
                                                 mode='constant', cval=0.0)
  warped = jax.vmap(warp, in_axes=-1, out_axes=-1)(image.astype(dtype))
  warped = jnp.clip(warped, 0.0, 1.0).astype(image.dtype)
  return jnp.where(jax.random.bernoulli(apply_key, probability), warped, image)


def random_perspective(key: jax.Array, x: jax.Array, probability: float,
                       distortion: float = 0.2) -> jax.Array:
  """With the given probability, warps each image by a random perspective (zero fill).

  torchvision's RandomPerspective semantics: every corner moves inward by up to
  `distortion` times half the side and the image is resampled bilinearly through the
  homography between the moved and the original corners; distortion 0 is the identity.
  """
  return _per_sample(_perspective_one, key, x, probability=probability,
                     distortion=distortion)


@dataclasses.dataclass(frozen=True)
class ViewRecipe:
  """Per-image probabilities of the optional steps of one Barlow Twins view.

  Resized crop and flip always run. Hashable, so it can be a static `jax.jit` argument.
  """
  blur: float
  solarize: float
  perspective: float
  erasing: float
  jitter: float = 0.8
  grayscale: float = 0.2

  def __post_init__(self):
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f'ViewRecipe.{field.name} is a probability in [0, 1], got {value}')


_SYMMETRIC = ViewRecipe(blur=0.0, solarize=0.0, perspective=0.0, erasing=0.5)

# search.bt_views names one of these (view A, view B) pairs.
BT_VIEWS = {
    # The Barlow Twins reference (facebookresearch/barlowtwins) makes the views asymmetric:
    # blur always on A and with p 0.1 on B, solarisation only on B (p 0.2); jitter 0.8 and
    # grayscale 0.2 on both. The paper adds a "random distortion" without a probability:
    # 0.5 on both views (torchvision RandomPerspective's default). It erases "with different
    # probabilities" without giving them: A keeps torchvision RandomErasing's default 0.5 and
    # B gets half, so a pair has both views occluded one time in eight rather than one in
    # four, and B (the lightly blurred view) is the one more often seen whole.
    'asymmetric': (ViewRecipe(blur=1.0, solarize=0.0, perspective=0.5, erasing=0.5),
                   ViewRecipe(blur=0.1, solarize=0.2, perspective=0.5, erasing=0.25)),
    # The views before the asymmetric recipe, one recipe twice, to reproduce older runs.
    'symmetric': (_SYMMETRIC, _SYMMETRIC),
}

# The blur, solarisation and perspective keys are folded off the view key with this constant
# so the five keys of the older views (crop, flip, jitter, grayscale, erasing) stay what they
# were. A small constant would collide: under JAX's partitionable threefry,
# fold_in(key, i) equals split(key, n)[i].
_EXTRA_KEYS = 0x62747677


def _view_recipes(recipe):
  if isinstance(recipe, str):
    if recipe not in BT_VIEWS:
      raise ValueError(f'search.bt_views must be one of {sorted(BT_VIEWS)}, got {recipe!r}')
    return BT_VIEWS[recipe]
  recipes = tuple(recipe)
  if len(recipes) != 2 or not all(isinstance(r, ViewRecipe) for r in recipes):
    raise ValueError(f'expected a name in {sorted(BT_VIEWS)} or two ViewRecipes, got {recipe!r}')
  return recipes


def barlow_twins_view(key: jax.Array, x: jax.Array, mean: Sequence[float],
                      std: Sequence[float], recipe: ViewRecipe) -> jax.Array:
  """One normalised Barlow Twins view of a batch in [0, 1], at CIFAR scale.

  Order: resized crop, flip, colour jitter, grayscale, blur, solarise, perspective,
  `normalize`, erasing. Erasing fills with 0.0 after normalising, so a box is the dataset's
  mean colour, as DARTS cutout and torchvision's RandomErasing after Normalize give, not
  black. Steps with probability 0 are left out of the trace; that changes no value.
  """
  crop_key, flip_key, jitter_key, gray_key, erase_key = jax.random.split(key, 5)
  blur_key, solarize_key, perspective_key = jax.random.split(
      jax.random.fold_in(key, _EXTRA_KEYS), 3)
  x = random_resized_crop(crop_key, x)
  x = _per_sample(pix.random_flip_left_right, flip_key, x)
  if recipe.jitter > 0:
    x = color_jitter(jitter_key, x, probability=recipe.jitter)
  if recipe.grayscale > 0:
    x = random_grayscale(gray_key, x, probability=recipe.grayscale)
  if recipe.blur > 0:
    x = gaussian_blur(blur_key, x, probability=recipe.blur)
  if recipe.solarize > 0:
    x = solarize(solarize_key, x, probability=recipe.solarize)
  if recipe.perspective > 0:
    x = random_perspective(perspective_key, x, probability=recipe.perspective)
  x = normalize(x, mean, std)
  if recipe.erasing > 0:
    x = random_erasing(erase_key, x, probability=recipe.erasing, value=0.0)
  return x


def barlow_twins_views(
    key: jax.Array, x: jax.Array, mean: Sequence[float], std: Sequence[float],
    recipe: Union[str, Tuple[ViewRecipe, ViewRecipe]] = 'asymmetric'
) -> Tuple[jax.Array, jax.Array]:
  """Two normalised, independently keyed views of a batch in [0, 1]; do not normalise again.

  `recipe` is a name in `BT_VIEWS` (the config's search.bt_views) or a (view A, view B) pair
  of `ViewRecipe`s; it must be static under `jax.jit`. 'asymmetric' follows Barlow Twins.
  'symmetric' draws identically distributed views (no blur, solarisation or distortion);
  erasing comes after normalisation, so an erased box is the mean colour.
  """
  recipe_a, recipe_b = _view_recipes(recipe)
  key_a, key_b = jax.random.split(key)
  return (barlow_twins_view(key_a, x, mean, std, recipe_a),
          barlow_twins_view(key_b, x, mean, std, recipe_b))
