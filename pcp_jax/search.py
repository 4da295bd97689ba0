"""The architecture search: PC-DARTS, P-DARTS, PCP-DARTS and SS PCP-DARTS in one code path.

A search is a list of stages (`config.search.stages`). Each stage builds a fresh
supernet over the ops still on, trains it with first-order bilevel updates (an
architecture step on a validation batch, then a weight step on a training batch)
and, at its end, keeps the `num_keep` strongest ops per edge. The architecture
step's loss is `ss_factor * BarlowTwins + (1 - ss_factor) * CE`.
"""

import functools
import json
import logging
import math
import os
import time
from typing import Any

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


def _augment(key, images_uint8, mean, std):
  x = augment.random_crop_flip(key, augment.to_float(images_uint8))
  return augment.normalize(x, mean, std)


def _forward(model, params, arch, batch_stats, x, key, skip_rate):
  """Supernet forward in train mode; returns logits, pooled features, new batch stats."""
  k_ch, k_drop = jax.random.split(key)
  (logits, features), new_vars = model.apply(
      {'params': params, 'arch': arch, 'batch_stats': batch_stats}, x, train=True,
      skip_drop_rate=skip_rate, rngs={'channels': k_ch, 'dropout': k_drop},
      mutable=['batch_stats'])
  return logits, features, new_vars['batch_stats']


def arch_step(state: SearchState, images, labels, key, skip_rate, *, model, projector,
              tx_arch, tx_projector, ss_factor, bt_lambda, mean, std):
  """Architecture step on a validation batch: updates only 'arch' (and the projector).

  Loss: `ss_factor * BT + (1 - ss_factor) * CE`; CE on the usual crop/flip view, Barlow
  Twins on two stronger views through the projector (which the BT loss also trains).
  """
  k_aug, k_ce, k_views = jax.random.split(key, 3)

  def loss_fn(arch, proj_params, batch_stats, proj_stats):
    x = _augment(k_aug, images, mean, std)
    if ss_factor == 0:
      logits, _, batch_stats = _forward(model, state.params, arch, batch_stats, x, k_ce,
                                        skip_rate)
      ce = losses.cross_entropy(logits, labels)
      return ce, (batch_stats, proj_stats, {'arch_ce': ce, 'arch_bt': jnp.zeros(())})
    view_a, view_b = augment.barlow_twins_views(k_views, augment.to_float(images))
    xs = jnp.stack([x, augment.normalize(view_a, mean, std),
                    augment.normalize(view_b, mean, std)])
    # The CE batch and the two views go through the supernet as one vmapped call: the same
    # function as three separate forwards (BN statistics per slice), a third of the code.
    logits, features, stats = jax.vmap(
        lambda x, k: _forward(model, state.params, arch, batch_stats, x, k, skip_rate))(
            xs, jax.random.split(k_ce, 3))
    batch_stats = jax.tree_util.tree_map(lambda t: t[0], stats)  # running stats: the CE batch
    ce = losses.cross_entropy(logits[0], labels)
    z, new_proj = jax.vmap(lambda f: projector.apply(
        {'params': proj_params, 'batch_stats': proj_stats}, f, train=True,
        mutable=['batch_stats']))(features[1:])
    proj_stats = jax.tree_util.tree_map(lambda t: t[-1], new_proj['batch_stats'])
    bt = losses.barlow_twins_loss(z[0], z[1], lambd=bt_lambda)
    metrics = {'arch_ce': ce, 'arch_bt': bt}
    return losses.mixed_arch_loss(ce, bt, ss_factor), (batch_stats, proj_stats, metrics)

  proj = state.projector
  (loss, (batch_stats, proj_stats, metrics)), (g_arch, g_proj) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(
          state.arch, proj.get('params', {}), state.batch_stats, proj.get('batch_stats', {}))
  updates, arch_opt = tx_arch.update(g_arch, state.arch_opt, state.arch)
  arch = optax.apply_updates(state.arch, updates)
  new_proj, projector_opt = proj, state.projector_opt
  if proj:
    updates, projector_opt = tx_projector.update(g_proj, state.projector_opt, proj['params'])
    new_proj = {'params': optax.apply_updates(proj['params'], updates),
                'batch_stats': proj_stats}
  state = state.replace(arch=arch, arch_opt=arch_opt, batch_stats=batch_stats,
                        projector=new_proj, projector_opt=projector_opt)
  return state, dict(metrics, arch_loss=loss)


