"""Training a genotype from scratch and testing it.

Modes (each `fn(config, workdir)`, see `MODES`): `train` trains on the epoch driver (`loop`:
checkpoints every `checkpoint.every_steps` steps and every epoch, resume, signals), keeping the
checkpoint of lowest validation loss in `workdir/best`; `test` evaluates that checkpoint and
writes `results.json`. The FGSM analysis of a trained run is `analysis.fgsm`.
"""

import dataclasses
import functools
import json
import math
import os
from typing import Any, Optional

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pcp_jax import augment
from pcp_jax import checkpoint
from pcp_jax import data
from pcp_jax import defaults
from pcp_jax import genotypes
from pcp_jax import loop
from pcp_jax import losses
from pcp_jax import networks
from pcp_jax import ops
from pcp_jax import optim
from pcp_jax import parallel
from pcp_jax import reports

METRICS_FILE = 'train_metrics.jsonl'
METRICS = ('train_loss', 'train_acc', 'grad_norm')
# Config fields that may differ between a run and its resumption (everything else must match):
# `train.epochs` extends a finished run.
FREE_ON_RESUME = ('checkpoint.', 'num_devices', 'op_impl', 'modes', 'data.dir',
                  'data.download', 'data.max_test', 'fgsm.', 'train.epochs',
                  'train.eval_batch_size', 'train.log_every_steps', 'train.method')


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


def image_shape(info: data.DatasetInfo):
  return (info.image_size, info.image_size, info.channels)


def load_genotype(config: ml_collections.ConfigDict, workdir: str) -> genotypes.Genotype:
  """The genotype of `config.genotype`, checked against the one the workdir was run with."""
  genotype = genotypes.get(config.genotype)
  saved = os.path.join(workdir, 'genotype.json')
  if os.path.isfile(saved) and genotypes.load(saved) != genotype:
    raise ValueError(
        f'{workdir} holds a run of another genotype ({saved}) than genotype='
        f'{config.genotype!r}; use a new workdir or the same genotype.')
  return genotype


def create_model(config: ml_collections.ConfigDict, genotype: genotypes.Genotype,
                 info: data.DatasetInfo, num_devices: int = 1) -> networks.EvalNetwork:
  """The evaluation network; with `num_devices` > 1 its BN averages over the device axis."""
  return networks.EvalNetwork(genotype, num_classes=info.num_classes,
                              channels=config.train.channels, layers=config.train.layers,
                              auxiliary=config.train.auxiliary,
                              bn_axis_name=parallel.axis_name(num_devices),
                              kernels=ops.select_kernels(config.get('op_impl', 'auto')))


def make_optimizer(config, steps_per_epoch: int = 1):
  """(optimiser, schedule) of `train.optim` over `train.epochs`."""
  return optim.make(config.train.optim, config.train.epochs, steps_per_epoch)


def init_state(model: networks.EvalNetwork, tx, key, shape) -> TrainState:
  # Initialised without the device axis (outside a data-parallel step); same variables.
  variables = networks.init_variables(model.clone(bn_axis_name=None), key, shape)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables['batch_stats'], opt_state=tx.init(params))


def initial_state(model: networks.EvalNetwork, tx, key, shape) -> TrainState:
  """`init_state`, compiled without optimisations."""
  return parallel.run_once(functools.partial(init_state, model, tx, shape=shape), key)


def _template(model, tx, shape) -> dict:
  """Zeros shaped like a training checkpoint ({'state', 'sums'}), for restoring."""
  shapes = jax.eval_shape(functools.partial(init_state, model, tx, shape=shape),
                          jax.random.key(0))
  return {'state': loop.zeros_like_shapes(shapes),
          'sums': loop.zeros_like_shapes(loop.zero_sums(METRICS))}


# ---------------------------------------------------------------------------
# Steps.


