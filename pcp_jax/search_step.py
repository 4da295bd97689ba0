"""The paper's search step: first-order bilevel updates of a PC-DARTS supernet.

One step (`search_step`) is an architecture step on a validation batch, then a weight step on
a training batch. The architecture weights (alphas, betas) descend `ss_factor * BT + (1 -
ss_factor) * CE` (SS PCP-DARTS; `mix_arch_gradients`), BT being Barlow Twins on two views of
the batch through a projector; the network weights descend CE. During the architecture
warm-up the architecture is frozen (`HParams.update_arch` False).
"""

import dataclasses
import math
from typing import Any, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import optax

from pcp_jax import augment
from pcp_jax import defaults
from pcp_jax import genotypes
from pcp_jax import heads
from pcp_jax import kernels
from pcp_jax import losses
from pcp_jax import models
from pcp_jax import optim
from pcp_jax import parallel
from pcp_jax import supernet


BT_SCALES = ('none', 'dim', 'balance')
DTYPES = ('float32', 'float64')


def check_config(config):
  """Validates the step's fields of `config.search` (the dtype, self-supervision and
  optimiser fields), naming the option and the allowed values."""
  cfg = config.search
  kernel_set = models.select_kernels(config.get('op_impl', 'auto'))
  if not 0.0 <= cfg.ss_factor <= 1.0:
    raise ValueError(f'search.ss_factor must be in [0, 1], got {cfg.ss_factor}.')
  if cfg.dtype not in DTYPES:
    raise ValueError(f'search.dtype must be one of {list(DTYPES)}, got {cfg.dtype!r}.')
  if cfg.dtype == 'float64' and not jax.config.jax_enable_x64:
    raise ValueError("search.dtype='float64' needs float64 arrays in JAX: set "
                     'JAX_ENABLE_X64=1 (or jax.config.update("jax_enable_x64", True)).')
  if cfg.dtype == 'float64' and kernel_set.name != 'xla':
    raise ValueError("search.dtype='float64' needs op_impl='xla' (the CPU wing computes in "
                     f'float32), got op_impl={config.get("op_impl", "auto")!r}.')
  if cfg.bt_scale not in BT_SCALES:
    raise ValueError(f'search.bt_scale must be one of {list(BT_SCALES)}, got {cfg.bt_scale!r}.')
  if cfg.bt_views not in augment.BT_VIEWS:
    raise ValueError(f'search.bt_views must be one of {list(augment.BT_VIEWS)}, '
                     f'got {cfg.bt_views!r}.')
  defaults.check_fields(
      config, booleans=('search.shared_channels', 'search.projector_warmup', 'search.augment',
                        'search.bt_augment'),
      at_least_zero=('search.bt_lambda',))
  sizes = cfg.projector_sizes
  if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
    raise ValueError(f'search.projector_sizes must be whole numbers >= 1 (the layer widths), '
                     f'got {sizes!r}.')
  for name in ('weights', 'arch', 'projector'):
    optim.check(cfg.optim[name], f'search.optim.{name}')


@flax.struct.dataclass
class SearchState:
  step: jax.Array
  params: Any
  batch_stats: Any
  arch: Any
  projector: Any  # {'params', 'batch_stats'} of the Barlow Twins projector ({} without it)
  weight_opt: Any
  arch_opt: Any
  projector_opt: Any


@flax.struct.dataclass
class HParams:
  """The step's hyperparameters that change between epochs, traced (no recompile)."""
  skip_rate: Any  # skip-connect dropout rate (a float32 scalar)
  update_arch: Any  # a bool scalar: False during the warm-up (architecture frozen)
  # A population member's own (`population`; None: the spec's ss_factor, every op on):
  ss_factor: Any = None  # its ss_factor (a scalar)
  op_mask: Any = None  # {'normal', 'reduce'}: (14, NUM_OPS) booleans, its ops on


def skip_dropout_rate(rate, epoch, epochs, warmup_epochs):
  """P-DARTS skip-connect dropout schedule for epoch `epoch` of a stage."""
  if epoch < warmup_epochs:
    return rate * (epochs - epoch - 1) / epochs
  return rate * math.exp(-(epoch - warmup_epochs) * 0.2)


def epoch_hparams(stage, epoch: int) -> HParams:
  """The step's hyperparameters in epoch `epoch` of `stage` (a `search.stages` entry)."""
  rate = skip_dropout_rate(stage.skip_dropout, epoch, stage.epochs, stage.warmup_epochs)
  return HParams(skip_rate=jnp.float32(rate),
                update_arch=jnp.bool_(epoch >= stage.warmup_epochs))


