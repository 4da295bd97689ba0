"""The architecture search: PC-DARTS, P-DARTS, PCP-DARTS and SS PCP-DARTS in one code path.

A search is a list of stages (`config.search.stages`). Each stage builds a fresh
supernet over the ops still on, trains it with first-order bilevel updates (an
architecture step on a validation batch, then a weight step on a training batch)
and, at its end, keeps the `num_keep` strongest ops per edge. The architecture
step's loss is `ss_factor * BarlowTwins + (1 - ss_factor) * CE`.
"""

import dataclasses
import functools
import math
import os
import time
from typing import Any, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcp_jax import augment
from pcp_jax import checkpoint
from pcp_jax import data as data_lib
from pcp_jax import defaults
from pcp_jax import genotypes
from pcp_jax import heads
from pcp_jax import loop
from pcp_jax import losses
from pcp_jax import ops
from pcp_jax import optim
from pcp_jax import parallel
from pcp_jax import reports
from pcp_jax import supernet


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


# ---------------------------------------------------------------------------
# The skip-connect dropout schedule (the optimisers and LR schedules are pcp_jax/optim.py).


def skip_dropout_rate(rate, epoch, epochs, warmup_epochs):
  """P-DARTS skip-connect dropout schedule for epoch `epoch` of a stage."""
  if epoch < warmup_epochs:
    return rate * (epochs - epoch - 1) / epochs
  return rate * math.exp(-(epoch - warmup_epochs) * 0.2)


# ---------------------------------------------------------------------------
# The step.


