"""Training a genotype from scratch, testing it, and its FGSM robustness analysis.

Modes (each `fn(config, workdir)`, see `MODES`): `train` trains with checkpoints every epoch
(resuming from the latest one), keeping the checkpoint of lowest validation loss in
`workdir/best`; `test` evaluates that checkpoint and writes `results.json`; `fgsm` attacks it and
writes `fgsm.json` and plots.
"""

import functools
import json
import math
import os
import time
from typing import Any, Callable, NamedTuple, Optional, Sequence

from absl import logging
import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from pcp_jax import analysis
from pcp_jax import augment
from pcp_jax import checkpoint
from pcp_jax import data
from pcp_jax import genotypes
from pcp_jax import losses
from pcp_jax import networks
from pcp_jax import ops
from pcp_jax import parallel

OPTIMIZERS = ('adam', 'sgd')
LR_SCHEDULES = ('constant', 'cosine')
METRICS_FILE = 'train_metrics.jsonl'


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


class Splits(NamedTuple):
  """Host arrays (uint8 NHWC images, int32 labels) of the three splits a run uses."""
  train_images: np.ndarray
  train_labels: np.ndarray
  val_images: np.ndarray
  val_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  info: data.DatasetInfo


# ---------------------------------------------------------------------------
# Setup: data, genotype, model, optimizer.


def parse_val_split(value) -> Optional[float]:
  """None for 'test' (validate on the test set), else the held-out fraction of the train set."""
  if str(value).strip().lower() == 'test':
    return None
  try:
    fraction = float(value)
  except ValueError:
    fraction = -1.0
  if not 0.0 < fraction < 1.0:
    raise ValueError(
        f"train.val_split must be 'test' or a fraction in (0, 1) such as '0.1', got {value!r}.")
  return fraction


def prepare_data(config: ml_collections.ConfigDict) -> Splits:
  """Loads the dataset, applies the data.max_* caps and cuts the validation split."""
  dataset = data.load_dataset(config.data.dataset, config.data.source,
                              config.data.dir or None, config.data.download,
                              config.data.pad_to_32)
  train_images, train_labels = dataset.train_images, dataset.train_labels
  test_images, test_labels = dataset.test_images, dataset.test_labels
  if config.data.max_train:
    train_images, train_labels = (train_images[:config.data.max_train],
                                  train_labels[:config.data.max_train])
  if config.data.max_test:
    test_images, test_labels = (test_images[:config.data.max_test],
                                test_labels[:config.data.max_test])
  fraction = parse_val_split(config.train.val_split)
  if fraction is None:
    val_images, val_labels = test_images, test_labels
  else:
    split = len(train_images) - int(round(fraction * len(train_images)))
    if split in (0, len(train_images)):
      raise ValueError(f'train.val_split={config.train.val_split} leaves no training or no '
                       f'validation images out of {len(train_images)}.')
    val_images, val_labels = train_images[split:], train_labels[split:]
    train_images, train_labels = train_images[:split], train_labels[:split]
  return Splits(train_images, train_labels, val_images, val_labels, test_images, test_labels,
                dataset.info)


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


def _genotype_dir(source: str) -> Optional[str]:
  """The folder a genotype was loaded from (a search workdir), or None for a reference name."""
  if source in genotypes.REFERENCE_GENOTYPES:
    return None
  return source if os.path.isdir(source) else os.path.dirname(os.path.abspath(source))


def _search_summary(source: str) -> dict:
  folder = _genotype_dir(source)
  path = folder and os.path.join(folder, 'search_summary.json')
  if not path or not os.path.isfile(path):
    return {}
  with open(path) as f:
    return json.load(f)


def method_name(config: ml_collections.ConfigDict) -> str:
  """config.train.method, else the reference name or the search workdir's (or file's) name."""
  source = config.genotype
  if config.train.method:
    return config.train.method
  if source in genotypes.REFERENCE_GENOTYPES:
    return source
  summary_method = _search_summary(source).get('method')
  if summary_method:
    return summary_method
  if os.path.isdir(source):
    return os.path.basename(os.path.normpath(source))
  stem = os.path.splitext(os.path.basename(source))[0]
  return os.path.basename(_genotype_dir(source)) if stem == 'genotype' else stem


