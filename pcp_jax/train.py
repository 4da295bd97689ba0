"""Training a genotype from scratch and testing it.

Modes (each `fn(config, workdir)`): `train_and_evaluate` trains (checkpoints every
`checkpoint.every_steps` steps and every epoch, resume, signals: `loop`), keeping the checkpoint
of lowest validation loss in `workdir/best`; `test` evaluates that checkpoint and writes
`results.json`. The FGSM analysis of a trained run is `analysis.fgsm`.
"""

import dataclasses
import functools
import json
import math
import os
import time
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
from pcp_jax import kernels
from pcp_jax import loop
from pcp_jax import losses
from pcp_jax import models
from pcp_jax import networks
from pcp_jax import optim
from pcp_jax import parallel
from pcp_jax import random_cells
from pcp_jax import runs
from pcp_jax import torch_file

METRICS = ('train_loss', 'train_acc', 'grad_norm')
# The fields that shape a checkpoint's state: test and fgsm name those that changed.
STATE_FIELDS = ('genotype', 'train.channels', 'train.layers', 'train.auxiliary',
                'train.optim.name', 'data.dataset', 'data.pad_to_32')
# Config fields that may differ between a run and its resumption (everything else must match):
# `train.epochs` extends a finished run.
FREE_ON_RESUME = ('checkpoint.', 'num_devices', 'op_impl', 'modes', 'data.dir',
                  'data.download', 'data.max_test', 'fgsm.', 'train.epochs',
                  'train.eval_batch_size', 'train.log_every_steps', 'train.method', 'weights',
                  'memory_check')


def free_on_resume(config) -> tuple:
  """`FREE_ON_RESUME`, less `data.max_test` when the test set is the validation set
  (`train.val_split='test'`): the best checkpoint compares losses on one set."""
  if data.parse_val_split(config.train.val_split) is None:
    return tuple(f for f in FREE_ON_RESUME if f != 'data.max_test')
  return FREE_ON_RESUME


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any


@flax.struct.dataclass
class HParams:
  """The train step's hyperparameters that change between epochs, traced (no recompile)."""
  drop_path_rate: Any  # a float32 scalar, or None for no drop-path


def image_shape(info: data.DatasetInfo):
  return (info.image_size, info.image_size, info.channels)


def load_genotype(config: ml_collections.ConfigDict, workdir: str) -> genotypes.Genotype:
  """The genotype of `config.genotype`, checked against the one the workdir was run with."""
  genotype = random_cells.genotype(config)
  saved = os.path.join(workdir, runs.GENOTYPE)
  if os.path.isfile(saved) and genotypes.load(saved) != genotype:
    raise ValueError(
        f'{workdir} holds a run of another genotype ({saved}) than genotype='
        f'{config.genotype!r}; use a new workdir or the same genotype.')
  return genotype


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


def checkpoint_template(model, tx, shape) -> dict:
  """Zeros shaped like a training checkpoint ({'state', 'sums'}), for restoring."""
  shapes = jax.eval_shape(functools.partial(init_state, model, tx, shape=shape),
                          jax.random.key(0))
  return {'state': checkpoint.zeros_like_shapes(shapes),
          'sums': checkpoint.zeros_like_shapes(loop.zero_sums(METRICS))}


# ---------------------------------------------------------------------------
# The step.


def train_step(state: TrainState, batch, key, hparams: HParams, *, model, tx, mean, std,
               cutout_length: int, auxiliary_weight: float, num_devices: int = 1):
  """One optimizer step on `batch['train']` (uint8 images, labels; the global batch),
  augmented on the device; returns (state, metrics). With `num_devices` > 1 this runs on
  every device of a data-parallel step (see `parallel`), each training on its slice."""
  images, labels = batch['train']
  crop_key, cutout_key, drop_key = jax.random.split(key, 3)
  x = augment.to_float(images, kernels.compute_dtype(model.dtype))
  x = augment.random_crop_flip(crop_key, x, padding=4)
  x = augment.normalize(x, mean, std)
  if cutout_length:
    x = augment.cutout(cutout_key, x, cutout_length)
  x = parallel.local_part(x, num_devices)
  labels = parallel.local_part(labels, num_devices)

  def loss_fn(params):
    (logits, aux_logits), updates = model.apply(
        {'params': params, 'batch_stats': state.batch_stats}, x, train=True,
        drop_path_rate=hparams.drop_path_rate,
        rngs={'drop_path': parallel.device_key(drop_key, num_devices),
              'noise': parallel.device_key(jax.random.fold_in(drop_key, 1), num_devices)},
        mutable=['batch_stats'])
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