@dataclasses.dataclass(frozen=True)
class StepSpec:
  """The static pieces of a stage's search step, bound once (`make_stage_fns`).

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
               skip_dropout=bool(skip_dropout))

  def local(self, x):
    return parallel.local_part(x, self.num_devices)

  def to_float(self, images_uint8):
    return augment.to_float(images_uint8, ops.compute_dtype(self.model.dtype))


def _augment(spec: StepSpec, key, images_uint8):
  x = augment.random_crop_flip(key, spec.to_float(images_uint8))
  return augment.normalize(x, spec.mean, spec.std)


def _forward(spec: StepSpec, params, arch, batch_stats, x, channel_key, dropout_key,
             skip_rate):
  """Supernet forward in train mode; returns logits, pooled features, new batch stats."""
  (logits, features), new_vars = spec.model.apply(
      {'params': params, 'arch': arch, 'batch_stats': batch_stats}, x, train=True,
      skip_drop_rate=skip_rate,
      rngs={'channels': channel_key,
            'dropout': parallel.device_key(dropout_key, spec.num_devices)},
      mutable=['batch_stats'])
  return logits, features, new_vars['batch_stats']


def _view_forwards(spec: StepSpec, params, arch, batch_stats, xs, key, skip_rate):
  """The supernet on a stack of batches (the CE batch and the BT views) as one vmapped call:
  BN statistics per batch. One channel sample for all of them when `spec.shared_channels`
  (the paper's identical networks), else one each; skip-connect dropout masks always differ.
  `arch` carries the stack axis too, so its gradient comes apart per batch."""
  n = xs.shape[0]
  k_channels, k_dropout = jax.random.split(key)
  channel_keys = (jnp.stack([k_channels] * n) if spec.shared_channels
                  else jax.random.split(k_channels, n))
  return jax.vmap(lambda a, x, kc, kd: _forward(spec, params, a, batch_stats, x, kc, kd,
                                                skip_rate))(
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
  view_a, view_b = augment.barlow_twins_views(key, spec.to_float(images), spec.mean,
                                              spec.std, spec.bt_views)
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


def arch_gradients(state: SearchState, xs, labels, key, skip_rate, spec: StepSpec):
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
                                             state.batch_stats, xs, key, skip_rate)
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


def arch_step(state: SearchState, images, labels, key, skip_rate, spec: StepSpec):
  """Architecture step on a validation batch: updates only 'arch' (and the projector).

  Loss: `ss_factor * BT + (1 - ss_factor) * CE` (BT scaled per `spec.bt_scale`); CE on the
  usual crop/flip view, Barlow Twins on two stronger views through the projector (which the
  BT loss also trains). The CE and BT parts of the architecture gradient
  (`arch_gradients`) are mixed as the loss says; their norms and cosine are logged.
  `images`/`labels` are the global batch.
  """
  k_aug, k_fwd, k_views = jax.random.split(key, 3)
  x = spec.local(_augment(spec, k_aug, images))
  xs = jnp.stack([x, *_bt_views(spec, k_views, images)]) if spec.ss_factor > 0 else x[None]
  (g_ce, g_bt, g_proj), (ce, bt, batch_stats, proj_stats) = arch_gradients(
      state, xs, spec.local(labels), k_fwd, skip_rate, spec)
  bt_dim = spec.projector.sizes[-1]
  g_arch, bt_weight = mix_arch_gradients(g_ce, g_bt, spec.ss_factor, spec.bt_scale, bt_dim)
  updates, arch_opt = spec.tx_arch.update(g_arch, state.arch_opt, state.arch)
  state = state.replace(arch=optax.apply_updates(state.arch, updates), arch_opt=arch_opt,
                        batch_stats=batch_stats)
  if spec.ss_factor > 0:
    state = _update_projector(state, jax.tree_util.tree_map(
        lambda g: spec.ss_factor * bt_weight * g, g_proj), proj_stats, spec)
  loss_bt = bt / bt_dim if spec.bt_scale == 'dim' else bt
  metrics = parallel.mean({'arch_ce': ce, 'arch_bt': bt,
                           'arch_loss': losses.mixed_arch_loss(ce, loss_bt, spec.ss_factor)},
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


def projector_warmup_step(state: SearchState, images, key, skip_rate, spec: StepSpec):
  """During the warm-up (architecture frozen): BT trains the projector alone on the
  supernet's features of the two views; the supernet and its BN statistics are untouched.
  The views are those the architecture step would draw from the same key."""
  _, k_fwd, k_views = jax.random.split(key, 3)
  xs = jnp.stack(_bt_views(spec, k_views, images))
  arch_stack = jax.tree_util.tree_map(lambda a: jnp.stack([a] * 2), state.arch)
  _, features, _ = _view_forwards(spec, state.params, arch_stack, state.batch_stats, xs, k_fwd,
                                  skip_rate)
  features = jax.lax.stop_gradient(features)
  (bt, proj_stats), g_proj = jax.value_and_grad(
      lambda p: _bt_loss(spec, p, state.projector['batch_stats'], features), has_aux=True)(
          state.projector['params'])
  state = _update_projector(state, parallel.mean(g_proj, spec.num_devices), proj_stats, spec)
  return state, dict(_zero_arch_metrics(), arch_bt=parallel.mean(bt, spec.num_devices))


def weight_step(state: SearchState, images, labels, key, skip_rate, spec: StepSpec):
  """Weight step on a training batch: CE, updates only 'params' (and BN statistics)."""
  k_aug, k_fwd = jax.random.split(key)
  x = spec.local(_augment(spec, k_aug, images))
  labels = spec.local(labels)
  k_channels, k_dropout = jax.random.split(k_fwd)

  def loss_fn(params):
    logits, _, batch_stats = _forward(spec, params, state.arch, state.batch_stats, x,
                                      k_channels, k_dropout, skip_rate)
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


def search_step(state: SearchState, batch, key, skip_rate, update_arch, spec: StepSpec):
  """One first-order search step: an architecture step, then a weight step.

  Args:
    state: the SearchState.
    batch: {'train': (images, labels)} (weight step) and {'valid': (images, labels)}
      (architecture step), uint8 images; the global batch.
    key: this step's key; every rng stream is derived from it.
    skip_rate: skip-connect dropout rate (traced scalar).
    update_arch: traced bool; False during the warm-up (architecture frozen; the projector
      trains alone if `spec.projector_warmup`).
    spec: the stage's static pieces.
  """
  k_arch, k_weight = jax.random.split(key)
  if not spec.skip_dropout:
    skip_rate = None
  images, labels = batch['valid']

  def frozen(state):
    if spec.projector_warmup and spec.ss_factor > 0:
      return projector_warmup_step(state, images, k_arch, skip_rate, spec)
    return state, _zero_arch_metrics()

  state, arch_metrics = jax.lax.cond(
      update_arch, lambda st: arch_step(st, images, labels, k_arch, skip_rate, spec), frozen,
      state)
  state, weight_metrics = weight_step(state, *batch['train'], k_weight, skip_rate, spec)
  return state, dict(arch_metrics, **weight_metrics)


def evaluate_batch(variables, images, labels, mask, key, *, model, mean, std):
  """Summed CE and correct count of a (padded) batch, BN in eval mode (running statistics)."""
  x = augment.normalize(augment.to_float(images), mean, std)
  logits, _ = model.apply(variables, x, train=False, rngs={'channels': key})
  ce = optax.softmax_cross_entropy_with_integer_labels(ops.upcast(logits), labels)
  correct = jnp.argmax(logits, -1) == labels
  return {'loss': jnp.sum(ce * mask), 'accuracy': jnp.sum(correct * mask)}


def make_stage_fns(cfg, model, projector, optimizers, mesh, mean, std, skip_dropout=True):
  """(chunk_fn, eval_fn): the jitted data-parallel `loop.run_steps` of a stage's search step
  and its evaluation.

  chunk_fn(state, sums, images, labels, order, key, (skip_rate, update_arch), start, stop)
  donates `state` and `sums`; `images`, `labels`, `order` are {'train', 'valid'} dicts; all
  arguments are replicated over `mesh`; both are compiled at their first call
  (`parallel.CompiledOnFirstCall`), so later calls must pass the same shapes, types and
  shardings. `skip_dropout` False (a stage whose skip-dropout rate is 0) leaves the masks
  out (see `search_step`).
  """
  spec = StepSpec.from_config(cfg, model, projector, optimizers, mean, std, mesh.size,
                              skip_dropout)
  chunk = functools.partial(loop.run_steps, step_fn=functools.partial(search_step, spec=spec),
                            batch_size=cfg.batch_size)
  chunk_fn = jax.jit(parallel.data_parallel(chunk, mesh), donate_argnums=(0, 1))
  eval_fn = jax.jit(functools.partial(evaluate_batch, model=model, mean=mean, std=std))
  return parallel.CompiledOnFirstCall(chunk_fn), parallel.CompiledOnFirstCall(eval_fn)


# ---------------------------------------------------------------------------
# A stage's networks, optimisers and state.

BT_SCALES = ('none', 'dim', 'balance')


def check_config(config):
  """Validates the search config, naming the option and the allowed values."""
  cfg = config.search
  ops.select_kernels(config.get('op_impl', 'auto'))
  if not 0.0 <= cfg.ss_factor <= 1.0:
    raise ValueError(f'search.ss_factor must be in [0, 1], got {cfg.ss_factor}.')
  if cfg.bt_scale not in BT_SCALES:
    raise ValueError(f'search.bt_scale must be one of {list(BT_SCALES)}, got {cfg.bt_scale!r}.')
  if cfg.bt_views not in augment.BT_VIEWS:
    raise ValueError(f'search.bt_views must be one of {list(augment.BT_VIEWS)}, '
                     f'got {cfg.bt_views!r}.')
  defaults.check_fields(
      config, whole=(('search.channels', 1), ('search.max_skip_normal', -1),
                     ('search.batch_size', 2), ('search.eval_batch_size', 1),
                     ('search.log_every_steps', 0)),
      booleans=('search.shared_channels', 'search.projector_warmup', 'search.use_betas'),
      at_least_zero=('search.bt_lambda',))
  sizes = cfg.projector_sizes
  if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
    raise ValueError(f'search.projector_sizes must be whole numbers >= 1 (the layer widths), '
                     f'got {sizes!r}.')
  if cfg.channel_mode not in supernet.CHANNEL_MODES:
    raise ValueError(f'search.channel_mode must be one of {supernet.CHANNEL_MODES}, '
                     f'got {cfg.channel_mode!r}.')
  if cfg.partial_k < 1 or cfg.channels % cfg.partial_k:
    raise ValueError(f'search.partial_k must be >= 1 and divide search.channels '
                     f'({cfg.channels}), got {cfg.partial_k}.')
  for name in ('weights', 'arch', 'projector'):
    optim.check(cfg.optim[name], f'search.optim.{name}')
  if not cfg.stages:
    raise ValueError('search.stages must list at least one stage.')
  unknown = set(cfg.initial_ops) - set(genotypes.PRIMITIVES)
  if unknown or not cfg.initial_ops:
    raise ValueError(f'search.initial_ops must be a non-empty subset of '
                     f'{genotypes.PRIMITIVES}, got {list(cfg.initial_ops)}.')
  ops_on = len(cfg.initial_ops)
  for i, stage in enumerate(cfg.stages):
    if stage.layers < 3:
      raise ValueError(f'search.stages[{i}].layers must be >= 3, got {stage.layers}.')
    if stage.epochs < 1 or not 0 <= stage.warmup_epochs <= stage.epochs:
      raise ValueError(f'search.stages[{i}]: need epochs >= 1 and 0 <= warmup_epochs <= '
                       f'epochs, got {stage.epochs} and {stage.warmup_epochs}.')
    if not 1 <= stage.num_keep <= ops_on:
      raise ValueError(f'search.stages[{i}].num_keep must be in 1..{ops_on} (the ops on '
                       f'before this stage), got {stage.num_keep}.')
    if not 0.0 <= stage.skip_dropout < 1.0:
      raise ValueError(f'search.stages[{i}].skip_dropout must be in [0, 1), '
                       f'got {stage.skip_dropout}.')
    ops_on = stage.num_keep


def initial_switches(initial_ops) -> np.ndarray:
  """(14, 8) booleans: the ops of `initial_ops` on every edge."""
  switches = np.zeros((genotypes.NUM_EDGES, genotypes.NUM_OPS), bool)
  switches[:, [genotypes.PRIMITIVES.index(op) for op in initial_ops]] = True
  return switches


def stage_pieces(cfg, layers, epochs, switches, num_classes, image_shape, steps_per_epoch,
                 num_devices=1, kernels=ops.XLA):
  """(model, projector, init, lr_schedule, optimizers) of a stage: a fresh supernet over the
  ops still on, computing with `kernels`, its Barlow Twins projector, `init(key) -> SearchState`
  (not jitted) and the (weights, arch, projector) optimisers."""
  model = supernet.SearchNetwork(
      num_classes=num_classes, channels=cfg.channels, layers=layers,
      partial_k=cfg.partial_k, channel_mode=cfg.channel_mode, use_betas=cfg.use_betas,
      switches_normal=genotypes.switches_to_tuple(switches['normal']),
      switches_reduce=genotypes.switches_to_tuple(switches['reduce']),
      bn_axis_name=parallel.axis_name(num_devices), kernels=kernels,
      scan_cells=kernels.loops)
  tx_weights, lr_schedule = optim.make(cfg.optim.weights, epochs, steps_per_epoch)
  tx_arch, _ = optim.make(cfg.optim.arch)
  tx_projector, _ = optim.make(cfg.optim.projector)
  projector = heads.Projector(tuple(cfg.projector_sizes),
                              bn_axis_name=parallel.axis_name(num_devices))

  def init(key):
    k_init, k_proj = jax.random.split(key)
    # Initialised without the device axis (outside a data-parallel step); same variables.
    variables = supernet.init_variables(model.clone(bn_axis_name=None), k_init, image_shape)
    proj_vars = {}
    if cfg.ss_factor > 0:
      features = jnp.zeros((2, cfg.channels * 16), jnp.float32)  # 4 nodes x 4C channels
      proj_vars = dict(projector.clone(bn_axis_name=None).init(k_proj, features))
    return SearchState(
        step=jnp.zeros((), jnp.int32), params=variables['params'],
        batch_stats=variables['batch_stats'], arch=variables['arch'], projector=proj_vars,
        weight_opt=tx_weights.init(variables['params']),
        arch_opt=tx_arch.init(variables['arch']),
        projector_opt=tx_projector.init(proj_vars['params']) if proj_vars else ())

  return model, projector, init, lr_schedule, (tx_weights, tx_arch, tx_projector)


def build_stage(cfg, layers, epochs, switches, num_classes, image_shape, steps_per_epoch, key,
                num_devices=1, kernels=ops.XLA):
  """`stage_pieces` with the stage's initial state computed from `key`: (model, projector,
  state, lr_schedule, optimizers)."""
  model, projector, init, lr_schedule, optimizers = stage_pieces(
      cfg, layers, epochs, switches, num_classes, image_shape, steps_per_epoch, num_devices,
      kernels)
  return model, projector, parallel.run_once(init, key), lr_schedule, optimizers


# ---------------------------------------------------------------------------
# The search driver: restore or start, run each stage on `loop`, finish.

# Config fields that may differ between a run and its resumption (everything else must match).
FREE_ON_RESUME = ('checkpoint.', 'num_devices', 'op_impl', 'modes', 'data.dir',
                  'data.download', 'search.log_every_steps', 'method')


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


@dataclasses.dataclass
class _Search:
  """What every part of one search shares."""
  config: Any
  workdir: str
  mesh: Any
  info: data_lib.DatasetInfo
  images: dict  # {'train', 'valid'}: on every device
  labels: dict
  sizes: dict  # images per split
  steps: int  # per epoch
  offsets: list  # global step of each stage's first step
  root: Any  # the run's key
  main_process: bool

  @property
  def cfg(self):
    return self.config.search

  def stage_key(self, s):
    # (init, steps, order, eval) keys of stage s.
    return jax.random.split(jax.random.fold_in(self.root, s), 4)

  def pieces(self, s, switches):
    stage = self.cfg.stages[s]
    return stage_pieces(self.cfg, stage.layers, stage.epochs, switches, self.info.num_classes,
                        self.sizes['shape'], self.steps, self.mesh.size,
                        ops.select_kernels(self.config.get('op_impl', 'auto')))

  def path(self, name):
    return os.path.join(self.workdir, name)


def _switches_from(meta):
  return {c: np.asarray(meta[f'switches_{c}'], bool) for c in ('normal', 'reduce')}


def _prepare(config, workdir) -> _Search:
  cfg = config.search
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch(cfg.batch_size, mesh.size, 'search.batch_size')
  os.makedirs(workdir, exist_ok=True)
  (w_x, w_y), (a_x, a_y), info = data_lib.search_splits(config)
  steps = min(len(w_x), len(a_x)) // cfg.batch_size
  if steps < 1:
    raise ValueError(f'search.batch_size ({cfg.batch_size}) is larger than the search '
                     f'splits ({len(w_x)} / {len(a_x)} images).')
  images = parallel.replicate({'train': w_x, 'valid': a_x}, mesh)
  labels = parallel.replicate({'train': w_y.astype(np.int32), 'valid': a_y.astype(np.int32)},
                              mesh)
  offsets = np.cumsum([0] + [st.epochs * steps for st in cfg.stages]).tolist()
  logging.info('Search %s on %s: %d + %d images, %d steps per epoch, %d stage(s), %d '
               'device(s).', config.get('method', 'search'), info.name, len(w_x), len(a_x),
               steps, len(cfg.stages), mesh.size)
  return _Search(config=config, workdir=workdir, mesh=mesh, info=info, images=images,
                 labels=labels, sizes={'train': len(w_x), 'valid': len(a_x),
                                       'shape': w_x.shape[1:]},
                 steps=steps, offsets=offsets, root=jax.random.PRNGKey(config.seed),
                 main_process=parallel.is_main_process())


def _restore_or_start(run: _Search, ckpt):
  """(stage, epoch, step, switches, tree or None, elapsed) to go on from."""

  def template(meta):
    init = run.pieces(meta['phase'], _switches_from(meta))[2]
    shapes = jax.eval_shape(init, run.stage_key(meta['phase'])[0])
    return {'state': loop.zeros_like_shapes(shapes),
            'sums': loop.zeros_like_shapes(loop.zero_sums(METRICS))}

  restored = loop.restore(ckpt, template, loop.fingerprint(run.config, FREE_ON_RESUME),
                          'search')
  if restored is None:
    switches = {c: initial_switches(run.cfg.initial_ops) for c in ('normal', 'reduce')}
    return 0, 0, 0, switches, None, 0.0
  ckpt_step, tree, meta = restored
  logging.info('Resuming the search from checkpoint %d: stage %d, epoch %d, step %d.',
               ckpt_step, meta['phase'] + 1, meta['epoch'] + 1, meta['step'])
  return (meta['phase'], meta['epoch'], meta['step'], _switches_from(meta), tree,
          meta['elapsed_seconds'])


def arch_weights(arch, switches, use_betas) -> dict:
  """Softmaxed alphas ((14, 8), 0 for ops off) and edge-normalised betas (14) of both cells,
  as lists: one row of `arch_history.jsonl`."""
  row = {'primitives': list(genotypes.PRIMITIVES)}
  for cell in ('normal', 'reduce'):
    row[f'alphas_{cell}'] = genotypes.edge_softmax(
        np.asarray(arch[f'alphas_{cell}']), switches[cell]).round(6).tolist()
    betas = (genotypes.node_softmax(np.asarray(arch[f'betas_{cell}'])) if use_betas
             else np.ones(genotypes.NUM_EDGES))
    row[f'betas_{cell}'] = np.asarray(betas).round(6).tolist()
    row[f'switches_{cell}'] = switches[cell].tolist()
  return row


def _run_stage(run: _Search, driver: loop.Run, history: loop.Rows, s, switches, tree,
               epoch, step):
  """Runs stage `s` from (epoch, step), from the restored `tree` or a fresh state; returns
  the final state on the host's view (replicated)."""
  cfg, stage = run.cfg, run.cfg.stages[s]
  k_init, k_steps, k_order, k_eval = run.stage_key(s)
  t_compile = time.time()
  model, projector, init, lr_schedule, optimizers = run.pieces(s, switches)
  state = tree['state'] if tree is not None else parallel.run_once(init, k_init)
  state = parallel.replicate(state, run.mesh)
  sums = parallel.replicate(tree['sums'], run.mesh) if tree is not None and step else None
  chunk_fn, eval_fn = make_stage_fns(cfg, model, projector, optimizers, run.mesh,
                                     run.info.mean, run.info.std,
                                     skip_dropout=stage.skip_dropout > 0)
  n_ops = int(switches['normal'][0].sum())
  logging.info('Stage %d/%d: %d cells, %d ops per edge, %d epochs (%d warm-up).', s + 1,
               len(cfg.stages), stage.layers, n_ops, stage.epochs, stage.warmup_epochs)

  def skip_rate(e):
    return skip_dropout_rate(stage.skip_dropout, e, stage.epochs, stage.warmup_epochs)

  def epoch_inputs(e):
    k_o = jax.random.fold_in(k_order, e)
    order = {split: jax.random.permutation(jax.random.fold_in(k_o, i), run.sizes[split])
             for i, split in enumerate(('train', 'valid'))}
    return (run.images, run.labels, parallel.replicate(order, run.mesh),
            jax.random.fold_in(k_steps, e),
            (jnp.float32(skip_rate(e)), jnp.bool_(e >= stage.warmup_epochs)))

  def genotype_of(arch):
    return genotypes.derive_genotype(arch, cfg.use_betas, switches['normal'],
                                     switches['reduce'])

  def end_epoch(state, means, e):
    valid = loop.evaluate(eval_fn, {'params': state.params, 'arch': state.arch,
                                    'batch_stats': state.batch_stats},
                          run.images['valid'], run.labels['valid'], cfg.eval_batch_size, k_eval)
    arch = _host(state.arch)
    global_step = run.offsets[s] + (e + 1) * run.steps
    weights = arch_weights(arch, switches, cfg.use_betas)
    history.append(dict(stage=s + 1, epoch=e + 1, step=global_step, **weights))
    driver.scalars.write_arch(global_step, weights)
    row = dict(stage=s + 1, epoch=e + 1, layers=stage.layers, ops_per_edge=n_ops, **means,
               valid_loss=valid['loss'], valid_acc=valid['accuracy'],
               lr=float(lr_schedule(e * run.steps)), skip_dropout=skip_rate(e),
               arch_frozen=e < stage.warmup_epochs, genotype=genotypes.to_dict(genotype_of(arch)))
    if e == 0:
      row['compile_and_first_epoch_seconds'] = time.time() - t_compile
    return row

  def log_row(row):
    logging.info(
        'stage %d/%d epoch %d/%d: train CE %.4f acc %.4f | valid CE %.4f acc %.4f | '
        'arch loss %.4f (CE %.4f, BT %.4f; |grad| CE %.2e BT %.2e cos %.3f)%s | '
        'lr %.5f skip-drop %.3f | %.1fs', s + 1, len(cfg.stages), row['epoch'], stage.epochs,
        row['train_loss'], row['train_acc'], row['valid_loss'], row['valid_acc'],
        row['arch_loss'], row['arch_ce'], row['arch_bt'], row['arch_ce_grad_norm'],
        row['arch_bt_grad_norm'], row['arch_grad_cosine'],
        ' [arch frozen]' if row['arch_frozen'] else '', row['lr'], row['skip_dropout'],
        row['epoch_seconds'])

  def save_meta(state, e, st):
    genotype = genotypes.to_dict(genotype_of(_host(state.arch)))
    if run.main_process:
      checkpoint.write_json(run.path('genotype_latest.json'),
                            dict(genotype, stage=s + 1, epoch=e, step=st))
    return {'steps_per_epoch': run.steps, 'switches_normal': switches['normal'].tolist(),
            'switches_reduce': switches['reduce'].tolist(), 'genotype': genotype}

  phase = loop.Phase(name=f'stage {s + 1}/{len(cfg.stages)}', index=s,
                     num_phases=len(cfg.stages), epochs=stage.epochs,
                     steps_per_epoch=run.steps, first_step=run.offsets[s],
                     metric_names=METRICS, chunk_fn=chunk_fn, epoch_inputs=epoch_inputs,
                     end_epoch=end_epoch, save_meta=save_meta, log_row=log_row)
  return loop.run_phase(driver, phase, state, epoch, step, sums)


