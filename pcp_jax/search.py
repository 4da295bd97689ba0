"""The architecture search: PC-DARTS, P-DARTS, PCP-DARTS and SS PCP-DARTS in one code path.

A search is a list of stages (`config.search.stages`). Each stage builds a fresh
supernet over the ops still on, trains it with first-order bilevel updates (an
architecture step on a validation batch, then a weight step on a training batch)
and, at its end, keeps the `num_keep` strongest ops per edge. The architecture
step's loss is `ss_factor * BarlowTwins + (1 - ss_factor) * CE`.
"""

import functools
import json
import math
import os
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcp_jax import augment
from pcp_jax import checkpoint
from pcp_jax import data as data_lib
from pcp_jax import genotypes
from pcp_jax import heads
from pcp_jax import losses
from pcp_jax import ops
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
# Schedules and optimisers (REFERENCE.md section 4).


def cosine_epoch_lr(lr, lr_min, epochs, steps_per_epoch):
  """PyTorch CosineAnnealingLR stepped once per epoch, as a function of the step."""
  def schedule(step):
    epoch = jnp.minimum(step // steps_per_epoch, epochs)
    return lr_min + 0.5 * (lr - lr_min) * (1 + jnp.cos(jnp.pi * epoch / epochs))
  return schedule


def weight_optimizer(cfg, epochs, steps_per_epoch):
  """SGD + momentum + coupled weight decay + per-epoch cosine LR, gradients clipped first."""
  schedule = cosine_epoch_lr(cfg.lr, cfg.lr_min, epochs, steps_per_epoch)
  return optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.add_decayed_weights(cfg.weight_decay),
      optax.sgd(schedule, momentum=cfg.momentum)), schedule


def arch_optimizer(cfg, lr):
  """Adam with coupled weight decay (added to the gradient, as PyTorch's Adam does)."""
  parts = []
  if cfg.arch_grad_clip > 0:
    parts.append(optax.clip_by_global_norm(cfg.arch_grad_clip))
  parts += [optax.add_decayed_weights(cfg.arch_weight_decay),
            optax.adam(lr, b1=cfg.arch_b1, b2=cfg.arch_b2)]
  return optax.chain(*parts)


def skip_dropout_rate(rate, epoch, epochs, warmup_epochs):
  """P-DARTS skip-connect dropout schedule for epoch `epoch` of a stage."""
  if epoch < warmup_epochs:
    return rate * (epochs - epoch - 1) / epochs
  return rate * math.exp(-(epoch - warmup_epochs) * 0.2)


# ---------------------------------------------------------------------------
# The step.


def _to_float(model, images_uint8):
  return augment.to_float(images_uint8, ops.compute_dtype(model.dtype))


def _augment(model, key, images_uint8, mean, std):
  x = augment.random_crop_flip(key, _to_float(model, images_uint8))
  return augment.normalize(x, mean, std)


def _forward(model, params, arch, batch_stats, x, key, skip_rate, num_devices=1):
  """Supernet forward in train mode; returns logits, pooled features, new batch stats."""
  k_ch, k_drop = jax.random.split(key)
  (logits, features), new_vars = model.apply(
      {'params': params, 'arch': arch, 'batch_stats': batch_stats}, x, train=True,
      skip_drop_rate=skip_rate,
      rngs={'channels': k_ch, 'dropout': parallel.device_key(k_drop, num_devices)},
      mutable=['batch_stats'])
  return logits, features, new_vars['batch_stats']