def bind_train_step(config, model, tx, info, num_devices: int = 1):
  """`train_step` with this run's hyperparameters bound: step(state, batch, key, hparams)."""
  t = config.train
  return functools.partial(train_step, model=model, tx=tx, mean=info.mean, std=info.std,
                           cutout_length=t.cutout_length if t.cutout else 0,
                           auxiliary_weight=t.auxiliary_weight, num_devices=num_devices)


def make_train_step(config, model, tx, info, mesh=None):
  """One jitted train step, data-parallel over `mesh` (default one device), the state
  donated: step(state, batch, key, hparams)."""
  mesh = mesh or parallel.make_mesh(1)
  step = bind_train_step(config, model, tx, info, mesh.size)
  return jax.jit(parallel.data_parallel(step, mesh), donate_argnums=0)


def eval_variables(state):
  return {'params': state.params, 'batch_stats': state.batch_stats}


# ---------------------------------------------------------------------------
# The train mode.


def is_better(val_loss: float, best_val_loss: Optional[float]) -> bool:
  """The paper's rule: keep a checkpoint whenever the validation loss decreases."""
  return math.isfinite(val_loss) and (best_val_loss is None or val_loss < best_val_loss)


def check_config(config) -> None:
  """Validates the train config, naming the option and the allowed values."""
  t = config.train
  models.select_kernels(config.get('op_impl', 'auto'))
  optim.check(t.optim, 'train.optim')
  data.parse_val_split(t.val_split)
  if random_cells.index(config.genotype) is not None:
    random_cells.genotype(config)  # a space with no valid cell is refused before compiling
  defaults.check_fields(
      config, whole=[(f'train.{name}', 1) for name in ('channels', 'epochs', 'batch_size',
                                                       'eval_batch_size')]
      + [('train.layers', 3), ('train.cutout_length', 0), ('train.log_every_steps', 0)],
      booleans=('train.auxiliary', 'train.cutout'), at_least_zero=('train.auxiliary_weight',))
  if not 0 <= t.drop_path_prob < 1:
    raise ValueError(f'train.drop_path_prob must be in [0, 1), got {t.drop_path_prob}.')
  weights = config.get('weights', '')
  if not isinstance(weights, str):
    raise ValueError(f'weights must be the path of a PyTorch checkpoint or empty, got {weights!r}.')
  if weights:
    try:
      torch_file.check(weights)
    except (OSError, ValueError) as e:
      raise ValueError(f'weights: {e}') from None


def check_train_mode(config) -> None:
  """`check_config`, and no imported weights: the train mode trains from scratch."""
  check_config(config)
  if config.get('weights'):
    raise ValueError(f'weights={config.weights!r} is evaluated by the test and fgsm modes; the '
                     'train mode trains from scratch: use --config.modes=test (or test,fgsm), '
                     'or leave weights empty.')


@dataclasses.dataclass
class Setup:
  """What the epochs of one training run share."""
  config: Any
  workdir: str
  mesh: Any
  genotype: genotypes.Genotype
  splits: data.Splits
  steps: int  # per epoch
  model: networks.EvalNetwork
  tx: Any
  schedule: Any
  fingerprint: dict  # the config fields a resume must agree with

  def path(self, name):
    return os.path.join(self.workdir, name)

  def place(self, tree):
    return parallel.replicate(tree, self.mesh)

  def drop_path_rate(self, epoch: int) -> Optional[float]:
    t = self.config.train
    return t.drop_path_prob * epoch / t.epochs if t.drop_path_prob else None