def train_step(state: TrainState, images, labels, key, drop_path_rate, *, model, tx, mean, std,
               cutout_length: int, auxiliary_weight: float, num_devices: int = 1):
  """One optimizer step on a uint8 batch, augmented on the device; returns (state, metrics).

  `key` is the step's key and `drop_path_rate` a traced scalar (or None for no drop-path),
  so neither recompiles. With `num_devices` > 1 this runs on every device of a data-parallel
  step (see `parallel`): `images`/`labels` are the global batch and each device trains on its
  slice.
  """
  crop_key, cutout_key, drop_key = jax.random.split(key, 3)
  x = augment.to_float(images, ops.compute_dtype(model.dtype))
  x = augment.random_crop_flip(crop_key, x, padding=4)
  x = augment.normalize(x, mean, std)
  if cutout_length:
    x = augment.cutout(cutout_key, x, cutout_length)
  x = parallel.local_part(x, num_devices)
  labels = parallel.local_part(labels, num_devices)

  def loss_fn(params):
    (logits, aux_logits), updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        drop_path_rate=drop_path_rate,
        rngs={'drop_path': parallel.device_key(drop_key, num_devices)}, mutable=['batch_stats'])
    loss = losses.cross_entropy(logits, labels)
    if aux_logits is not None:
      loss += auxiliary_weight * losses.cross_entropy(aux_logits, labels)
    return loss, (logits, updates['batch_stats'])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  grads = parallel.mean(grads, num_devices)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=batch_stats, opt_state=opt_state)
  metrics = parallel.mean({'train_loss': loss, 'train_acc': losses.accuracy(logits, labels)},
                          num_devices)
  return state, dict(metrics, grad_norm=optax.tree.norm(grads))


def eval_step(variables, images, labels, mask, key=None, *, model, mean, std):
  """Summed loss, correct and top-5 correct counts over the examples where `mask` is 1."""
  del key  # the evaluation network draws nothing
  x = augment.normalize(augment.to_float(images), mean, std)
  logits, _ = model.apply(variables, x, train=False)
  per_example = optax.softmax_cross_entropy_with_integer_labels(ops.upcast(logits), labels)
  top5 = jnp.any(jax.lax.top_k(logits, min(5, logits.shape[-1]))[1] == labels[:, None], -1)
  return {'loss': jnp.sum(per_example * mask),
          'accuracy': jnp.sum((jnp.argmax(logits, axis=-1) == labels) * mask),
          'top5_accuracy': jnp.sum(top5 * mask)}


def _bind_step(config, model, tx, info, num_devices):
  cutout_length = config.train.cutout_length if config.train.cutout else 0
  return functools.partial(train_step, model=model, tx=tx, mean=info.mean, std=info.std,
                           cutout_length=cutout_length,
                           auxiliary_weight=config.train.auxiliary_weight,
                           num_devices=num_devices)


def make_train_step(config, model, tx, info, mesh=None):
  """One train step with this run's hyperparameters bound, data-parallel over `mesh` (default
  one device), jitted, the state donated: step(state, images, labels, key, drop_path_rate)."""
  mesh = mesh or parallel.make_mesh(1)
  step = _bind_step(config, model, tx, info, mesh.size)
  return jax.jit(parallel.data_parallel(step, mesh), donate_argnums=0)


def make_train_chunk(config, model, tx, info, mesh):
  """`loop.run_steps` of the train step, data-parallel over `mesh`, jitted, compiled at its
  first call: chunk(state, sums, images, labels, order, key, (drop_path_rate,), start, stop)
  with {'train'} dicts; donates `state` and `sums`."""
  step = _bind_step(config, model, tx, info, mesh.size)
  chunk = functools.partial(
      loop.run_steps, batch_size=config.train.batch_size,
      step_fn=lambda state, batch, key, rate: step(state, *batch['train'], key, rate))
  return parallel.CompiledOnFirstCall(
      jax.jit(parallel.data_parallel(chunk, mesh), donate_argnums=(0, 1)))


def make_eval_step(model, info):
  """eval(variables, images, labels, mask, key) for `loop.evaluate`, jitted."""
  return jax.jit(functools.partial(eval_step, model=model, mean=info.mean, std=info.std))


def _variables(state):
  return {'params': state.params, 'batch_stats': state.batch_stats}


# ---------------------------------------------------------------------------
# The train mode.


def is_better(val_loss: float, best_val_loss: Optional[float]) -> bool:
  """The paper's rule: keep a checkpoint whenever the validation loss decreases."""
  return math.isfinite(val_loss) and (best_val_loss is None or val_loss < best_val_loss)