def arch_step(state: SearchState, images, labels, key, skip_rate, *, model, projector,
              tx_arch, tx_projector, ss_factor, bt_lambda, mean, std, num_devices=1):
  """Architecture step on a validation batch: updates only 'arch' (and the projector).

  Loss: `ss_factor * BT + (1 - ss_factor) * CE`; CE on the usual crop/flip view, Barlow
  Twins on two stronger views through the projector (which the BT loss also trains).
  `images`/`labels` are the global batch; with `num_devices` > 1 this runs on every device
  of a data-parallel step (see `parallel`) and works on its slice.
  """
  k_aug, k_ce, k_views = jax.random.split(key, 3)
  local = functools.partial(parallel.local_part, num_devices=num_devices)
  labels = local(labels)
  x = local(_augment(model, k_aug, images, mean, std))
  if ss_factor > 0:
    view_a, view_b = augment.barlow_twins_views(k_views, _to_float(model, images))
    xs = jnp.stack([x, local(augment.normalize(view_a, mean, std)),
                    local(augment.normalize(view_b, mean, std))])

  def loss_fn(arch, proj_params, batch_stats, proj_stats):
    if ss_factor == 0:
      logits, _, batch_stats = _forward(model, state.params, arch, batch_stats, x, k_ce,
                                        skip_rate, num_devices)
      ce = losses.cross_entropy(logits, labels)
      return ce, (batch_stats, proj_stats, {'arch_ce': ce, 'arch_bt': jnp.zeros(())})
    # The CE batch and the two views go through the supernet as one vmapped call: the same
    # function as three separate forwards (BN statistics per slice), a third of the code.
    logits, features, stats = jax.vmap(
        lambda x, k: _forward(model, state.params, arch, batch_stats, x, k, skip_rate,
                              num_devices))(xs, jax.random.split(k_ce, 3))
    batch_stats = jax.tree_util.tree_map(lambda t: t[0], stats)  # running stats: the CE batch
    ce = losses.cross_entropy(logits[0], labels)
    z, new_proj = jax.vmap(lambda f: projector.apply(
        {'params': proj_params, 'batch_stats': proj_stats}, f, train=True,
        mutable=['batch_stats']))(features[1:])
    proj_stats = jax.tree_util.tree_map(lambda t: t[-1], new_proj['batch_stats'])
    bt = losses.barlow_twins_loss(z[0], z[1], lambd=bt_lambda,
                                  axis_name=parallel.axis_name(num_devices))
    metrics = {'arch_ce': ce, 'arch_bt': bt}
    return losses.mixed_arch_loss(ce, bt, ss_factor), (batch_stats, proj_stats, metrics)

  proj = state.projector
  (loss, (batch_stats, proj_stats, metrics)), grads = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(
          state.arch, proj.get('params', {}), state.batch_stats, proj.get('batch_stats', {}))
  g_arch, g_proj = parallel.mean(grads, num_devices)
  updates, arch_opt = tx_arch.update(g_arch, state.arch_opt, state.arch)
  arch = optax.apply_updates(state.arch, updates)
  new_proj, projector_opt = proj, state.projector_opt
  if proj:
    updates, projector_opt = tx_projector.update(g_proj, state.projector_opt, proj['params'])
    new_proj = {'params': optax.apply_updates(proj['params'], updates),
                'batch_stats': proj_stats}
  state = state.replace(arch=arch, arch_opt=arch_opt, batch_stats=batch_stats,
                        projector=new_proj, projector_opt=projector_opt)
  return state, parallel.mean(dict(metrics, arch_loss=loss), num_devices)