def _finish(run: _Search, arch, switches, hours):
  """Writes genotype.json, arch.npz, the cell diagrams and search_summary.json."""
  cfg = run.cfg
  max_skip = cfg.max_skip_normal if cfg.max_skip_normal >= 0 else None
  genotype = genotypes.derive_genotype(arch, cfg.use_betas, switches['normal'],
                                       switches['reduce'], max_skip_normal=max_skip)
  device = jax.devices()[0]
  if run.main_process:
    genotypes.save(genotype, run.path('genotype.json'))
    np.savez(run.path('arch.npz'), **arch, switches_normal=switches['normal'],
             switches_reduce=switches['reduce'])
    reports.plot_genotype(genotype, run.workdir)
    checkpoint.write_json(run.path('search_summary.json'), {
        'method': run.config.get('method', 'search'), 'dataset': run.info.name,
        'seed': run.config.seed, 'ss_factor': cfg.ss_factor, 'bt_scale': cfg.bt_scale,
        'genotype': genotypes.to_dict(genotype),
        'search_cost_hours': hours, 'search_cost_days': hours / 24,
        'device_count': run.mesh.size, 'process_count': jax.process_count(),
        'platform': device.platform, 'device_kind': device.device_kind})
  unit = device.platform.upper() if device.platform != 'gpu' else 'GPU'
  logging.info('Search done in %.3f %s-hours (%.4f %s-days). Genotype: %s', hours, unit,
               hours / 24, unit, genotype)
  return genotype