def check_config(config) -> None:
  """Validates the train config, naming the option and the allowed values."""
  t = config.train
  ops.select_kernels(config.get('op_impl', 'auto'))
  optim.check(t.optim, 'train.optim')
  data.parse_val_split(t.val_split)
  defaults.check_fields(
      config, whole=[(f'train.{name}', 1) for name in ('channels', 'epochs', 'batch_size',
                                                       'eval_batch_size')]
      + [('train.layers', 3), ('train.cutout_length', 0), ('train.log_every_steps', 0)],
      booleans=('train.auxiliary', 'train.cutout'), at_least_zero=('train.auxiliary_weight',))
  if not 0 <= t.drop_path_prob < 1:
    raise ValueError(f'train.drop_path_prob must be in [0, 1), got {t.drop_path_prob}.')


def _read_rows(workdir: str) -> list:
  return loop.Rows(os.path.join(workdir, METRICS_FILE)).read()


@dataclasses.dataclass
class _Training:
  """What the parts of one training run share."""
  config: Any
  workdir: str
  mesh: Any
  genotype: genotypes.Genotype
  splits: data.Splits
  steps: int  # per epoch
  model: networks.EvalNetwork
  tx: Any
  schedule: Any

  def path(self, name):
    return os.path.join(self.workdir, name)

  def place(self, tree):
    return parallel.replicate(tree, self.mesh)


def _prepare(config, workdir) -> _Training:
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch(config.train.batch_size, mesh.size, 'train.batch_size')
  genotype = load_genotype(config, workdir)
  splits = data.train_splits(config)
  steps = len(splits.train_images) // config.train.batch_size
  if steps == 0:
    raise ValueError(f'train.batch_size={config.train.batch_size} exceeds the '
                     f'{len(splits.train_images)} training images.')
  tx, schedule = make_optimizer(config, steps)
  return _Training(config=config, workdir=workdir, mesh=mesh, genotype=genotype, splits=splits,
                   steps=steps, model=create_model(config, genotype, splits.info, mesh.size),
                   tx=tx, schedule=schedule)


def _restore_or_start(tr: _Training, ckpt, fingerprint, init_key):
  """(state, sums or None, metadata) to go on from; writes genotype.json and
  train_config.json once the workdir is found compatible (a refused run changes nothing)."""
  shape = image_shape(tr.splits.info)
  restored = loop.restore(ckpt, lambda meta: _template(tr.model, tr.tx, shape), fingerprint,
                          'training')
  if parallel.is_main_process():
    genotypes.save(tr.genotype, tr.path('genotype.json'))
    checkpoint.write_json(tr.path('train_config.json'),
                          json.loads(tr.config.to_json_best_effort()))
  if restored is None:
    return initial_state(tr.model, tr.tx, init_key, shape), None, {}
  _, tree, meta = restored
  logging.info('Resumed from step %d (epoch %d, %d steps into it).', int(tree['state'].step),
               meta['epoch'] + 1, meta['step'])
  return tree['state'], tree['sums'], meta