def weight_step(state: SearchState, images, labels, key, skip_rate, *, model, tx_weights,
                mean, std, num_devices=1):
  """Weight step on a training batch: CE, updates only 'params' (and BN statistics)."""
  k_aug, k_fwd = jax.random.split(key)
  x = parallel.local_part(_augment(model, k_aug, images, mean, std), num_devices)
  labels = parallel.local_part(labels, num_devices)

  def loss_fn(params):
    logits, _, batch_stats = _forward(model, params, state.arch, state.batch_stats, x, k_fwd,
                                      skip_rate, num_devices)
    return losses.cross_entropy(logits, labels), (batch_stats, losses.accuracy(logits, labels))

  (ce, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = parallel.mean(grads, num_devices)
  updates, weight_opt = tx_weights.update(grads, state.weight_opt, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, weight_opt=weight_opt)
  return state, parallel.mean({'train_loss': ce, 'train_acc': acc}, num_devices)


def search_step(state: SearchState, batch, key, skip_rate, update_arch, *, model, projector,
                tx_weights, tx_arch, tx_projector, ss_factor, bt_lambda, mean, std,
                num_devices=1, skip_dropout=True):
  """One first-order search step: an architecture step, then a weight step.

  Args:
    state: the SearchState.
    batch: dict with `train_images`, `train_labels` (weight step) and `valid_images`,
      `valid_labels` (architecture step), uint8 images; the global batch.
    key: this step's key; every rng stream is derived from it.
    skip_rate: skip-connect dropout rate (traced scalar).
    update_arch: traced bool; False during the warm-up (architecture frozen).
    num_devices: > 1 inside a data-parallel step over `parallel.AXIS`.
    skip_dropout: static; False compiles the step without skip-connect dropout (`skip_rate`
      ignored), for stages whose rate is 0: the same function as rate 0, without drawing
      the masks.
  """
  k_arch, k_weight = jax.random.split(key)
  if not skip_dropout:
    skip_rate = None

  def do_arch_step(state):
    return arch_step(state, batch['valid_images'], batch['valid_labels'], k_arch, skip_rate,
                     model=model, projector=projector, tx_arch=tx_arch,
                     tx_projector=tx_projector, ss_factor=ss_factor, bt_lambda=bt_lambda,
                     mean=mean, std=std, num_devices=num_devices)

  def skip_arch_step(state):
    zero = jnp.zeros(())
    return state, {'arch_ce': zero, 'arch_bt': zero, 'arch_loss': zero}

  state, arch_metrics = jax.lax.cond(update_arch, do_arch_step, skip_arch_step, state)
  state, weight_metrics = weight_step(state, batch['train_images'], batch['train_labels'],
                                      k_weight, skip_rate, model=model, tx_weights=tx_weights,
                                      mean=mean, std=std, num_devices=num_devices)
  return state, dict(arch_metrics, **weight_metrics)


METRICS = ('arch_ce', 'arch_bt', 'arch_loss', 'train_loss', 'train_acc')


def zero_sums():
  return {name: jnp.zeros((), jnp.float32) for name in METRICS}


def run_steps(state, sums, images, labels, order, key, skip_rate, update_arch, start, stop, *,
              step_fn, batch_size):
  """Runs steps `start`..`stop - 1` of an epoch in one on-device loop (no host round trips).

  Step `i` takes batch `i` of the epoch's `order` and the key `fold_in(key, i)`, so running
  an epoch in one call or in several chunks (`start`, `stop` are traced: one compile serves
  all) gives the same result. `sums` accumulates the step metrics. The loop stops after the
  first step whose metrics are not finite and returns its index as `bad_step` (else -1).

  Returns:
    (state, sums, bad_step).
  """

  def cond(carry):
    i, _, _, bad = carry
    return (i < stop) & (bad < 0)

  def body(carry):
    i, state, sums, bad = carry
    t_idx = jax.lax.dynamic_slice_in_dim(order['train'], i * batch_size, batch_size)
    v_idx = jax.lax.dynamic_slice_in_dim(order['valid'], i * batch_size, batch_size)
    batch = {'train_images': images['train'][t_idx], 'train_labels': labels['train'][t_idx],
             'valid_images': images['valid'][v_idx], 'valid_labels': labels['valid'][v_idx]}
    state, metrics = step_fn(state, batch, jax.random.fold_in(key, i), skip_rate, update_arch)
    finite = jnp.all(jnp.stack([jnp.isfinite(metrics[name]) for name in METRICS]))
    sums = {name: sums[name] + metrics[name] for name in METRICS}
    return i + 1, state, sums, jnp.where(finite, bad, i)

  _, state, sums, bad = jax.lax.while_loop(
      cond, body, (jnp.asarray(start, jnp.int32), state, sums, jnp.int32(-1)))
  return state, sums, bad


def evaluate_batch(variables, images, labels, mask, key, *, model, mean, std):
  """Summed CE and correct count of a (padded) batch, BN in eval mode (running statistics)."""
  x = augment.normalize(augment.to_float(images), mean, std)
  logits, _ = model.apply(variables, x, train=False, rngs={'channels': key})
  ce = optax.softmax_cross_entropy_with_integer_labels(ops.upcast(logits), labels)
  correct = (jnp.argmax(logits, -1) == labels)
  return jnp.sum(ce * mask), jnp.sum(correct * mask)


def evaluate(eval_fn, variables, images, labels, batch_size, key):
  """Mean CE and accuracy over a device-resident split, with a padded last batch."""
  n = images.shape[0]
  total_loss, total_correct = 0.0, 0
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = jnp.asarray(idx < n, jnp.float32)
    idx = jnp.asarray(np.minimum(idx, n - 1))
    loss, correct = eval_fn(variables, images[idx], labels[idx], mask,
                            jax.random.fold_in(key, start))
    total_loss += loss
    total_correct += correct
  return float(total_loss) / n, float(total_correct) / n


# ---------------------------------------------------------------------------
# The search driver.

def check_config(config):
  """Validates the search config, naming the option and the allowed values."""
  cfg = config.search
  ops.resolve_op_impl(config.get('op_impl', 'auto'))
  if not 0.0 <= cfg.ss_factor <= 1.0:
    raise ValueError(f'search.ss_factor must be in [0, 1], got {cfg.ss_factor}.')
  if cfg.channel_mode not in supernet.CHANNEL_MODES:
    raise ValueError(f'search.channel_mode must be one of {supernet.CHANNEL_MODES}, '
                     f'got {cfg.channel_mode!r}.')
  if cfg.partial_k < 1 or cfg.channels % cfg.partial_k:
    raise ValueError(f'search.partial_k must be >= 1 and divide search.channels '
                     f'({cfg.channels}), got {cfg.partial_k}.')
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
  if cfg.batch_size < 2:
    raise ValueError(f'search.batch_size must be >= 2, got {cfg.batch_size}.')


def _host(tree):
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def _initial_switches(initial_ops):
  switches = np.zeros((genotypes.NUM_EDGES, genotypes.NUM_OPS), bool)
  switches[:, [genotypes.PRIMITIVES.index(op) for op in initial_ops]] = True
  return switches


def _cap(images, labels, n):
  return (images[:n], labels[:n]) if n else (images, labels)


def build_stage(cfg, layers, epochs, switches, num_classes, image_shape, steps_per_epoch, key,
                num_devices=1, op_impl='auto'):
  """A fresh supernet over the ops still on, its projector, optimisers and initial state."""
  model = supernet.SearchNetwork(
      num_classes=num_classes, channels=cfg.channels, layers=layers,
      partial_k=cfg.partial_k, channel_mode=cfg.channel_mode, use_betas=cfg.use_betas,
      switches_normal=genotypes.switches_to_tuple(switches['normal']),
      switches_reduce=genotypes.switches_to_tuple(switches['reduce']),
      bn_axis_name=parallel.axis_name(num_devices), op_impl=op_impl)
  tx_weights, lr_schedule = weight_optimizer(cfg, epochs, steps_per_epoch)
  tx_arch = arch_optimizer(cfg, cfg.arch_lr)
  tx_projector = arch_optimizer(cfg, cfg.projector_lr)
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

  state = parallel.run_once(init, key)
  return model, projector, state, lr_schedule, (tx_weights, tx_arch, tx_projector)


def make_stage_fns(cfg, model, projector, optimizers, mesh, mean, std, skip_dropout=True):
  """(chunk_fn, eval_fn): the jitted data-parallel `run_steps` of a stage and its evaluation.

  chunk_fn(state, sums, images, labels, order, key, skip_rate, update_arch, start, stop)
  donates `state` and `sums`; all arguments are replicated over `mesh`; both are compiled at
  their first call (`parallel.CompiledOnFirstCall`), so later calls must pass the same
  shapes, types and shardings. `skip_dropout` False (a stage whose skip-dropout rate is 0)
  leaves the masks out (see `search_step`).
  """
  tx_weights, tx_arch, tx_projector = optimizers
  step_fn = functools.partial(
      search_step, model=model, projector=projector, tx_weights=tx_weights, tx_arch=tx_arch,
      tx_projector=tx_projector, ss_factor=float(cfg.ss_factor),
      bt_lambda=float(cfg.bt_lambda), mean=mean, std=std, num_devices=mesh.size,
      skip_dropout=bool(skip_dropout))
  chunk = functools.partial(run_steps, step_fn=step_fn, batch_size=cfg.batch_size)
  chunk_fn = jax.jit(parallel.data_parallel(chunk, mesh), donate_argnums=(0, 1))
  eval_fn = jax.jit(functools.partial(evaluate_batch, model=model, mean=mean, std=std))
  # Compiled ahead of their first runs, the compiler's leftovers trimmed (host memory).
  return parallel.CompiledOnFirstCall(chunk_fn), parallel.CompiledOnFirstCall(eval_fn)


# ---------------------------------------------------------------------------
# Checkpoints and resumption.

# Config fields that may differ between a run and its resumption (everything else must match).
_FREE_ON_RESUME = ('checkpoint.', 'num_devices', 'op_impl', 'modes', 'data.dir',
                   'data.download')


def run_fingerprint(config) -> dict:
  """The flattened config fields a search checkpoint must agree with to be resumed."""
  flat = {}

  def visit(prefix, value):
    if isinstance(value, dict):
      for k, v in value.items():
        visit(f'{prefix}{k}.', v)
    elif isinstance(value, list):
      for i, v in enumerate(value):
        visit(f'{prefix}{i}.', v)
    else:
      flat[prefix[:-1]] = value

  visit('', json.loads(config.to_json_best_effort()))
  return {k: v for k, v in flat.items() if not k.startswith(_FREE_ON_RESUME)}


def _check_fingerprint(saved: dict, current: dict, directory: str) -> None:
  changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  if changed:
    details = ', '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in changed[:5])
    raise checkpoint.IncompatibleCheckpoint(
        f'The search checkpoints in {directory} belong to a different configuration '
        f'({details}). Rerun with the same config to resume, or use a new workdir.')


