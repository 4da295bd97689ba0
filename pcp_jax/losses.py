"""Losses and metrics: cross-entropy, accuracy, Barlow Twins and the paper's arch-loss mix."""

import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from pcp_jax import kernels

# BatchNorm's epsilon: Barlow Twins normalises the embeddings with an affine-free BatchNorm.
_BN_EPSILON = 1e-5


def cross_entropy(logits, labels):
  """Mean softmax cross-entropy over the batch with integer labels, in float32 or wider."""
  logits = kernels.upcast(logits)
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels):
  """Fraction of examples whose arg-max logit is the label."""
  return jnp.mean(jnp.argmax(logits, axis=-1) == labels, dtype=jnp.float32)


def classification_sums(logits, labels, mask):
  """Summed CE, correct and top-5 correct counts over the examples where `mask` is 1: an
  evaluation batch's contribution (padded batches mask their padding out)."""
  logits = kernels.upcast(logits)
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], -1)
  return {'loss': jnp.sum(per_example * mask),
          'accuracy': jnp.sum((jnp.argmax(logits, axis=-1) == labels) * mask),
          'top5_accuracy': jnp.sum(top5 * mask)}


def _normalize_along_batch(z, axis_name):
  """Zero mean, unit (biased) variance per feature, as a BatchNorm without scale and bias."""
  mean = jnp.mean(z, axis=0)
  if axis_name is not None:
    mean = jax.lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(z - mean), axis=0)
  if axis_name is not None:
    # Equal per-device batches, so the mean of the local variances about the global mean
    # is the global variance.
    var = jax.lax.pmean(var, axis_name)
  return (z - mean) * jax.lax.rsqrt(var + _BN_EPSILON)


def barlow_twins_loss(z_a, z_b, lambd: float = 0.0051, axis_name: Optional[str] = None):
  """Barlow Twins redundancy-reduction loss of two (batch, dim) embeddings of the same images.

  Args:
    z_a, z_b: projector outputs of the two views, shape (B, D); computed in float32 or wider.
    lambd: weight of the off-diagonal terms (0.0051 was tuned for D=8192; scale it for a
      smaller D, since the loss grows with D).
    axis_name: the mapped axis of a data-parallel step (pmap / shard_map / vmap). The
      normalisation statistics and the cross-correlation are then taken over the global
      batch, so the loss equals the single-device loss on the concatenated batch. Every
      device must hold the same number of examples.

  Returns:
    sum_i (1 - C_ii)^2 + lambd * sum_{i != j} C_ij^2 with C the cross-correlation matrix.
  """
  if z_a.ndim != 2 or z_a.shape != z_b.shape:
    raise ValueError(
        f'barlow_twins_loss needs two (batch, dim) arrays of one shape, got {z_a.shape} '
        f'and {z_b.shape}.')
  z_a = _normalize_along_batch(kernels.upcast(z_a), axis_name)
  z_b = _normalize_along_batch(kernels.upcast(z_b), axis_name)
  # HIGHEST: accelerators may otherwise run float32 matmuls in TF32/bf16, and the diagonal
  # terms (1 - C_ii)^2 are small differences of numbers close to 1.
  c = jnp.matmul(z_a.T, z_b, precision=jax.lax.Precision.HIGHEST) / z_a.shape[0]
  if axis_name is not None:
    c = jax.lax.pmean(c, axis_name)
  diagonal = jnp.diagonal(c)
  # Mask rather than subtract the diagonal from sum(C^2): the subtraction cancels
  # catastrophically in float32 for large D.
  off_diagonal = jnp.where(jnp.eye(c.shape[0], dtype=bool), 0.0, c)
  return jnp.sum(jnp.square(1.0 - diagonal)) + lambd * jnp.sum(jnp.square(off_diagonal))


def mixed_arch_loss(ce, bt, ss_factor):
  """The paper's architecture loss ss_factor * L_BT + (1 - ss_factor) * L_CE.

  A Python/NumPy `ss_factor` of exactly 0 (or 1) returns `ce` (or `bt`) itself, so a
  non-finite unused term can neither leak into the value nor into the gradients
  (0 * NaN is NaN). A traced `ss_factor` always computes the full mix.
  """
  if isinstance(ss_factor, numbers.Real):
    if not 0.0 <= ss_factor <= 1.0:
      raise ValueError(f'ss_factor must lie in [0, 1], got {ss_factor}.')
    if ss_factor == 0:
      return ce
    if ss_factor == 1:
      return bt
  return ss_factor * bt + (1.0 - ss_factor) * ce