def search(config, workdir):
  """Runs the configured search and writes genotype.json, metrics, arch weights, diagrams.

  Checkpoints (`workdir/search_checkpoints`) are written every `config.checkpoint.every_steps`
  steps and at the end of every epoch; rerunning the same config on the same workdir resumes
  from the newest checkpoint that restores and finishes with the same genotype and
  architecture weights as an uninterrupted run (`loop`: signals, non-finite losses).
  """
  check_config(config)
  run = _prepare(config, workdir)
  ckpt = checkpoint.Checkpointer(run.path('search_checkpoints'), config.checkpoint.max_to_keep)
  first_stage, epoch, step, switches, tree, elapsed = _restore_or_start(run, ckpt)
  resume_step = run.offsets[first_stage] + epoch * run.steps + step
  rows = loop.Rows(run.path('search_metrics.jsonl'), run.main_process)
  history = loop.Rows(run.path('arch_history.jsonl'), run.main_process)
  for f in (rows, history):
    f.keep_until(resume_step)
  with loop.session(workdir, config, 'search', ckpt=ckpt, rows=rows, what='the search',
                    every_steps=config.checkpoint.every_steps,
                    log_every_steps=run.cfg.log_every_steps,
                    meta={'config': loop.fingerprint(config, FREE_ON_RESUME)},
                    hint='Lower search.optim.weights.lr or search.optim.arch.lr (in a new '
                         'workdir).',
                    total_steps=run.offsets[-1], resume_step=resume_step,
                    resumed=tree is not None, elapsed=elapsed,
                    place=functools.partial(parallel.replicate, mesh=run.mesh)) as driver:
    for s in range(first_stage, len(run.cfg.stages)):
      state = _run_stage(run, driver, history, s, switches, tree, epoch, step)
      tree, epoch, step = None, 0, 0
      arch = _host(state.arch)
      if run.main_process:
        np.savez(run.path(f'arch_stage{s + 1}.npz'), **arch,
                 switches_normal=switches['normal'], switches_reduce=switches['reduce'])
      if s < len(run.cfg.stages) - 1:
        for cell in ('normal', 'reduce'):
          switches[cell] = genotypes.drop_weakest_ops(
              arch[f'alphas_{cell}'], switches[cell], run.cfg.stages[s].num_keep)
  genotype = _finish(run, arch, switches, driver.elapsed_seconds() / 3600)
  ckpt.close()
  return genotype