def log_row(row: dict, stages: int, epochs: int) -> None:
  """A search epoch's lines in the log: the metrics, the collapse indicators, the genotype."""
  logging.info(
      'stage %d/%d epoch %d/%d: train CE %.4f acc %.4f | valid CE %.4f acc %.4f | '
      'arch loss %.4f (CE %.4f, BT %.4f; |grad| CE %.2e BT %.2e cos %.3f)%s | '
      'lr %.5f skip-drop %.3f | %.1fs', row['stage'], stages, row['epoch'], epochs,
      row['train_loss'], row['train_acc'], row['valid_loss'], row['valid_acc'],
      row['arch_loss'], row['arch_ce'], row['arch_bt'], row['arch_ce_grad_norm'],
      row['arch_bt_grad_norm'], row['arch_grad_cosine'],
      ' [arch frozen]' if row['arch_frozen'] else '', row['lr'], row['skip_dropout'],
      row['epoch_seconds'])
  logging.info('collapse: %s%d skip connection(s) in the normal cell, alpha entropy %.3f '
               '(normal) %.3f (reduce)',
               f"curvature {row['curvature']:.4g} | " if 'curvature' in row else '',
               row['skip_normal'], row['entropy_normal'], row['entropy_reduce'])
  logging.info('genotype = %s', genotypes.to_string(genotypes.from_dict(row['genotype'])))


# ---------------------------------------------------------------------------
# The step.


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static pieces of a stage's search step, bound once (`search.build_stage`).

  `ss_factor`, `bt_lambda`, `bt_scale`, `bt_views`, `shared_channels` and
  `projector_warmup` are the `search.*` fields of the same names (pcp_jax/defaults.py).
  `num_devices` > 1: the step runs on every device of a data-parallel step over
  `parallel.AXIS` and works on its slice of the global batch. `skip_dropout` False compiles
  the step without skip-connect dropout, for stages whose rate is 0 (the same function as
  rate 0, without drawing the masks).
  """
  model: supernet.SearchNetwork
  projector: heads.Projector
  tx_weights: optax.GradientTransformation
  tx_arch: optax.GradientTransformation
  tx_projector: optax.GradientTransformation
  mean: Sequence[float]
  std: Sequence[float]
  ss_factor: float = 0.0
  bt_lambda: float = 0.0051
  bt_scale: str = 'none'
  bt_views: str = 'asymmetric'
  shared_channels: bool = True
  projector_warmup: bool = False
  num_devices: int = 1
  skip_dropout: bool = True
  augment: bool = True
  bt_augment: bool = True

  @classmethod
  def from_config(cls, cfg, model, projector, optimizers, mean, std, num_devices=1,
                  skip_dropout=True):
    """The spec of a stage from `config.search`, its networks and (weights, arch, projector)
    optimisers."""
    tx_weights, tx_arch, tx_projector = optimizers
    return cls(model=model, projector=projector, tx_weights=tx_weights, tx_arch=tx_arch,
               tx_projector=tx_projector, mean=tuple(mean), std=tuple(std),
               ss_factor=float(cfg.ss_factor), bt_lambda=float(cfg.bt_lambda),
               bt_scale=cfg.bt_scale, bt_views=cfg.bt_views,
               shared_channels=bool(cfg.shared_channels),
               projector_warmup=bool(cfg.projector_warmup), num_devices=num_devices,
               skip_dropout=bool(skip_dropout), augment=bool(cfg.augment),
               bt_augment=bool(cfg.bt_augment))

  def local(self, x):
    return parallel.local_part(x, self.num_devices)

  def to_float(self, images_uint8):
    return augment.to_float(images_uint8, kernels.compute_dtype(self.model.dtype))


def _augment(spec: StepSpec, key, images_uint8):
  """A CE batch: cropped and flipped (unless `spec.augment` is off), normalised."""
  x = spec.to_float(images_uint8)
  if spec.augment:
    x = augment.random_crop_flip(key, x)
  return augment.normalize(x, spec.mean, spec.std)


def _forward(spec: StepSpec, params, arch, batch_stats, x, channel_key, dropout_key,
             skip_rate, op_mask=None):
  """Supernet forward in train mode; returns logits, pooled features, new batch stats."""
  (logits, features), new_vars = spec.model.apply(
      {'params': params, 'arch': arch, 'batch_stats': batch_stats}, x, train=True,
      skip_drop_rate=skip_rate, op_mask=op_mask,
      rngs={'channels': channel_key,
            'dropout': parallel.device_key(dropout_key, spec.num_devices),
            'noise': parallel.device_key(jax.random.fold_in(dropout_key, 1), spec.num_devices)},
      mutable=['batch_stats'])
  return logits, features, new_vars['batch_stats']


def _view_forwards(spec: StepSpec, params, arch, batch_stats, xs, key, skip_rate,
                   op_mask=None):
  """The supernet on a stack of batches (the CE batch and the BT views) as one vmapped call:
  BN statistics per batch. One channel sample for all of them when `spec.shared_channels`
  (the paper's identical networks), else one each; skip-connect dropout masks always differ.
  `arch` carries the stack axis too, so its gradient comes apart per batch."""
  n = xs.shape[0]
  k_channels, k_dropout = jax.random.split(key)
  channel_keys = (jnp.stack([k_channels] * n) if spec.shared_channels
                  else jax.random.split(k_channels, n))
  return jax.vmap(lambda a, x, kc, kd: _forward(spec, params, a, batch_stats, x, kc, kd,
                                                skip_rate, op_mask))(
      arch, xs, channel_keys, jax.random.split(k_dropout, n))


def _bt_loss(spec: StepSpec, proj_params, proj_stats, features):
  """Barlow Twins on the two views' features through the projector; new projector stats."""
  z, new = jax.vmap(lambda f: spec.projector.apply(
      {'params': proj_params, 'batch_stats': proj_stats}, f, train=True,
      mutable=['batch_stats']))(features)
  bt = losses.barlow_twins_loss(z[0], z[1], lambd=spec.bt_lambda,
                                axis_name=parallel.axis_name(spec.num_devices))
  return bt, jax.tree_util.tree_map(lambda t: t[-1], new['batch_stats'])


def _bt_views(spec: StepSpec, key, images):
  """The two BT views (both the normalised images when `spec.bt_augment` is off)."""
  x = spec.to_float(images)
  if not spec.bt_augment:
    x = spec.local(augment.normalize(x, spec.mean, spec.std))
    return x, x
  view_a, view_b = augment.barlow_twins_views(key, x, spec.mean, spec.std, spec.bt_views)
  return spec.local(view_a), spec.local(view_b)


def _tree_dot(a, b):
  return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                             jax.tree_util.tree_leaves(b)))