def weight_step(state: SearchState, images, labels, key, skip_rate, *, model, tx_weights,
                mean, std):
  """Weight step on a training batch: CE, updates only 'params' (and BN statistics)."""
  k_aug, k_fwd = jax.random.split(key)

  def loss_fn(params):
    x = _augment(k_aug, images, mean, std)
    logits, _, batch_stats = _forward(model, params, state.arch, state.batch_stats, x, k_fwd,
                                      skip_rate)
    return losses.cross_entropy(logits, labels), (batch_stats, losses.accuracy(logits, labels))

  (ce, (batch_stats, acc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, weight_opt = tx_weights.update(grads, state.weight_opt, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, weight_opt=weight_opt)
  return state, {'train_loss': ce, 'train_acc': acc}


def search_step(state: SearchState, batch, key, skip_rate, update_arch, *, model, projector,
                tx_weights, tx_arch, tx_projector, ss_factor, bt_lambda, mean, std):
  """One first-order search step: an architecture step, then a weight step.

  Args:
    state: the SearchState.
    batch: dict with `train_images`, `train_labels` (weight step) and `valid_images`,
      `valid_labels` (architecture step), uint8 images.
    key: this step's key; every rng stream is derived from it.
    skip_rate: skip-connect dropout rate (traced scalar).
    update_arch: traced bool; False during the warm-up (architecture frozen).
  """
  k_arch, k_weight = jax.random.split(key)

  def do_arch_step(state):
    return arch_step(state, batch['valid_images'], batch['valid_labels'], k_arch, skip_rate,
                     model=model, projector=projector, tx_arch=tx_arch,
                     tx_projector=tx_projector, ss_factor=ss_factor, bt_lambda=bt_lambda,
                     mean=mean, std=std)

  def skip_arch_step(state):
    zero = jnp.zeros(())
    return state, {'arch_ce': zero, 'arch_bt': zero, 'arch_loss': zero}

  state, arch_metrics = jax.lax.cond(update_arch, do_arch_step, skip_arch_step, state)
  state, weight_metrics = weight_step(state, batch['train_images'], batch['train_labels'],
                                      k_weight, skip_rate, model=model, tx_weights=tx_weights,
                                      mean=mean, std=std)
  return state, dict(arch_metrics, **weight_metrics)


def run_epoch(state, images, labels, order, key, skip_rate, update_arch, *, step_fn,
              batch_size, steps):
  """Runs `steps` search steps inside one `lax.scan` (no host round trips)."""

  def body(state, i):
    t_idx = jax.lax.dynamic_slice_in_dim(order['train'], i * batch_size, batch_size)
    v_idx = jax.lax.dynamic_slice_in_dim(order['valid'], i * batch_size, batch_size)
    batch = {'train_images': images['train'][t_idx], 'train_labels': labels['train'][t_idx],
             'valid_images': images['valid'][v_idx], 'valid_labels': labels['valid'][v_idx]}
    return step_fn(state, batch, jax.random.fold_in(key, i), skip_rate, update_arch)

  state, metrics = jax.lax.scan(body, state, jnp.arange(steps))
  return state, jax.tree_util.tree_map(jnp.mean, metrics)


def evaluate_batch(variables, images, labels, mask, key, *, model, mean, std):
  """Summed CE and correct count of a (padded) batch, BN in eval mode (running statistics)."""
  x = augment.normalize(augment.to_float(images), mean, std)
  logits, _ = model.apply(variables, x, train=False, rngs={'channels': key})
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
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


def build_stage(cfg, layers, epochs, switches, num_classes, image_shape, steps_per_epoch, key):
  """A fresh supernet over the ops still on, its projector, optimisers and initial state."""
  k_init, k_proj = jax.random.split(key)
  model = supernet.SearchNetwork(
      num_classes=num_classes, channels=cfg.channels, layers=layers,
      partial_k=cfg.partial_k, channel_mode=cfg.channel_mode, use_betas=cfg.use_betas,
      switches_normal=genotypes.switches_to_tuple(switches['normal']),
      switches_reduce=genotypes.switches_to_tuple(switches['reduce']))
  variables = supernet.init_variables(model, k_init, image_shape)
  tx_weights, lr_schedule = weight_optimizer(cfg, epochs, steps_per_epoch)
  tx_arch = arch_optimizer(cfg, cfg.arch_lr)
  tx_projector = arch_optimizer(cfg, cfg.projector_lr)
  projector = heads.Projector(tuple(cfg.projector_sizes))
  proj_vars = {}
  if cfg.ss_factor > 0:
    features = jnp.zeros((2, cfg.channels * 16), jnp.float32)  # 4 nodes x 4C channels
    proj_vars = dict(projector.init(k_proj, features))
  state = SearchState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables['batch_stats'], arch=variables['arch'], projector=proj_vars,
      weight_opt=tx_weights.init(variables['params']),
      arch_opt=tx_arch.init(variables['arch']),
      projector_opt=tx_projector.init(proj_vars['params']) if proj_vars else ())
  return model, projector, state, lr_schedule, (tx_weights, tx_arch, tx_projector)


def search(config, workdir):
  """Runs the configured search and writes genotype.json, metrics, arch weights, diagrams."""
  check_config(config)
  cfg = config.search
  os.makedirs(workdir, exist_ok=True)
  dataset = data_lib.load_dataset(
      config.data.dataset, config.data.source, config.data.dir or None,
      config.data.download, config.data.pad_to_32)
  info = dataset.info
  train_images, train_labels = _cap(dataset.train_images, dataset.train_labels,
                                    config.data.max_train)
  (w_x, w_y), (a_x, a_y) = data_lib.search_split(train_images, train_labels,
                                                  config.data.train_portion)
  images = {'train': jnp.asarray(w_x), 'valid': jnp.asarray(a_x)}
  labels = {'train': jnp.asarray(w_y, jnp.int32), 'valid': jnp.asarray(a_y, jnp.int32)}
  steps = min(len(w_x), len(a_x)) // cfg.batch_size
  if steps < 1:
    raise ValueError(f'search.batch_size ({cfg.batch_size}) is larger than the search '
                     f'splits ({len(w_x)} / {len(a_x)} images).')
  image_shape = train_images.shape[1:]
  mean, std = info.mean, info.std
  method = config.get('method', 'search')
  logging.info('Search %s on %s: %d + %d images, %d steps per epoch, %d stage(s).',
               method, info.name, len(w_x), len(a_x), steps, len(cfg.stages))

  root = jax.random.PRNGKey(config.seed)
  switches = {'normal': _initial_switches(cfg.initial_ops),
              'reduce': _initial_switches(cfg.initial_ops)}
  metrics_path = os.path.join(workdir, 'search_metrics.jsonl')
  start_time = time.time()
  arch = None
  for s, stage in enumerate(cfg.stages):
    last = s == len(cfg.stages) - 1
    stage_key = jax.random.fold_in(root, s)
    k_init, k_steps, k_order, k_eval = jax.random.split(stage_key, 4)
    t_compile = time.time()
    stage_setup = build_stage(cfg, stage.layers, stage.epochs, switches, info.num_classes,
                              image_shape, steps, k_init)
    model, projector, state, lr_schedule, (tx_weights, tx_arch, tx_projector) = stage_setup
    step_fn = functools.partial(
        search_step, model=model, projector=projector, tx_weights=tx_weights,
        tx_arch=tx_arch, tx_projector=tx_projector, ss_factor=float(cfg.ss_factor),
        bt_lambda=float(cfg.bt_lambda), mean=mean, std=std)
    epoch_fn = jax.jit(functools.partial(run_epoch, step_fn=step_fn,
                                         batch_size=cfg.batch_size, steps=steps),
                       donate_argnums=(0,))
    eval_fn = jax.jit(functools.partial(evaluate_batch, model=model, mean=mean, std=std))
    n_ops = int(switches['normal'][0].sum())
    logging.info('Stage %d/%d: %d cells, %d ops per edge, %d epochs (%d warm-up).',
                 s + 1, len(cfg.stages), stage.layers, n_ops, stage.epochs,
                 stage.warmup_epochs)
    for epoch in range(stage.epochs):
      t_epoch = time.time()
      skip_rate = skip_dropout_rate(stage.skip_dropout, epoch, stage.epochs,
                                    stage.warmup_epochs)
      k_o = jax.random.fold_in(k_order, epoch)
      order = {'train': jax.random.permutation(jax.random.fold_in(k_o, 0), len(w_x)),
               'valid': jax.random.permutation(jax.random.fold_in(k_o, 1), len(a_x))}
      lr = float(lr_schedule(state.step))
      state, train_metrics = epoch_fn(
          state, images, labels, order, jax.random.fold_in(k_steps, epoch),
          jnp.float32(skip_rate), jnp.bool_(epoch >= stage.warmup_epochs))
      train_metrics = {k: float(v) for k, v in _host(train_metrics).items()}
      if not all(math.isfinite(v) for v in train_metrics.values()):
        raise FloatingPointError(
            f'search stage {s + 1} epoch {epoch + 1}: a loss became NaN or infinite '
            f'({train_metrics}); lower search.lr or search.arch_lr.')
      valid_loss, valid_acc = evaluate(
          eval_fn, {'params': state.params, 'arch': state.arch,
                    'batch_stats': state.batch_stats},
          images['valid'], labels['valid'], cfg.eval_batch_size, k_eval)
      arch = _host(state.arch)
      genotype = genotypes.derive_genotype(
          arch, cfg.use_betas, switches['normal'], switches['reduce'])
      row = dict(stage=s + 1, epoch=epoch + 1, layers=stage.layers, ops_per_edge=n_ops,
                 **train_metrics, valid_loss=valid_loss, valid_acc=valid_acc, lr=lr,
                 skip_dropout=skip_rate, arch_frozen=epoch < stage.warmup_epochs,
                 epoch_seconds=time.time() - t_epoch,
                 elapsed_seconds=time.time() - start_time,
                 genotype=genotypes.to_dict(genotype))
      if epoch == 0:
        row['compile_and_first_epoch_seconds'] = time.time() - t_compile
      with open(metrics_path, 'a') as f:
        f.write(json.dumps(row) + '\n')
      logging.info(
          'stage %d/%d epoch %d/%d: train CE %.4f acc %.4f | valid CE %.4f acc %.4f | '
          'arch loss %.4f (CE %.4f, BT %.4f)%s | lr %.5f skip-drop %.3f | %.1fs',
          s + 1, len(cfg.stages), epoch + 1, stage.epochs, row['train_loss'],
          row['train_acc'], valid_loss, valid_acc, row['arch_loss'], row['arch_ce'],
          row['arch_bt'], ' [arch frozen]' if row['arch_frozen'] else '', lr, skip_rate,
          row['epoch_seconds'])
    np.savez(os.path.join(workdir, f'arch_stage{s + 1}.npz'),
             **arch, switches_normal=switches['normal'], switches_reduce=switches['reduce'])
    if not last:
      for cell in ('normal', 'reduce'):
        switches[cell] = genotypes.drop_weakest_ops(
            arch[f'alphas_{cell}'], switches[cell], stage.num_keep)

  max_skip = cfg.max_skip_normal if cfg.max_skip_normal >= 0 else None
  genotype = genotypes.derive_genotype(arch, cfg.use_betas, switches['normal'],
                                       switches['reduce'], max_skip_normal=max_skip)
  genotypes.save(genotype, os.path.join(workdir, 'genotype.json'))
  np.savez(os.path.join(workdir, 'arch.npz'), **arch, switches_normal=switches['normal'],
           switches_reduce=switches['reduce'])
  reports.plot_genotype(genotype, workdir)
  hours = (time.time() - start_time) / 3600
  device = jax.devices()[0]
  summary = {
      'method': method, 'dataset': info.name, 'seed': config.seed,
      'genotype': genotypes.to_dict(genotype),
      'search_cost_hours': hours, 'search_cost_days': hours / 24,
      'device_count': jax.device_count(), 'platform': device.platform,
      'device_kind': device.device_kind,
  }
  checkpoint.write_json(os.path.join(workdir, 'search_summary.json'), summary)
  unit = 'GPU' if device.platform == 'gpu' else device.platform.upper()
  logging.info('Search done in %.3f %s-hours (%.4f %s-days). Genotype: %s', hours, unit,
               hours / 24, unit, genotype)
  return genotype