def _prepare(config, workdir) -> Setup:
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch(config.train.batch_size, mesh.size, 'train.batch_size')
  genotype = load_genotype(config, workdir)
  splits = data.train_splits(config)
  steps = len(splits.train_images) // config.train.batch_size
  if steps == 0:
    raise ValueError(f'train.batch_size={config.train.batch_size} exceeds the '
                     f'{len(splits.train_images)} training images.')
  tx, schedule = make_optimizer(config, steps)
  return Setup(config=config, workdir=workdir, mesh=mesh, genotype=genotype, splits=splits,
               steps=steps, model=models.eval_network(config, genotype,
                                                      splits.info.num_classes, mesh.size),
               tx=tx, schedule=schedule,
               fingerprint=checkpoint.fingerprint(config, free_on_resume(config)))


@dataclasses.dataclass
class Start:
  """Where a session starts: the state, the epoch and step, and what was saved with them."""
  state: Any
  sums: Any = None  # the epoch's sums so far (a resume mid-epoch)
  epoch: int = 0
  step: int = 0
  best_val_loss: Optional[float] = None
  elapsed: float = 0.0
  resumed: bool = False
  saved: dict = dataclasses.field(default_factory=dict)  # the checkpoint's metadata


def _restore_or_start(setup: Setup, ckpt, init_key) -> Start:
  """Where to go on from; once the workdir is found compatible (a refused run changes
  nothing), sets an earlier run's outputs aside on a fresh start and writes genotype.json and
  train_config.json."""
  shape = image_shape(setup.splits.info)
  restored = checkpoint.restore(
      ckpt, lambda meta: checkpoint_template(setup.model, setup.tx, shape), setup.fingerprint,
      'training')
  if parallel.is_main_process():
    if restored is None:
      runs.set_aside(setup.workdir, runs.TRAIN_OUTPUTS)
    genotypes.save(setup.genotype, setup.path(runs.GENOTYPE))
    runs.write_json(setup.path(runs.TRAIN_CONFIG),
                    json.loads(setup.config.to_json_best_effort()))
  if restored is None:
    return Start(initial_state(setup.model, setup.tx, init_key, shape))
  _, tree, meta = restored
  logging.info('Resumed from step %d (epoch %d, %d steps into it).', int(tree['state'].step),
               meta['epoch'] + 1, meta['step'])
  return Start(tree['state'], tree['sums'] if meta['step'] else None, meta['epoch'],
               meta['step'], meta.get('best_val_loss'), meta.get('elapsed_seconds', 0.0), True,
               meta)


def _meta(setup: Setup, epoch: int, step: int, best_val_loss) -> dict:
  """Training's checkpoint metadata at step `step` of epoch `epoch` (step 0 of epoch e + 1
  after epoch e's end)."""
  return dict(config=setup.fingerprint, epoch=epoch, step=step, steps_per_epoch=setup.steps,
              best_val_loss=best_val_loss)


def _save(sess: loop.Session, setup: Setup, best_val_loss, epoch: int, state, sums,
          step: int) -> None:
  sess.save(epoch * setup.steps + step, state, sums, _meta(setup, epoch, step, best_val_loss))