def mix_arch_gradients(g_ce, g_bt, ss_factor, bt_scale, bt_dim):
  """The architecture gradient of `ss_factor * BT + (1 - ss_factor) * CE` from its parts,
  with BT scaled as `bt_scale` says: 'none' (the paper), 'dim' (BT / `bt_dim`) or 'balance'
  (BT's gradient rescaled to the norm of CE's). Returns (gradient, BT's scale)."""
  if bt_scale == 'none':
    scale = 1.0
  elif bt_scale == 'dim':
    scale = 1.0 / bt_dim
  else:
    scale = optax.tree.norm(g_ce) / jnp.maximum(optax.tree.norm(g_bt), 1e-30)
  grads = jax.tree_util.tree_map(
      lambda c, b: losses.mixed_arch_loss(c, scale * b, ss_factor), g_ce, g_bt)
  return grads, scale


def arch_gradients(state: SearchState, xs, labels, key, skip_rate, spec: StepSpec,
                   op_mask=None):
  """The CE and BT parts of the architecture gradient, from one backward pass.

  `xs` stacks this device's CE batch and (with `ss_factor` > 0) the two BT views; `key`
  draws the forwards' channel samples and dropout masks. The parts flow through different
  batches of one vmapped forward, whose `arch` carries the stack axis, so the gradient comes
  apart per batch. Returns ((g_ce, g_bt, g_projector), (ce, bt, batch_stats, proj_stats)),
  gradients averaged over devices, losses this device's.
  """
  proj = state.projector

  def loss_fn(arch_stack, proj_params):
    logits, features, stats = _view_forwards(spec, state.params, arch_stack,
                                             state.batch_stats, xs, key, skip_rate, op_mask)
    batch_stats = jax.tree_util.tree_map(lambda t: t[0], stats)  # running stats: CE batch
    ce = losses.cross_entropy(logits[0], labels)
    if spec.ss_factor == 0:
      return ce, (ce, jnp.zeros_like(ce), batch_stats, {})
    bt, proj_stats = _bt_loss(spec, proj_params, proj['batch_stats'], features[1:])
    # Unit weights: the CE batch's gradient is CE's, the views' are BT's; mixed by the caller.
    return ce + bt, (ce, bt, batch_stats, proj_stats)

  arch_stack = jax.tree_util.tree_map(lambda a: jnp.stack([a] * xs.shape[0]), state.arch)
  (_, aux), (g_stack, g_proj) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
      arch_stack, proj.get('params', {}))
  g_ce = jax.tree_util.tree_map(lambda g: g[0], g_stack)
  g_bt = jax.tree_util.tree_map(lambda g: jnp.sum(g[1:], axis=0), g_stack)
  return parallel.mean((g_ce, g_bt, g_proj), spec.num_devices), aux