def create_model(config: ml_collections.ConfigDict, genotype: genotypes.Genotype,
                 info: data.DatasetInfo, num_devices: int = 1) -> networks.EvalNetwork:
  """The evaluation network; with `num_devices` > 1 its BN averages over the device axis."""
  return networks.EvalNetwork(genotype, num_classes=info.num_classes,
                              channels=config.train.channels, layers=config.train.layers,
                              auxiliary=config.train.auxiliary,
                              bn_axis_name=parallel.axis_name(num_devices),
                              op_impl=config.get('op_impl', 'auto'))


def learning_rate_schedule(train_config: ml_collections.ConfigDict,
                           steps_per_epoch: int) -> Callable:
  """The learning rate at an optimizer step; 'cosine' changes it once per epoch, as DARTS does."""
  lr, lr_min, epochs = train_config.lr, train_config.lr_min, train_config.epochs
  if train_config.lr_schedule == 'constant':
    return optax.constant_schedule(lr)
  if train_config.lr_schedule == 'cosine':
    def schedule(step):
      epoch = jnp.minimum(step // steps_per_epoch, epochs)
      return lr_min + 0.5 * (lr - lr_min) * (1.0 + jnp.cos(jnp.pi * epoch / epochs))
    return schedule
  raise ValueError(f'Unknown train.lr_schedule {train_config.lr_schedule!r}; expected one of '
                   f'{list(LR_SCHEDULES)}.')


def make_optimizer(train_config: ml_collections.ConfigDict,
                   steps_per_epoch: int = 1) -> optax.GradientTransformation:
  """Clip, coupled weight decay (added to the gradient, as PyTorch does), then Adam or SGD."""
  if train_config.optimizer not in OPTIMIZERS:
    raise ValueError(f'Unknown train.optimizer {train_config.optimizer!r}; expected one of '
                     f'{list(OPTIMIZERS)}.')
  schedule = learning_rate_schedule(train_config, steps_per_epoch)
  if train_config.optimizer == 'adam':
    optimizer = optax.adam(schedule, b1=train_config.adam_b1, b2=train_config.adam_b2)
  else:
    optimizer = optax.sgd(schedule, momentum=train_config.momentum)
  clip = (optax.clip_by_global_norm(train_config.grad_clip) if train_config.grad_clip > 0
          else optax.identity())
  return optax.chain(clip, optax.add_decayed_weights(train_config.weight_decay), optimizer)


def init_state(model: networks.EvalNetwork, tx: optax.GradientTransformation, key,
               shape) -> TrainState:
  # Initialised without the device axis (outside a data-parallel step); same variables.
  variables = networks.init_variables(model.clone(bn_axis_name=None), key, shape)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables['batch_stats'], opt_state=tx.init(params))


def initial_state(model: networks.EvalNetwork, tx: optax.GradientTransformation, key,
                  shape) -> TrainState:
  """`init_state`, compiled without optimisations."""
  return parallel.run_once(functools.partial(init_state, model, tx, shape=shape), key)


def _state_template(model, tx, shape) -> TrainState:
  """Zeros shaped like the train state, for restoring (traced only, nothing is computed)."""
  shapes = jax.eval_shape(functools.partial(init_state, model, tx, shape=shape),
                          jax.random.key(0))
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# ---------------------------------------------------------------------------
# Steps.


def train_step(state: TrainState, images, labels, key, drop_path_rate, *, model, tx, mean, std,
               cutout_length: int, auxiliary_weight: float, num_devices: int = 1):
  """One optimizer step on a uint8 batch, augmented on the device; returns (state, metrics).

  `key` is the run's training key (the step's own key is folded in from `state.step`) and
  `drop_path_rate` a traced scalar (or None for no drop-path), so neither recompiles. With
  `num_devices` > 1 this runs on every device of a data-parallel step (see `parallel`):
  `images`/`labels` are the global batch and each device trains on its slice.
  """
  crop_key, cutout_key, drop_key = jax.random.split(jax.random.fold_in(key, state.step), 3)
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
  metrics = parallel.mean({'loss': loss, 'accuracy': losses.accuracy(logits, labels)},
                          num_devices)
  return state, dict(metrics, grad_norm=optax.tree.norm(grads))