def _phase(tr: _Training, best, fingerprint, best_val_loss, train_key, order_key) -> loop.Phase:
  """Training as the driver's one phase: on-device chunks of the train step, validation and
  the best checkpoint at every epoch's end."""
  t, splits = tr.config.train, tr.splits
  chunk_fn = make_train_chunk(tr.config, tr.model, tr.tx, splits.info, tr.mesh)
  eval_fn = parallel.CompiledOnFirstCall(make_eval_step(tr.model, splits.info))
  images, labels = tr.place(({'train': splits.train_images},
                             {'train': splits.train_labels.astype(np.int32)}))
  best_val = {'loss': best_val_loss}

  def drop_path_rate(e):
    return t.drop_path_prob * e / t.epochs if t.drop_path_prob else None

  def epoch_inputs(e):
    rate = drop_path_rate(e)
    order = jax.random.permutation(jax.random.fold_in(order_key, e), len(splits.train_images))
    return (images, labels, tr.place({'train': order}), jax.random.fold_in(train_key, e),
            (None if rate is None else jnp.float32(rate),))

  def save_meta(state, e, st):
    del state, e, st
    return {'steps_per_epoch': tr.steps, 'best_val_loss': best_val['loss']}

  def end_epoch(state, means, e):
    val = loop.evaluate(eval_fn, _variables(state), splits.val_images, splits.val_labels,
                        t.eval_batch_size)
    improved = is_better(val['loss'], best_val['loss'])
    if improved:
      best_val['loss'] = val['loss']
      # Before the epoch's latest checkpoint: a crash between the two saves redoes the epoch.
      best.save((e + 1) * tr.steps, {'state': state, 'sums': loop.zero_sums(METRICS)},
                dict(save_meta(state, e + 1, 0), epoch=e + 1, step=0, config=fingerprint,
                     valid_loss=val['loss'], valid_acc=val['accuracy']))
    return dict(epoch=e + 1, **means, valid_loss=val['loss'], valid_acc=val['accuracy'],
                lr=float(tr.schedule(e * tr.steps)),
                drop_path_rate=float(drop_path_rate(e) or 0.0), best=improved)

  def log_row(row):
    logging.info('epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  lr %.3g  '
                 'drop-path %.3f  %.1fs%s', row['epoch'], t.epochs, row['train_loss'],
                 row['train_acc'], row['valid_loss'], row['valid_acc'], row['lr'],
                 row['drop_path_rate'], row['epoch_seconds'], '  (best)' if row['best'] else '')

  return loop.Phase(name='training', index=0, num_phases=None, epochs=t.epochs,
                    steps_per_epoch=tr.steps, first_step=0, metric_names=METRICS,
                    chunk_fn=chunk_fn, epoch_inputs=epoch_inputs, end_epoch=end_epoch,
                    save_meta=save_meta, log_row=log_row)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.genotype` from scratch (resuming from `workdir`); returns the last row.

  Writes genotype.json, train_config.json, train_metrics.jsonl (one row per epoch), the latest
  checkpoints in `workdir/checkpoints` and the one of lowest validation loss in `workdir/best`.
  """
  check_config(config)
  os.makedirs(workdir, exist_ok=True)
  tr = _prepare(config, workdir)
  init_key, train_key, order_key = jax.random.split(jax.random.key(config.seed), 3)
  fingerprint = loop.fingerprint(config, FREE_ON_RESUME)
  ckpt = checkpoint.Checkpointer(tr.path('checkpoints'), config.checkpoint.max_to_keep)
  best = checkpoint.Checkpointer(tr.path('best'), max_to_keep=1)
  state, sums, meta = _restore_or_start(tr, ckpt, fingerprint, init_key)
  epoch, step = meta.get('epoch', 0), meta.get('step', 0)
  rows = loop.Rows(tr.path(METRICS_FILE), parallel.is_main_process())
  rows.keep_until(epoch * tr.steps + step)
  info, t = tr.splits.info, config.train
  logging.info('Training %s (%d params without the auxiliary head) on %s: %d images, %d steps '
               'per epoch, epochs %d..%d.', config.genotype,
               networks.count_params(tr.genotype, t.channels, t.layers, info.num_classes,
                                     image_shape=image_shape(info)),
               info.name, len(tr.splits.train_images), tr.steps, epoch + 1, t.epochs)
  phase = _phase(tr, best, fingerprint, meta.get('best_val_loss'), train_key, order_key)
  with loop.session(workdir, config, 'train', ckpt=ckpt, rows=rows, what='training',
                    every_steps=config.checkpoint.every_steps,
                    log_every_steps=t.log_every_steps, meta={'config': fingerprint},
                    hint='Lower train.optim.lr (or set train.optim.grad_clip) and rerun in a '
                         'new workdir.',
                    total_steps=t.epochs * tr.steps, resume_step=epoch * tr.steps + step,
                    resumed=bool(meta), place=tr.place,
                    elapsed=meta.get('elapsed_seconds', 0.0)) as driver:
    loop.run_phase(driver, phase, tr.place(state), epoch, step,
                   None if sums is None else tr.place(sums))
  ckpt.close()
  best.close()
  all_rows = rows.read()
  return all_rows[-1] if all_rows else {}


# ---------------------------------------------------------------------------
# Test on the best checkpoint.


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str, model, info):
  """(state, checkpoint name, metadata) of the best checkpoint, else the latest with a warning."""
  for name in ('best', 'checkpoints'):
    try:
      restored = _restore_newest(config, os.path.join(workdir, name), model, info)
    except IOError as e:
      if name != 'best':
        raise
      logging.warning('%s', e)
      restored = None
    if restored is not None:
      if name != 'best':
        logging.warning('No best checkpoint in %s; using the latest one.', workdir)
      return restored[0], name, restored[1]
  raise FileNotFoundError(f'No checkpoint in {workdir}/best or {workdir}/checkpoints; run the '
                          'train mode first.')


def _restore_newest(config: ml_collections.ConfigDict, folder: str, model, info):
  """(state on the device, metadata) of the newest checkpoint in `folder` that restores, or
  None when there is none."""
  if not os.path.isdir(folder):
    return None
  template = _template(model, make_optimizer(config)[0], image_shape(info))
  restored = checkpoint.Checkpointer(folder, max_to_keep=None).restore_latest(template)
  return None if restored is None else (jax.device_put(restored[1]['state']), restored[2])


def test(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the best checkpoint on the test split; writes and returns results.json."""
  check_config(config)
  genotype = load_genotype(config, workdir)
  splits = data.train_splits(config)
  info = splits.info
  model = create_model(config, genotype, info)
  state, checkpoint_name, meta = restore_for_eval(config, workdir, model, info)
  eval_fn = make_eval_step(model, info)

  def evaluate(state):
    return loop.evaluate(eval_fn, _variables(state), splits.test_images, splits.test_labels,
                         config.train.eval_batch_size)

  metrics = evaluate(state)
  # The best checkpoint is chosen on the validation split, which is the test set under
  # val_split='test' (as the paper and DARTS do): the last epoch's accuracy is reported beside
  # it, a number no selection has seen.
  last = _restore_newest(config, os.path.join(workdir, 'checkpoints'), model, info)
  last_metrics = last and evaluate(last[0])
  count = functools.partial(networks.count_params, genotype, config.train.channels,
                            config.train.layers, info.num_classes,
                            image_shape=image_shape(info))
  rows = _read_rows(workdir)
  results = {
      'test_accuracy': metrics['accuracy'],
      'test_top5_accuracy': metrics['top5_accuracy'],
      'test_loss': metrics['loss'],
      'num_test_examples': len(splits.test_images),
      'params': count(auxiliary=False),
      'params_with_aux': count(auxiliary=config.train.auxiliary),
      'genotype': genotypes.to_dict(genotype),
      'genotype_source': config.genotype,
      'dataset': info.name,
      'method': reports.method_name(config.genotype, config.train.method),
      'search_cost_days': reports.search_summary(config.genotype).get('search_cost_days'),
      'epochs': rows[-1]['epoch'] if rows else config.train.epochs,
      'checkpoint': checkpoint_name,
      'checkpoint_epoch': meta.get('epoch'),
      'val_split': str(config.train.val_split),
      'last_test_accuracy': last_metrics['accuracy'] if last_metrics else None,
      'last_test_loss': last_metrics['loss'] if last_metrics else None,
      'last_checkpoint_epoch': last[1].get('epoch') if last else None,
      'train_seconds': rows[-1]['elapsed_seconds'] if rows else None,
  }
  if parallel.is_main_process():
    checkpoint.write_json(os.path.join(workdir, 'results.json'), results)
  logging.info('Test (%s checkpoint, epoch %s): accuracy %.4f (top-5 %.4f), loss %.4f on %d '
               'images; %d params.', checkpoint_name, meta.get('epoch'), metrics['accuracy'],
               metrics['top5_accuracy'], metrics['loss'], len(splits.test_images),
               results['params'])
  if last_metrics:
    logging.info('Test (last checkpoint, epoch %s): accuracy %.4f, loss %.4f.',
                 results['last_checkpoint_epoch'], last_metrics['accuracy'],
                 last_metrics['loss'])
  return results