def arch_step(state: SearchState, images, labels, key, skip_rate, spec: StepSpec,
              ss_factor=None, op_mask=None):
  """Architecture step on a validation batch: updates only 'arch' (and the projector).

  Loss: `ss_factor * BT + (1 - ss_factor) * CE` (BT scaled per `spec.bt_scale`); CE on the
  usual crop/flip view, Barlow Twins on two stronger views through the projector (which the
  BT loss also trains). The CE and BT parts of the architecture gradient
  (`arch_gradients`) are mixed as the loss says; their norms and cosine are logged.
  `images`/`labels` are the global batch. `ss_factor` (a population member's, traced)
  replaces `spec.ss_factor` in the mix; `op_mask` as `SearchNetwork`'s.
  """
  ss_factor = spec.ss_factor if ss_factor is None else ss_factor
  k_aug, k_fwd, k_views = jax.random.split(key, 3)
  x = spec.local(_augment(spec, k_aug, images))
  xs = jnp.stack([x, *_bt_views(spec, k_views, images)]) if spec.ss_factor > 0 else x[None]
  (g_ce, g_bt, g_proj), (ce, bt, batch_stats, proj_stats) = arch_gradients(
      state, xs, spec.local(labels), k_fwd, skip_rate, spec, op_mask)
  bt_dim = spec.projector.sizes[-1]
  g_arch, bt_weight = mix_arch_gradients(g_ce, g_bt, ss_factor, spec.bt_scale, bt_dim)
  updates, arch_opt = spec.tx_arch.update(g_arch, state.arch_opt, state.arch)
  state = state.replace(arch=optax.apply_updates(state.arch, updates), arch_opt=arch_opt,
                        batch_stats=batch_stats)
  if spec.ss_factor > 0:
    state = _update_projector(state, jax.tree_util.tree_map(
        lambda g: ss_factor * bt_weight * g, g_proj), proj_stats, spec)
  loss_bt = bt / bt_dim if spec.bt_scale == 'dim' else bt
  metrics = parallel.mean({'arch_ce': ce, 'arch_bt': bt,
                           'arch_loss': losses.mixed_arch_loss(ce, loss_bt, ss_factor)},
                          spec.num_devices)
  ce_norm, bt_norm = optax.tree.norm(g_ce), optax.tree.norm(g_bt)
  cosine = _tree_dot(g_ce, g_bt) / jnp.maximum(ce_norm * bt_norm, 1e-30)
  return state, dict(metrics, arch_ce_grad_norm=ce_norm, arch_bt_grad_norm=bt_norm,
                     arch_grad_cosine=cosine)


def _update_projector(state, grads, proj_stats, spec: StepSpec):
  updates, projector_opt = spec.tx_projector.update(grads, state.projector_opt,
                                                    state.projector['params'])
  return state.replace(
      projector={'params': optax.apply_updates(state.projector['params'], updates),
                 'batch_stats': proj_stats},
      projector_opt=projector_opt)