def eval_step(state: TrainState, images, labels, mask, *, model, mean, std):
  """Summed loss and correct count over the examples where `mask` is 1 (eval mode)."""
  x = augment.normalize(augment.to_float(images), mean, std)
  logits, _ = model.apply({'params': state.params, 'batch_stats': state.batch_stats}, x,
                          train=False)
  per_example = optax.softmax_cross_entropy_with_integer_labels(
      ops.upcast(logits), labels)
  correct = (jnp.argmax(logits, axis=-1) == labels) & (mask > 0)
  return {'loss_sum': jnp.sum(per_example * mask), 'correct': jnp.sum(correct, dtype=jnp.int32)}


def evaluate(eval_fn, state: TrainState, images: np.ndarray, labels: np.ndarray,
             batch_size: int) -> dict:
  """Mean loss and accuracy over a whole split; the last batch is padded so one compile serves."""
  if len(images) == 0:
    raise ValueError('Cannot evaluate on an empty split.')
  batch_size = min(batch_size, len(images))
  totals = []
  for start in range(0, len(images), batch_size):
    x, y = images[start:start + batch_size], labels[start:start + batch_size]
    mask = np.ones(batch_size, np.float32)
    if len(x) < batch_size:
      mask[len(x):] = 0
      x = np.concatenate([x, np.zeros((batch_size - len(x),) + x.shape[1:], x.dtype)])
      y = np.concatenate([y, np.zeros(batch_size - len(y), y.dtype)])
    totals.append(eval_fn(state, x, y, mask))
  totals = jax.device_get(totals)
  return {'loss': float(sum(t['loss_sum'] for t in totals) / len(images)),
          'accuracy': int(sum(t['correct'] for t in totals)) / len(images)}


def make_train_step(config, model, tx, info, mesh=None):
  """The train step with this run's hyperparameters bound, data-parallel over `mesh` (default
  one device), jitted, the state donated."""
  mesh = mesh or parallel.make_mesh(1)
  cutout_length = config.train.cutout_length if config.train.cutout else 0
  step = functools.partial(train_step, model=model, tx=tx, mean=info.mean, std=info.std,
                           cutout_length=cutout_length,
                           auxiliary_weight=config.train.auxiliary_weight,
                           num_devices=mesh.size)
  return jax.jit(parallel.data_parallel(step, mesh), donate_argnums=0)


def make_eval_step(model, info):
  return jax.jit(functools.partial(eval_step, model=model, mean=info.mean, std=info.std))


@functools.partial(jax.jit, static_argnums=(1, 2))
def _epoch_order(key, num_examples: int, batch_size: int):
  """A fresh permutation cut into (steps, batch_size) indices; the last partial batch is dropped."""
  steps = num_examples // batch_size
  return jax.random.permutation(key, num_examples)[:steps * batch_size].reshape(steps, batch_size)


@jax.jit
def _take_batch(images, labels, order, i):
  return images[order[i]], labels[order[i]]


# ---------------------------------------------------------------------------
# The training loop.


def is_better(val_loss: float, best_val_loss: Optional[float]) -> bool:
  """The paper's rule: keep a checkpoint whenever the validation loss decreases."""
  return math.isfinite(val_loss) and (best_val_loss is None or val_loss < best_val_loss)