def _keep_metric_rows(path: str, stage: int, epoch: int) -> None:
  """Drops the metric rows after epoch `epoch` (completed) of stage index `stage`."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [line for line in f if line.strip() and
              (json.loads(line)['stage'] - 1, json.loads(line)['epoch']) <= (stage, epoch)]
  with open(path + '.tmp', 'w') as f:
    f.writelines(rows)
  os.replace(path + '.tmp', path)


# ---------------------------------------------------------------------------
# The search driver.


def search(config, workdir):
  """Runs the configured search and writes genotype.json, metrics, arch weights, diagrams.

  Checkpoints (`workdir/search_checkpoints`) are written every `config.checkpoint.every_steps`
  steps and at the end of every epoch; rerunning the same config on the same workdir resumes
  from the newest checkpoint that restores and finishes with the same genotype and
  architecture weights as an uninterrupted run. Ctrl-C saves and stops; a non-finite loss
  stops with the step named, keeping the last good checkpoint.
  """
  check_config(config)
  cfg = config.search
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch(cfg.batch_size, mesh.size, 'search.batch_size')
  main_process = parallel.is_main_process()
  os.makedirs(workdir, exist_ok=True)
  dataset = data_lib.load_dataset(
      config.data.dataset, config.data.source, config.data.dir or None,
      config.data.download, config.data.pad_to_32)
  info = dataset.info
  train_images, train_labels = _cap(dataset.train_images, dataset.train_labels,
                                    config.data.max_train)
  (w_x, w_y), (a_x, a_y) = data_lib.search_split(train_images, train_labels,
                                                  config.data.train_portion)
  images = parallel.replicate({'train': w_x, 'valid': a_x}, mesh)
  labels = parallel.replicate({'train': w_y.astype(np.int32), 'valid': a_y.astype(np.int32)},
                              mesh)
  steps = min(len(w_x), len(a_x)) // cfg.batch_size
  if steps < 1:
    raise ValueError(f'search.batch_size ({cfg.batch_size}) is larger than the search '
                     f'splits ({len(w_x)} / {len(a_x)} images).')
  image_shape = train_images.shape[1:]
  mean, std = info.mean, info.std
  method = config.get('method', 'search')
  every = config.checkpoint.every_steps
  logging.info('Search %s on %s: %d + %d images, %d steps per epoch, %d stage(s), %d '
               'device(s).', method, info.name, len(w_x), len(a_x), steps, len(cfg.stages),
               mesh.size)

  root = jax.random.PRNGKey(config.seed)
  fingerprint = run_fingerprint(config)
  # Global step counter of the whole search (checkpoint numbers): stage offsets.
  offsets = np.cumsum([0] + [st.epochs * steps for st in cfg.stages]).tolist()
  setups = {}

  def stage_setup(s, switches):
    key = (s, switches['normal'].tobytes(), switches['reduce'].tobytes())
    if key not in setups:
      setups.clear()
      stage = cfg.stages[s]
      k_init = jax.random.split(jax.random.fold_in(root, s), 4)[0]
      setups[key] = build_stage(cfg, stage.layers, stage.epochs, switches, info.num_classes,
                                image_shape, steps, k_init, mesh.size,
                                config.get('op_impl', 'auto'))
    return setups[key]

  def template(meta):
    _check_fingerprint(meta.get('config', {}), fingerprint, ckpt.directory)
    switches = {c: np.asarray(meta[f'switches_{c}'], bool) for c in ('normal', 'reduce')}
    return {'state': stage_setup(meta['stage'], switches)[2], 'sums': zero_sums()}

  ckpt = checkpoint.Checkpointer(os.path.join(workdir, 'search_checkpoints'),
                                 config.checkpoint.max_to_keep)
  restored = ckpt.restore_latest(template)
  metrics_path = os.path.join(workdir, 'search_metrics.jsonl')
  if restored is None:
    first_stage, first_epoch, first_step, elapsed, sums0 = 0, 0, 0, 0.0, None
    switches = {'normal': _initial_switches(cfg.initial_ops),
                'reduce': _initial_switches(cfg.initial_ops)}
    restored_state = None
  else:
    ckpt_step, tree, meta = restored
    first_stage, first_epoch, first_step = meta['stage'], meta['epoch'], meta['step']
    elapsed, sums0, restored_state = meta['elapsed_seconds'], tree['sums'], tree['state']
    switches = {c: np.asarray(meta[f'switches_{c}'], bool) for c in ('normal', 'reduce')}
    logging.info('Resuming the search from checkpoint %d: stage %d, epoch %d, step %d.',
                 ckpt_step, first_stage + 1, first_epoch + 1, first_step)
  if main_process:
    _keep_metric_rows(metrics_path, first_stage, first_epoch)

  session_start = time.time()

  def save(s, epoch, step, state, sums, genotype):
    meta = {'stage': s, 'epoch': epoch, 'step': step, 'steps_per_epoch': steps,
            'switches_normal': switches['normal'].tolist(),
            'switches_reduce': switches['reduce'].tolist(),
            'elapsed_seconds': elapsed + time.time() - session_start,
            'genotype': genotypes.to_dict(genotype), 'config': fingerprint}
    ckpt.save(offsets[s] + epoch * steps + step, {'state': state, 'sums': sums}, meta)
    if main_process:
      checkpoint.write_json(os.path.join(workdir, 'genotype_latest.json'),
                            dict(meta['genotype'], stage=s + 1, epoch=epoch, step=step))

  def current_genotype(arch):
    return genotypes.derive_genotype(arch, cfg.use_betas, switches['normal'],
                                     switches['reduce'])

  arch = None
  with checkpoint.DeferredInterrupt('the search') as interrupt:
    for s in range(first_stage, len(cfg.stages)):
      stage = cfg.stages[s]
      resuming = restored_state is not None
      stage_key = jax.random.fold_in(root, s)
      _, k_steps, k_order, k_eval = jax.random.split(stage_key, 4)
      t_compile = time.time()
      model, projector, state, lr_schedule, optimizers = stage_setup(s, switches)
      if resuming:
        state, restored_state = restored_state, None
      state = parallel.replicate(state, mesh)
      chunk_fn, eval_fn = make_stage_fns(cfg, model, projector, optimizers, mesh, mean, std,
                                         skip_dropout=stage.skip_dropout > 0)
      n_ops = int(switches['normal'][0].sum())
      logging.info('Stage %d/%d: %d cells, %d ops per edge, %d epochs (%d warm-up).',
                   s + 1, len(cfg.stages), stage.layers, n_ops, stage.epochs,
                   stage.warmup_epochs)
      for epoch in range(first_epoch if resuming else 0, stage.epochs):
        t_epoch = time.time()
        skip_rate = skip_dropout_rate(stage.skip_dropout, epoch, stage.epochs,
                                      stage.warmup_epochs)
        k_o = jax.random.fold_in(k_order, epoch)
        order = parallel.replicate(
            {'train': jax.random.permutation(jax.random.fold_in(k_o, 0), len(w_x)),
             'valid': jax.random.permutation(jax.random.fold_in(k_o, 1), len(a_x))}, mesh)
        lr = float(lr_schedule(epoch * steps))
        step = first_step if resuming and epoch == first_epoch else 0
        sums = parallel.replicate(sums0 if step else zero_sums(), mesh)
        args = (images, labels, order, jax.random.fold_in(k_steps, epoch),
                jnp.float32(skip_rate), jnp.bool_(epoch >= stage.warmup_epochs))
        while step < steps:
          stop = min(steps, step + every) if every > 0 else steps
          state, sums, bad = chunk_fn(state, sums, *args, jnp.int32(step), jnp.int32(stop))
          bad = int(bad)
          if bad >= 0:
            last = ckpt.latest_step()
            raise FloatingPointError(
                f'The search stopped: a loss became NaN or infinite at stage {s + 1}, epoch '
                f'{epoch + 1}, step {bad + 1} of {steps} (search step '
                f'{offsets[s] + epoch * steps + bad + 1}). '
                + (f'The last good checkpoint (step {last}) is kept in {ckpt.directory}. '
                   if last is not None else 'No checkpoint was written before it. ')
                + 'Lower search.lr or search.arch_lr (in a new workdir).')
          step = stop
          if step < steps and (every > 0 or interrupt.requested):
            save(s, epoch, step, state, sums, current_genotype(_host(state.arch)))
          if interrupt.requested and step < steps:
            raise KeyboardInterrupt(f'Search interrupted; saved in {ckpt.directory}. Rerun '
                                    'the same command to resume.')
        train_metrics = {k: float(v) / steps for k, v in _host(sums).items()}
        valid_loss, valid_acc = evaluate(
            eval_fn, {'params': state.params, 'arch': state.arch,
                      'batch_stats': state.batch_stats},
            images['valid'], labels['valid'], cfg.eval_batch_size, k_eval)
        arch = _host(state.arch)
        genotype = current_genotype(arch)
        row = dict(stage=s + 1, epoch=epoch + 1, layers=stage.layers, ops_per_edge=n_ops,
                   **train_metrics, valid_loss=valid_loss, valid_acc=valid_acc, lr=lr,
                   skip_dropout=skip_rate, arch_frozen=epoch < stage.warmup_epochs,
                   epoch_seconds=time.time() - t_epoch,
                   elapsed_seconds=elapsed + time.time() - session_start,
                   genotype=genotypes.to_dict(genotype))
        if epoch == 0:
          row['compile_and_first_epoch_seconds'] = time.time() - t_compile
        if main_process:
          with open(metrics_path, 'a') as f:
            f.write(json.dumps(row) + '\n')
        logging.info(
            'stage %d/%d epoch %d/%d: train CE %.4f acc %.4f | valid CE %.4f acc %.4f | '
            'arch loss %.4f (CE %.4f, BT %.4f)%s | lr %.5f skip-drop %.3f | %.1fs',
            s + 1, len(cfg.stages), epoch + 1, stage.epochs, row['train_loss'],
            row['train_acc'], valid_loss, valid_acc, row['arch_loss'], row['arch_ce'],
            row['arch_bt'], ' [arch frozen]' if row['arch_frozen'] else '', lr, skip_rate,
            row['epoch_seconds'])
        save(s, epoch + 1, 0, state, sums, genotype)
        if interrupt.requested:
          raise KeyboardInterrupt(f'Search interrupted; saved in {ckpt.directory}. Rerun '
                                  'the same command to resume.')
      arch = _host(state.arch)
      if main_process:
        np.savez(os.path.join(workdir, f'arch_stage{s + 1}.npz'), **arch,
                 switches_normal=switches['normal'], switches_reduce=switches['reduce'])
      if s < len(cfg.stages) - 1:
        for cell in ('normal', 'reduce'):
          switches[cell] = genotypes.drop_weakest_ops(
              arch[f'alphas_{cell}'], switches[cell], stage.num_keep)

  max_skip = cfg.max_skip_normal if cfg.max_skip_normal >= 0 else None
  genotype = genotypes.derive_genotype(arch, cfg.use_betas, switches['normal'],
                                       switches['reduce'], max_skip_normal=max_skip)
  hours = (elapsed + time.time() - session_start) / 3600
  if main_process:
    genotypes.save(genotype, os.path.join(workdir, 'genotype.json'))
    np.savez(os.path.join(workdir, 'arch.npz'), **arch, switches_normal=switches['normal'],
             switches_reduce=switches['reduce'])
    reports.plot_genotype(genotype, workdir)
    device = jax.devices()[0]
    summary = {
        'method': method, 'dataset': info.name, 'seed': config.seed,
        'genotype': genotypes.to_dict(genotype),
        'search_cost_hours': hours, 'search_cost_days': hours / 24,
        'device_count': mesh.size, 'process_count': jax.process_count(),
        'platform': device.platform, 'device_kind': device.device_kind,
    }
    checkpoint.write_json(os.path.join(workdir, 'search_summary.json'), summary)
  ckpt.close()
  unit = 'GPU' if jax.devices()[0].platform == 'gpu' else jax.devices()[0].platform.upper()
  logging.info('Search done in %.3f %s-hours (%.4f %s-days). Genotype: %s', hours, unit,
               hours / 24, unit, genotype)
  return genotype