def log_row(row: dict, epochs: int, prefix: str = '') -> None:
  logging.info('%sepoch %d/%d  train loss %.4f acc %.4f  val loss %.4f acc %.4f  lr %.3g  '
               'drop-path %.3f  %.1fs%s', prefix, row['epoch'], epochs, row['train_loss'],
               row['train_acc'], row['valid_loss'], row['valid_acc'], row['lr'],
               row['drop_path_rate'], row['epoch_seconds'], '  (best)' if row['best'] else '')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config.genotype` from scratch (resuming from `workdir`); returns the last row.

  Writes genotype.json, train_config.json, train_metrics.jsonl (one row per epoch), the latest
  checkpoints in `workdir/checkpoints` and the one of lowest validation loss in `workdir/best`.
  """
  check_train_mode(config)
  os.makedirs(workdir, exist_ok=True)
  setup, t = _prepare(config, workdir), config.train
  init_key, train_key, order_key = jax.random.split(jax.random.key(config.seed), 3)
  ckpt = checkpoint.Checkpointer(setup.path(runs.CHECKPOINTS), config.checkpoint.max_to_keep)
  start = _restore_or_start(setup, ckpt, init_key)
  best = checkpoint.Checkpointer(setup.path(runs.BEST), max_to_keep=1)
  resume_step = start.epoch * setup.steps + start.step
  rows = runs.Rows(setup.path(runs.TRAIN_METRICS), parallel.is_main_process())
  loop.resume_rows([rows], resume_step, start.saved, workdir)
  splits, info = setup.splits, setup.splits.info
  logging.info('Training %s (%d params without the auxiliary head) on %s: %d images, %d steps '
               'per epoch, epochs %d..%d.', config.genotype,
               networks.count_params(setup.genotype, t.channels, t.layers, info.num_classes,
                                     image_shape=image_shape(info)),
               info.name, len(splits.train_images), setup.steps, start.epoch + 1, t.epochs)
  step_fn = bind_train_step(config, setup.model, setup.tx, info, setup.mesh.size)
  chunk_fn = loop.make_chunk_fn(step_fn, t.batch_size, setup.mesh)
  eval_fn = parallel.CompiledOnFirstCall(loop.make_eval_fn(setup.model, info.mean, info.std))
  images, labels = setup.place(({'train': splits.train_images},
                                {'train': splits.train_labels.astype(np.int32)}))
  state, sums, best_val_loss = setup.place(start.state), start.sums, start.best_val_loss
  with loop.session(workdir, config, 'train', ckpt=ckpt, rows=rows, what='training',
                    hint='Lower train.optim.lr (or set train.optim.grad_clip) and rerun in a '
                         'new workdir.', every_steps=config.checkpoint.every_steps,
                    log_every_steps=t.log_every_steps, last_rows=start.saved.get('rows', {}),
                    total_steps=t.epochs * setup.steps, resume_step=resume_step,
                    resumed=start.resumed, elapsed=start.elapsed) as sess:
    sess.tensorboard.write_text(resume_step, 'genotype', genotypes.to_string(setup.genotype))
    for epoch in range(start.epoch, t.epochs):
      t_epoch, rate = time.time(), setup.drop_path_rate(epoch)
      order = jax.random.permutation(jax.random.fold_in(order_key, epoch),
                                     len(splits.train_images))
      inputs = loop.EpochInputs(images, labels, setup.place({'train': order}),
                                jax.random.fold_in(train_key, epoch),
                                HParams(None if rate is None else jnp.float32(rate)))
      state, sums = loop.run_epoch(
          sess, chunk_fn, state, setup.place(loop.zero_sums(METRICS) if sums is None else sums),
          inputs, loop.Epoch('training', epoch, t.epochs, setup.steps, epoch * setup.steps),
          start.step if epoch == start.epoch else 0,
          save=functools.partial(_save, sess, setup, best_val_loss, epoch))
      val = loop.evaluate(eval_fn, eval_variables(state), splits.val_images, splits.val_labels,
                          t.eval_batch_size)
      improved = is_better(val['loss'], best_val_loss)
      if improved:
        best_val_loss = val['loss']
        # Before the epoch's latest checkpoint: a crash between the two saves redoes the epoch.
        best.save((epoch + 1) * setup.steps, {'state': state, 'sums': loop.zero_sums(METRICS)},
                  dict(_meta(setup, epoch + 1, 0, best_val_loss), valid_loss=val['loss'],
                       valid_acc=val['accuracy']))
      row = dict(epoch=epoch + 1, **loop.means(sums, setup.steps), valid_loss=val['loss'],
                 valid_acc=val['accuracy'], lr=float(setup.schedule(epoch * setup.steps)),
                 drop_path_rate=float(rate or 0.0), best=improved,
                 step=(epoch + 1) * setup.steps, epoch_seconds=time.time() - t_epoch,
                 elapsed_seconds=sess.elapsed_seconds())
      log_row(row, t.epochs)
      sess.write_row(row)
      _save(sess, setup, best_val_loss, epoch + 1, state, sums, 0)
      sess.stop_if_requested()
      sums = None
  ckpt.close()
  best.close()
  all_rows = rows.read()
  return all_rows[-1] if all_rows else {}