def projector_warmup_step(state: SearchState, images, key, skip_rate, spec: StepSpec,
                          op_mask=None):
  """During the warm-up (architecture frozen): BT trains the projector alone on the
  supernet's features of the two views; the supernet and its BN statistics are untouched.
  The views are those the architecture step would draw from the same key."""
  _, k_fwd, k_views = jax.random.split(key, 3)
  xs = jnp.stack(_bt_views(spec, k_views, images))
  arch_stack = jax.tree_util.tree_map(lambda a: jnp.stack([a] * 2), state.arch)
  _, features, _ = _view_forwards(spec, state.params, arch_stack, state.batch_stats, xs, k_fwd,
                                  skip_rate, op_mask)
  features = jax.lax.stop_gradient(features)
  (bt, proj_stats), g_proj = jax.value_and_grad(
      lambda p: _bt_loss(spec, p, state.projector['batch_stats'], features), has_aux=True)(
          state.projector['params'])
  state = _update_projector(state, parallel.mean(g_proj, spec.num_devices), proj_stats, spec)
  return state, dict(_zero_arch_metrics(), arch_bt=parallel.mean(bt, spec.num_devices))


def weight_step(state: SearchState, images, labels, key, skip_rate, spec: StepSpec,
                op_mask=None):
  """Weight step on a training batch: CE, updates only 'params' (and BN statistics)."""
  k_aug, k_fwd = jax.random.split(key)
  x = spec.local(_augment(spec, k_aug, images))
  labels = spec.local(labels)
  k_channels, k_dropout = jax.random.split(k_fwd)

  def loss_fn(params):
    logits, _, batch_stats = _forward(spec, params, state.arch, state.batch_stats, x,
                                      k_channels, k_dropout, skip_rate, op_mask)
    return losses.cross_entropy(logits, labels), (batch_stats, losses.accuracy(logits, labels))

  (ce, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = parallel.mean(grads, spec.num_devices)
  updates, weight_opt = spec.tx_weights.update(grads, state.weight_opt, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, weight_opt=weight_opt)
  return state, parallel.mean({'train_loss': ce, 'train_acc': acc}, spec.num_devices)


ARCH_METRICS = ('arch_ce', 'arch_bt', 'arch_loss', 'arch_ce_grad_norm', 'arch_bt_grad_norm',
                'arch_grad_cosine')
METRICS = ARCH_METRICS + ('train_loss', 'train_acc')


def _zero_arch_metrics():
  return {name: jnp.zeros(()) for name in ARCH_METRICS}


def search_step(state: SearchState, batch, key, hparams: HParams, spec: StepSpec):
  """One first-order search step: an architecture step, then a weight step.

  Args:
    state: the SearchState.
    batch: {'train': (images, labels)} (weight step) and {'valid': (images, labels)}
      (architecture step), uint8 images; the global batch.
    key: this step's key; every rng stream is derived from it.
    hparams: the skip-connect dropout rate and whether the architecture learns (False
      during the warm-up; the projector then trains alone if `spec.projector_warmup`); a
      population member's ss_factor and op mask.
    spec: the stage's static pieces.
  """
  k_arch, k_weight = jax.random.split(key)
  skip_rate = hparams.skip_rate if spec.skip_dropout else None
  update_arch, op_mask = hparams.update_arch, hparams.op_mask
  images, labels = batch['valid']

  def frozen(state):
    if spec.projector_warmup and spec.ss_factor > 0:
      return projector_warmup_step(state, images, k_arch, skip_rate, spec, op_mask)
    return state, _zero_arch_metrics()

  state, arch_metrics = jax.lax.cond(
      update_arch, lambda st: arch_step(st, images, labels, k_arch, skip_rate, spec,
                                        hparams.ss_factor, op_mask), frozen, state)
  state, weight_metrics = weight_step(state, *batch['train'], k_weight, skip_rate, spec,
                                      op_mask)
  return state, dict(arch_metrics, **weight_metrics)



def init_state(key, *, model: supernet.SearchNetwork, projector: heads.Projector, optimizers,
               image_shape, projector_inputs: int, ss_factor: float) -> SearchState:
  """A stage's initial SearchState (the projector only when `ss_factor` > 0); not jitted."""
  tx_weights, tx_arch, tx_projector = optimizers
  k_init, k_proj = jax.random.split(key)
  # Initialised without the device axis (outside a data-parallel step); same variables.
  variables = supernet.init_variables(model.clone(bn_axis_name=None), k_init, image_shape)
  proj_vars = {}
  if ss_factor > 0:
    features = jnp.zeros((2, projector_inputs), jnp.float32)
    proj_vars = dict(projector.clone(bn_axis_name=None).init(k_proj, features))
  return SearchState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'], arch=variables['arch'], projector=proj_vars,
      weight_opt=tx_weights.init(variables['params']),
      arch_opt=tx_arch.init(variables['arch']),
      projector_opt=tx_projector.init(proj_vars['params']) if proj_vars else ())
