"""Optimisers and learning-rate schedules, for the search (weights, architecture, projector)
and for training: one config sub-dict per optimiser, one chain (the DARTS family's recipes).

A sub-dict (`defaults.optimizer`) holds `name` ('sgd' or 'adam'), `lr`, `schedule`
('constant' or 'cosine'), `lr_min`, `momentum` (sgd), `b1`, `b2` (adam), `weight_decay` and
`grad_clip` (global norm; 0 disables).
"""

import math
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import optax

NAMES = ('sgd', 'adam')
SCHEDULES = ('constant', 'cosine')


def cosine_epoch_schedule(lr: float, lr_min: float, epochs: int,
                          steps_per_epoch: int) -> Callable:
  """PyTorch's CosineAnnealingLR stepped once per epoch (as DARTS does), as a function of the
  optimiser step; constant at `lr_min` after `epochs`."""
  def schedule(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs)
    return lr_min + 0.5 * (lr - lr_min) * (1 + jnp.cos(jnp.pi * epoch / epochs))
  return schedule


def schedule(cfg, epochs: int = 1, steps_per_epoch: int = 1) -> Callable:
  """The learning rate of sub-dict `cfg` at an optimiser step."""
  if cfg.schedule == 'cosine':
    return cosine_epoch_schedule(cfg.lr, cfg.lr_min, epochs, steps_per_epoch)
  return optax.constant_schedule(cfg.lr)


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
  """PyTorch's `clip_grad_norm_`, as the reference code clips: the gradients times
  min(1, max_norm / (norm + 1e-6)). `optax.clip_by_global_norm` scales by max_norm / norm,
  so a run compared step by step with the reference would drift from it."""

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(max_norm / (norm + 1e-6), 1.0)
    return jax.tree_util.tree_map(lambda g: g * scale.astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make(cfg, epochs: int = 1, steps_per_epoch: int = 1
         ) -> Tuple[optax.GradientTransformation, Callable]:
  """(optimiser, schedule) of sub-dict `cfg`: gradients clipped, then coupled weight decay
  (added to the gradient, as PyTorch's SGD and Adam do), then SGD with momentum or Adam."""
  lr = schedule(cfg, epochs, steps_per_epoch)
  parts = [clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.add_decayed_weights(cfg.weight_decay))
  if cfg.name == 'adam':
    parts.append(optax.adam(lr, b1=cfg.b1, b2=cfg.b2))
  else:
    parts.append(optax.sgd(lr, momentum=cfg.momentum))
  return optax.chain(*parts), lr


def check(cfg, option: str) -> None:
  """Validates sub-dict `cfg` (named `option` in messages)."""
  if cfg.name not in NAMES:
    raise ValueError(f'{option}.name must be one of {list(NAMES)}, got {cfg.name!r}.')
  if cfg.schedule not in SCHEDULES:
    raise ValueError(f'{option}.schedule must be one of {list(SCHEDULES)}, '
                     f'got {cfg.schedule!r}.')
  for field in ('lr', 'lr_min', 'momentum', 'weight_decay', 'grad_clip', 'b1', 'b2'):
    value = cfg[field]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0):
      raise ValueError(f'{option}.{field} must be a finite number >= 0, got {value!r}.')
  if not cfg.lr > 0:
    raise ValueError(f'{option}.lr must be > 0, got {cfg.lr!r}.')
  for field in ('b1', 'b2'):
    if not 0 <= cfg[field] < 1:
      raise ValueError(f'{option}.{field} must be in [0, 1), got {cfg[field]!r}.')