def _read_metric_rows(workdir: str) -> list:
  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def _keep_metric_rows(workdir: str, last_epoch: int) -> None:
  """Drops the rows of epochs after the checkpoint a run resumes from (they are redone)."""
  rows = [r for r in _read_metric_rows(workdir) if r['epoch'] <= last_epoch]
  tmp = os.path.join(workdir, METRICS_FILE + '.tmp')
  with open(tmp, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  os.replace(tmp, os.path.join(workdir, METRICS_FILE))


def _append_metric_row(workdir: str, row: dict) -> None:
  with open(os.path.join(workdir, METRICS_FILE), 'a') as f:
    f.write(json.dumps(row) + '\n')


class _EpochMetrics:
  """Sums the step metrics of an epoch, fetched in groups so the device is not stalled per step."""

  def __init__(self, epoch: int, first_step: int, steps_per_epoch: int,
               sums: Optional[dict] = None):
    self.epoch = epoch
    self.next_step = first_step  # within the epoch
    self.steps_per_epoch = steps_per_epoch
    self.sums = dict(sums or {'loss': 0.0, 'accuracy': 0.0, 'steps': 0})
    self.pending = []

  def add(self, metrics):
    self.pending.append(metrics)

  def flush(self):
    """Fetches pending metrics; raises FloatingPointError at the first non-finite loss."""
    for metrics in jax.device_get(self.pending):
      loss = float(metrics['loss'])
      if not math.isfinite(loss):
        self.pending = []
        raise FloatingPointError(
            f'Training loss is {loss} at epoch {self.epoch + 1}, step {self.next_step + 1} of '
            f'{self.steps_per_epoch} (global step '
            f'{self.epoch * self.steps_per_epoch + self.next_step + 1}); stopping. The last good '
            'checkpoint is kept: lower train.lr (or enable train.grad_clip) and rerun to resume '
            'from it.')
      self.sums['loss'] += loss
      self.sums['accuracy'] += float(metrics['accuracy'])
      self.sums['steps'] += 1
      self.next_step += 1
    self.pending = []

  def means(self):
    steps = max(self.sums['steps'], 1)
    return self.sums['loss'] / steps, self.sums['accuracy'] / steps


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.genotype` from scratch (resuming from `workdir`); returns the last row.

  Writes genotype.json, train_config.json, train_metrics.jsonl (one row per epoch), the latest
  checkpoints in `workdir/checkpoints` and the one of lowest validation loss in `workdir/best`.
  """
  os.makedirs(workdir, exist_ok=True)
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch(config.train.batch_size, mesh.size, 'train.batch_size')
  main_process = parallel.is_main_process()
  genotype = load_genotype(config, workdir)
  splits = prepare_data(config)
  info = splits.info
  num_train, batch_size, epochs = (len(splits.train_images), config.train.batch_size,
                                   config.train.epochs)
  steps_per_epoch = num_train // batch_size
  if steps_per_epoch == 0:
    raise ValueError(f'train.batch_size={batch_size} exceeds the {num_train} training images.')
  model = create_model(config, genotype, info, mesh.size)
  tx = make_optimizer(config.train, steps_per_epoch)
  schedule = learning_rate_schedule(config.train, steps_per_epoch)
  if main_process:
    genotypes.save(genotype, os.path.join(workdir, 'genotype.json'))
    with open(os.path.join(workdir, 'train_config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=1) + '\n')

  init_key, train_key, order_key = jax.random.split(jax.random.key(config.seed), 3)
  latest = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'),
                                   config.checkpoint.max_to_keep)
  best = checkpoint.Checkpointer(os.path.join(workdir, 'best'), max_to_keep=1)
  restored = latest.restore_latest(_state_template(model, tx, image_shape(info)))
  if restored is None:
    state = initial_state(model, tx, init_key, image_shape(info))
    meta = {}
  else:
    _, state, meta = restored
    if meta.get('steps_per_epoch') != steps_per_epoch:
      raise ValueError(
          f'The checkpoint in {latest.directory} was made with {meta.get("steps_per_epoch")} '
          f'steps per epoch, this config gives {steps_per_epoch} (batch size or data changed); '
          'use a new workdir.')
  if main_process:
    _keep_metric_rows(workdir, meta.get('epoch', 0))
  state = parallel.replicate(state, mesh)
  step = int(state.step)
  start_epoch, skip_steps = divmod(step, steps_per_epoch)
  best_val_loss = meta.get('best_val_loss')
  wall_time = meta.get('wall_time_s', 0.0)
  num_params = networks.count_params(genotype, config.train.channels, config.train.layers,
                                     info.num_classes, image_shape=image_shape(info))
  logging.info('Training %s (%d params without the auxiliary head) on %s: %d images, %d steps '
               'per epoch, epochs %d..%d.', config.genotype, num_params, info.name,
               num_train, steps_per_epoch, start_epoch + 1, epochs)
  if restored is not None:
    logging.info('Resumed from step %d (epoch %d, %d steps into it).', step, start_epoch + 1,
                 skip_steps)

  # Compiled ahead of their first runs, the compiler's leftovers trimmed (host memory).
  train_fn = parallel.CompiledOnFirstCall(make_train_step(config, model, tx, info, mesh))
  eval_fn = parallel.CompiledOnFirstCall(make_eval_step(model, info))
  train_images, train_labels = parallel.replicate((splits.train_images, splits.train_labels),
                                                  mesh)
  every = config.checkpoint.every_steps
  rows = _read_metric_rows(workdir)
  row = rows[-1] if rows else {}
  epoch_metrics, epoch_start = None, time.time()
  try:
    for epoch in range(start_epoch, epochs):
      epoch_start = time.time()
      drop_path_rate = (np.float32(config.train.drop_path_prob * epoch / epochs)
                        if config.train.drop_path_prob else None)
      order = _epoch_order(jax.random.fold_in(order_key, epoch), num_train, batch_size)
      first = skip_steps if epoch == start_epoch else 0
      epoch_metrics = _EpochMetrics(epoch, first, steps_per_epoch,
                                    meta.get('partial_epoch') if first else None)
      for i in range(first, steps_per_epoch):
        images, labels = _take_batch(train_images, train_labels, order, i)
        state, metrics = train_fn(state, images, labels, train_key, drop_path_rate)
        epoch_metrics.add(metrics)
        save_now = every > 0 and (i + 1) % every == 0 and i + 1 < steps_per_epoch
        if (i + 1) % config.train.log_every_steps == 0 or i + 1 == steps_per_epoch or save_now:
          epoch_metrics.flush()  # raises on a non-finite loss before anything is saved
          logging.info('epoch %d step %d/%d: train loss %.4f', epoch + 1, i + 1,
                       steps_per_epoch, epoch_metrics.means()[0])
        if save_now:
          latest.save(int(state.step), state, _partial_epoch_meta(
              state, epoch_metrics, steps_per_epoch, best_val_loss,
              wall_time + time.time() - epoch_start))
      train_loss, train_accuracy = epoch_metrics.means()
      val = evaluate(eval_fn, state, splits.val_images, splits.val_labels,
                     config.train.eval_batch_size)
      wall_time += time.time() - epoch_start
      improved = is_better(val['loss'], best_val_loss)
      if improved:
        best_val_loss = val['loss']
      row = {'epoch': epoch + 1, 'step': int(state.step), 'train_loss': train_loss,
             'train_accuracy': train_accuracy, 'val_loss': val['loss'],
             'val_accuracy': val['accuracy'], 'lr': float(schedule(epoch * steps_per_epoch)),
             'drop_path_rate': float(drop_path_rate or 0.0),
             'epoch_time_s': time.time() - epoch_start, 'wall_time_s': wall_time,
             'best': improved}
      logging.info('epoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  lr %.3g  '
                   'drop-path %.3f  %.1fs%s', epoch + 1, epochs, train_loss, train_accuracy,
                   val['loss'], val['accuracy'], row['lr'], row['drop_path_rate'],
                   row['epoch_time_s'], '  (best)' if improved else '')
      if main_process:
        _append_metric_row(workdir, row)
      meta = {'epoch': epoch + 1, 'steps_per_epoch': steps_per_epoch,
              'best_val_loss': best_val_loss, 'val_loss': val['loss'],
              'val_accuracy': val['accuracy'], 'wall_time_s': wall_time}
      # Best first: a crash between the two saves then redoes this epoch rather than losing it.
      if improved:
        best.save(int(state.step), state, meta)
      latest.save(int(state.step), state, meta)
      epoch_metrics = None
  except KeyboardInterrupt:
    _save_interrupted(latest, state, epoch_metrics, steps_per_epoch, best_val_loss,
                      wall_time + time.time() - epoch_start)
    raise
  return row


def _partial_epoch_meta(state, epoch_metrics, steps_per_epoch, best_val_loss, wall_time):
  """Checkpoint metadata of a state reached mid-epoch (with the epoch's metric sums so far)."""
  return {'epoch': int(state.step) // steps_per_epoch, 'steps_per_epoch': steps_per_epoch,
          'best_val_loss': best_val_loss, 'wall_time_s': wall_time,
          'partial_epoch': epoch_metrics.sums if epoch_metrics else None}


def _save_interrupted(latest, state, epoch_metrics, steps_per_epoch, best_val_loss, wall_time):
  """Saves the state reached mid-epoch, so that rerunning continues at the next step."""
  try:
    if epoch_metrics is not None:
      epoch_metrics.flush()
    step = int(state.step)
    if step % steps_per_epoch == 0:
      # An epoch's end is checkpointed only with its validation; rerunning redoes that part.
      logging.warning('Interrupted at an epoch boundary; rerun the same command to resume '
                      'from the checkpoint in %s.', latest.directory)
      return
    latest.save(step, state, _partial_epoch_meta(state, epoch_metrics, steps_per_epoch,
                                                 best_val_loss, wall_time))
    logging.warning('Interrupted: saved step %d to %s; rerun the same command to resume.',
                    step, latest.directory)
  except Exception as e:  # pylint: disable=broad-except
    # E.g. the interrupt arrived while the step held the (donated) state.
    logging.warning('Interrupted: could not save the current state (%s); the last epoch '
                    'checkpoint in %s is kept.', e, latest.directory)


# ---------------------------------------------------------------------------
# Test and FGSM on the best checkpoint.


def restore_for_eval(config: ml_collections.ConfigDict, workdir: str, model, info):
  """(state, checkpoint name, metadata) of the best checkpoint, else the latest with a warning."""
  for name in ('best', 'checkpoints'):
    restored = _restore_newest(config, os.path.join(workdir, name), model, info)
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
  template = _state_template(model, make_optimizer(config.train), image_shape(info))
  restored = checkpoint.Checkpointer(folder, max_to_keep=None).restore_latest(template)
  return None if restored is None else (jax.device_put(restored[1]), restored[2])


def test(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Evaluates the best checkpoint on the test split; writes and returns results.json."""
  genotype = load_genotype(config, workdir)
  splits = prepare_data(config)
  info = splits.info
  model = create_model(config, genotype, info)
  state, checkpoint_name, meta = restore_for_eval(config, workdir, model, info)
  eval_fn = make_eval_step(model, info)
  metrics = evaluate(eval_fn, state, splits.test_images, splits.test_labels,
                     config.train.eval_batch_size)
  # The best checkpoint is chosen on the validation split, which is the test set under
  # val_split='test' (as the paper and DARTS do): the last epoch's accuracy is reported beside
  # it, a number no selection has seen.
  last = _restore_newest(config, os.path.join(workdir, 'checkpoints'), model, info)
  last_metrics = last and evaluate(eval_fn, last[0], splits.test_images, splits.test_labels,
                                   config.train.eval_batch_size)
  count = functools.partial(networks.count_params, genotype, config.train.channels,
                            config.train.layers, info.num_classes,
                            image_shape=image_shape(info))
  rows = _read_metric_rows(workdir)
  results = {
      'test_accuracy': metrics['accuracy'],
      'test_loss': metrics['loss'],
      'num_test_examples': len(splits.test_images),
      'params': count(auxiliary=False),
      'params_with_aux': count(auxiliary=config.train.auxiliary),
      'genotype': genotypes.to_dict(genotype),
      'genotype_source': config.genotype,
      'dataset': info.name,
      'method': method_name(config),
      'search_cost_days': _search_summary(config.genotype).get('search_cost_days'),
      'epochs': rows[-1]['epoch'] if rows else config.train.epochs,
      'checkpoint': checkpoint_name,
      'checkpoint_epoch': meta.get('epoch'),
      'val_split': str(config.train.val_split),
      'last_test_accuracy': last_metrics['accuracy'] if last_metrics else None,
      'last_test_loss': last_metrics['loss'] if last_metrics else None,
      'last_checkpoint_epoch': last[1].get('epoch') if last else None,
      'wall_time_s': rows[-1]['wall_time_s'] if rows else None,
  }
  if parallel.is_main_process():
    checkpoint.write_json(os.path.join(workdir, 'results.json'), results)
  logging.info('Test (%s checkpoint, epoch %s): accuracy %.4f, loss %.4f on %d images; %d params.',
               checkpoint_name, meta.get('epoch'), metrics['accuracy'], metrics['loss'],
               len(splits.test_images), results['params'])
  if last_metrics:
    logging.info('Test (last checkpoint, epoch %s): accuracy %.4f, loss %.4f.',
                 results['last_checkpoint_epoch'], last_metrics['accuracy'],
                 last_metrics['loss'])
  return results


def fgsm(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """FGSM sweep of the best checkpoint on the first test images; writes fgsm.json and plots."""
  genotype = load_genotype(config, workdir)
  splits = prepare_data(config)
  info = splits.info
  model = create_model(config, genotype, info)
  state, checkpoint_name, meta = restore_for_eval(config, workdir, model, info)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}

  def logits_fn(x_pixels):
    logits, _ = model.apply(variables, augment.normalize(x_pixels, info.mean, info.std),
                            train=False)
    return logits

  num = config.fgsm.num_examples or len(splits.test_images)
  images = np.asarray(augment.to_float(splits.test_images[:num]))
  sweep = analysis.fgsm_sweep(logits_fn, images, splits.test_labels[:num], list(config.fgsm.eps),
                              batch_size=config.fgsm.batch_size,
                              example_indices=list(config.fgsm.example_indices))
  method = method_name(config)
  results = dict(sweep, method=method, dataset=info.name, genotype_source=config.genotype,
                 num_examples=len(images), checkpoint=checkpoint_name,
                 checkpoint_epoch=meta.get('epoch'))
  if parallel.is_main_process():
    checkpoint.write_json(os.path.join(workdir, 'fgsm.json'), results)
    analysis.plot_fgsm({method: sweep}, workdir, prefix='fgsm')
  logging.info('FGSM accuracy by eps %s: %s', sweep['eps'],
               ', '.join(f'{a:.4f}' for a in sweep['accuracy']))
  return results


def compare_fgsm(workdirs: Sequence[str], out_dir: str, prefix: str = 'fgsm_compare') -> list:
  """Overlays the fgsm.json of several runs, one line per architecture (the paper's Fig. 13)."""
  results_by_name = {}
  for workdir in workdirs:
    path = os.path.join(workdir, 'fgsm.json')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{workdir} has no fgsm.json; run the fgsm mode there first.')
    with open(path) as f:
      results = json.load(f)
    name = results.get('method') or os.path.basename(os.path.normpath(workdir))
    if name in results_by_name:
      name = f'{name} ({os.path.basename(os.path.normpath(workdir))})'
    results_by_name[name] = results
  return analysis.plot_fgsm(results_by_name, out_dir, prefix=prefix)


MODES = {'train': train_and_evaluate, 'test': test, 'fgsm': fgsm}


def run_pipeline(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Runs the modes of `config.modes` (comma separated, e.g. 'train,test,fgsm') in order."""
  modes = [m.strip() for m in config.modes.split(',') if m.strip()]
  unknown = [m for m in modes if m not in MODES]
  if unknown:
    raise ValueError(f'Unknown mode(s) {unknown} in config.modes; allowed: {list(MODES)}.')
  for mode in modes:
    logging.info('Mode %s in %s', mode, workdir)
    MODES[mode](config, workdir)
