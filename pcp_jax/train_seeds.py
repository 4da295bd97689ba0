"""One genotype trained over N seeds as one program: the protocol behind a published "± std".

`train.seeds` = N (config argument `seeds=N`) trains N members: member k is the solo training
run (`train.train_and_evaluate`) of seed `seed + k`, with its own initialisation, data order,
augmentation and drop-path keys. Every piece of the training state carries a leading member
axis (parameters, BN statistics, optimiser state, metric sums); one jitted program steps all
members (`loop.run_steps` with `members`) and one evaluation per epoch validates them all.

Outputs: `RUN/seeds/<k>/` is an ordinary training run folder (config.json with the member's
seed, genotype.json, train_metrics.jsonl, TensorBoard, its best checkpoint and its latest
epoch's; results.json, fgsm.json and plots from the test and fgsm modes), so test, fgsm,
plots and `reports table` take it as a solo run. `RUN/checkpoints` holds the stacked state
(resume and signals as for a solo run), `RUN/seeds_metrics.jsonl` each epoch's metrics' mean
and std over the seeds, and `RUN/results.json` the seeds' results with their mean and std
(`write_results`).
"""

import copy
import dataclasses
import functools
import json
import os
import time
from typing import List

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax import analysis
from pcp_jax import checkpoint
from pcp_jax import defaults
from pcp_jax import events
from pcp_jax import genotypes
from pcp_jax import loop
from pcp_jax import monitor
from pcp_jax import parallel
from pcp_jax import runs
from pcp_jax import train

SEEDS_DIR = 'seeds'
METRICS = 'seeds_metrics.jsonl'  # per epoch: each metric's mean and std over the seeds
# What a fresh start in the run's folder sets aside (besides a solo run's outputs).
OUTPUTS = runs.TRAIN_OUTPUTS + (SEEDS_DIR, METRICS)
HINT = 'Lower train.optim.lr (or set train.optim.grad_clip) and rerun in a new workdir.'


def size(config) -> int:
  """The number of seeds trained (1: a solo run)."""
  return config.train.get('seeds', 1) if 'train' in config else 1


def check_config(config) -> None:
  """Validates `train.seeds` (a solo run passes), naming the field."""
  defaults.check_fields(config, whole=[('train.seeds', 1), ('train.seeds_at_once', 0)])
  if size(config) == 1:
    return
  if config.num_devices != 1 and jax.device_count() > 1:
    raise ValueError('Training over seeds (train.seeds > 1) runs on one device for now: set '
                     f'num_devices=1 (got {config.num_devices}, {jax.device_count()} devices '
                     'seen).')
  if config.get('weights'):
    raise ValueError(f'weights={config.weights!r} is one network: test it with train.seeds=1.')


def check_train_mode(config) -> None:
  check_config(config)
  train.check_train_mode(config)


def check_test_mode(config) -> None:
  check_config(config)
  train.check_config(config)


def check_fgsm_mode(config) -> None:
  check_config(config)
  analysis.check_config(config)


def member_config(config, k: int):
  """The solo training config of member `k`: seed `seed + k`."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.seed = config.seed + k
    c.train.seeds = 1
  return c


def run_folders(config, workdir) -> List[str]:
  """The run folders a command on `workdir` wrote: the members' for N seeds."""
  if size(config) == 1:
    return [workdir]
  return [os.path.join(workdir, SEEDS_DIR, str(k)) for k in range(size(config))]


def _stack(trees):
  return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _member(tree, k):
  return jax.tree_util.tree_map(lambda a: np.asarray(a[k]), tree)


def mean_std(records: List[dict], skip=()) -> dict:
  """Each numeric field's (and each list of numbers') mean and std over `records`."""
  mean, std = {}, {}
  for name, value in records[0].items():
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    numbers = isinstance(value, list) and value and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if name in skip or not (numeric or numbers):
      continue
    values = [r.get(name) for r in records]
    if any(v is None or np.shape(v) != np.shape(value) for v in values):
      continue
    values = np.asarray(values, np.float64)
    mean[name], std[name] = values.mean(axis=0).tolist(), values.std(axis=0).tolist()
  return {'mean': mean, 'std': std}


# ---------------------------------------------------------------------------
# The train mode.


@dataclasses.dataclass
class Seeds:
  """The seeds' shared setup (`train.Setup`: data, network, optimiser, steps; the run's
  folder) and each member's config, folder, keys and fingerprint."""
  setup: train.Setup
  configs: List
  folders: List[str]

  @property
  def size(self):
    return len(self.configs)

  def keys(self, k: int):
    """Member k's (init, train, order) keys: its solo run's."""
    return jax.random.split(jax.random.key(self.configs[k].seed), 3)

  def fingerprint(self, k: int) -> dict:
    c = self.configs[k]
    return checkpoint.fingerprint(c, train.free_on_resume(c))

  def inputs(self, epoch: int, images, labels, rate) -> loop.EpochInputs:
    """Epoch `epoch`: each member's own data order and key (its solo run's)."""
    n = len(self.setup.splits.train_images)
    keys = [self.keys(k) for k in range(self.size)]
    orders = jnp.stack([jax.random.permutation(jax.random.fold_in(o, epoch), n)
                        for _, _, o in keys])
    return loop.EpochInputs(images, labels, self.setup.place({'train': orders}),
                            jnp.stack([jax.random.fold_in(t, epoch) for _, t, _ in keys]),
                            train.HParams(None if rate is None else jnp.float32(rate)))

  def template(self, meta=None) -> dict:
    del meta
    shape = train.image_shape(self.setup.splits.info)
    shapes = jax.eval_shape(functools.partial(train.init_state, self.setup.model, self.setup.tx,
                                              shape=shape), jax.random.key(0))
    stacked = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((self.size,) + a.shape, a.dtype), shapes)
    return {'state': checkpoint.zeros_like_shapes(stacked),
            'sums': checkpoint.zeros_like_shapes(loop.zero_sums(train.METRICS,
                                                                members=self.size))}

  def init(self):
    """Every member's initial state (its solo run's, `train.initial_state`), stacked."""
    shape = train.image_shape(self.setup.splits.info)
    init = parallel.compile_once(functools.partial(
        train.init_state, self.setup.model, self.setup.tx, shape=shape), self.keys(0)[0])
    return _stack([init(self.keys(k)[0]) for k in range(self.size)])

  def evaluate(self, eval_fn, state) -> List[dict]:
    """Each member's validation means (`loop.evaluate` of its solo run)."""
    splits = self.setup.splits
    return loop.evaluate_members(
        eval_fn, train.eval_variables(state), splits.val_images, splits.val_labels,
        self.setup.config.train.eval_batch_size, jnp.stack([jax.random.key(0)] * self.size))


def _prepare(config, workdir) -> Seeds:
  setup = train._prepare(config, workdir)  # pylint: disable=protected-access
  configs = [member_config(config, k) for k in range(size(config))]
  return Seeds(setup, configs, run_folders(config, workdir))


def _meta(seeds: Seeds, epoch: int, step: int, best) -> dict:
  return dict(config=seeds.setup.fingerprint, epoch=epoch, step=step,
              steps_per_epoch=seeds.setup.steps, best_val_loss=list(best))


def _save(sess, seeds: Seeds, best, epoch: int, state, sums, step: int) -> None:
  sess.save(epoch * seeds.setup.steps + step, state, sums, _meta(seeds, epoch, step, best))


def _start(seeds: Seeds, restored):
  """(state, sums, epoch, step, best val losses, elapsed, saved metadata) to go on from
  `restored` (`checkpoint.restore`'s; None: a fresh start, an earlier run's outputs set aside);
  writes each member's genotype.json, train_config.json and config.json."""
  setup = seeds.setup
  if parallel.is_main_process():
    if restored is None:
      runs.set_aside(setup.workdir, OUTPUTS)
    genotypes.save(setup.genotype, setup.path(runs.GENOTYPE))
    for c, folder in zip(seeds.configs, seeds.folders):
      os.makedirs(folder, exist_ok=True)
      genotypes.save(setup.genotype, os.path.join(folder, runs.GENOTYPE))
      runs.write_json(os.path.join(folder, runs.TRAIN_CONFIG), json.loads(c.to_json_best_effort()))
      monitor.write_config(folder, c)
  if restored is None:
    return seeds.init(), None, 0, 0, [None] * seeds.size, 0.0, {}
  step, tree, meta = restored
  logging.info('Resumed training over seeds from step %d (epoch %d, %d steps into it).', step,
               meta['epoch'] + 1, meta['step'])
  return (tree['state'], tree['sums'] if meta['step'] else None, meta['epoch'], meta['step'],
          meta['best_val_loss'], meta.get('elapsed_seconds', 0.0), meta)


def _save_members(seeds: Seeds, state, best, valid, improved, epoch: int) -> None:
  """Each member's latest state (its folder's checkpoints, for the test mode's last epoch)
  and, where its validation loss improved, its best checkpoint."""
  host, steps = loop.host(state), seeds.setup.steps
  for k, folder in enumerate(seeds.folders):
    tree = {'state': _member(host, k), 'sums': loop.host(loop.zero_sums(train.METRICS))}
    meta = dict(config=seeds.fingerprint(k), epoch=epoch + 1, step=0, steps_per_epoch=steps,
                best_val_loss=best[k])
    names = [runs.CHECKPOINTS] + ([runs.BEST] if improved[k] else [])
    for name in names:  # the best one first: a crash between the two redoes the epoch
      ckpt = checkpoint.Checkpointer(os.path.join(folder, name), max_to_keep=1)
      ckpt.save((epoch + 1) * steps, tree, dict(meta, valid_loss=valid[k]['loss'],
                                                valid_acc=valid[k]['accuracy'])
                if name == runs.BEST else meta)
      ckpt.close()


def train_seeds(config, workdir: str) -> List[dict]:
  """Trains `config.genotype` with each of the `train.seeds` seeds as one program (resuming
  from `workdir`); returns each member's last row (module docstring)."""
  check_train_mode(config)
  os.makedirs(workdir, exist_ok=True)
  seeds, t = _prepare(config, workdir), config.train
  setup, info, steps = seeds.setup, seeds.setup.splits.info, seeds.setup.steps
  ckpt = checkpoint.Checkpointer(setup.path(runs.CHECKPOINTS), config.checkpoint.max_to_keep)
  member_rows = [runs.Rows(os.path.join(f, runs.TRAIN_METRICS), parallel.is_main_process())
                 for f in seeds.folders]
  restored = checkpoint.restore(ckpt, seeds.template, setup.fingerprint, 'training over seeds')
  if restored is not None and restored[2]['epoch'] >= t.epochs:  # a rerun writes nothing
    logging.info('The training over seeds in %s is finished (checkpoint %d); its results '
                 'stand, nothing to run.', workdir, restored[0])
    ckpt.close()
    return [r.read()[-1] for r in member_rows]
  state, sums, start_epoch, start_step, best, elapsed, saved = _start(seeds, restored)
  resume_step = start_epoch * steps + start_step
  rows = runs.Rows(setup.path(METRICS), parallel.is_main_process())
  loop.resume_rows([rows] + member_rows, resume_step, saved, workdir)
  logging.info('Training %s with %d seeds (%d..%d) as one program on %s: %d images, %d steps '
               'per epoch, epochs %d..%d.', config.genotype, seeds.size, config.seed,
               config.seed + seeds.size - 1, info.name, len(setup.splits.train_images), steps,
               start_epoch + 1, t.epochs)
  step_fn = train.bind_train_step(config, setup.model, setup.tx, info, setup.mesh.size)
  at_once = t.get('seeds_at_once', 0)
  chunk_fn = loop.make_chunk_fn(step_fn, t.batch_size, setup.mesh, members=True,
                                at_once=at_once)
  eval_fn = loop.make_eval_fn(setup.model, info.mean, info.std, members=True, at_once=at_once)
  images, labels = setup.place(({'train': setup.splits.train_images},
                                {'train': setup.splits.train_labels.astype(np.int32)}))
  state = setup.place(state)
  with loop.session(workdir, config, 'train', ckpt=ckpt, rows=rows, what='training over seeds',
                    hint=HINT, every_steps=config.checkpoint.every_steps,
                    log_every_steps=t.log_every_steps, last_rows=saved.get('rows', {}),
                    total_steps=t.epochs * steps, resume_step=resume_step,
                    resumed=restored is not None,
                    elapsed=elapsed) as sess:
    sess.progress.label = (f'train seeds {config.seed}..{config.seed + seeds.size - 1} (the '
                           'mean CE and acc)')
    purge = resume_step + 1 if restored is not None else 0
    writers = [events.Writer(f, 'train', purge_step=purge) for f in seeds.folders]
    try:
      for w in writers:
        w.write_text(resume_step, 'genotype', genotypes.to_string(setup.genotype))
      for epoch in range(start_epoch, t.epochs):
        state, sums, best = _epoch(seeds, sess, chunk_fn, eval_fn, (images, labels),
                                   (member_rows, writers), state, sums, best, epoch,
                                   start_step if epoch == start_epoch else 0)
    finally:
      for w in writers:
        w.close()
  ckpt.close()
  return [r.read()[-1] for r in member_rows]


def _epoch(seeds: Seeds, sess, chunk_fn, eval_fn, data, outputs, state, sums, best,
           epoch: int, step: int):
  """One epoch of every member from its step `step`: steps, validation, checkpoints and
  rows (`outputs`: the members' rows files and TensorBoard writers)."""
  setup, t = seeds.setup, seeds.setup.config.train
  t_epoch, rate, steps = time.time(), setup.drop_path_rate(epoch), setup.steps
  sums = setup.place(loop.zero_sums(train.METRICS, members=seeds.size) if sums is None
                     else sums)
  state, sums = loop.run_epoch(
      sess, chunk_fn, state, sums, seeds.inputs(epoch, *data, rate),
      loop.Epoch(f'training over {seeds.size} seeds', epoch, t.epochs, steps, epoch * steps),
      step, save=functools.partial(_save, sess, seeds, best, epoch))
  valid = seeds.evaluate(eval_fn, state)
  improved = [train.is_better(v['loss'], b) for v, b in zip(valid, best)]
  best = [v['loss'] if i else b for v, i, b in zip(valid, improved, best)]
  _save_members(seeds, state, best, valid, improved, epoch)
  host_sums = loop.host(sums)
  member_rows = []
  for k, c in enumerate(seeds.configs):
    row = dict(epoch=epoch + 1, **{n: float(v[k]) / steps for n, v in host_sums.items()},
               valid_loss=valid[k]['loss'], valid_acc=valid[k]['accuracy'],
               lr=float(setup.schedule(epoch * steps)), drop_path_rate=float(rate or 0.0),
               best=improved[k], step=(epoch + 1) * steps, epoch_seconds=time.time() - t_epoch,
               elapsed_seconds=sess.elapsed_seconds())
    train.log_row(row, t.epochs, f'seed {c.seed}: ')
    sess.write_row(row, outputs[0][k], outputs[1][k])
    member_rows.append(row)
  summary = mean_std(member_rows, skip=('epoch', 'step'))
  sess.write_row(dict(epoch=epoch + 1, step=(epoch + 1) * steps,
                      **{f'{n}_mean': v for n, v in summary['mean'].items()},
                      **{f'{n}_std': v for n, v in summary['std'].items()}))
  _save(sess, seeds, best, epoch + 1, state, sums, 0)
  sess.stop_if_requested()
  return state, None, best


# ---------------------------------------------------------------------------
# The test and fgsm modes, and RUN/results.json.


def write_results(config, workdir: str) -> dict:
  """RUN/results.json: the folders of the seeds' runs, each seed's results (its results.json,
  with its FGSM accuracies when fgsm.json exists), their mean and std over the seeds, and the
  fields they all share."""
  seeds = []
  for k, folder in enumerate(run_folders(config, workdir)):
    record = runs.load_json(os.path.join(folder, runs.RESULTS))
    fgsm_path = os.path.join(folder, runs.FGSM)
    if os.path.isfile(fgsm_path):
      fgsm = runs.load_json(fgsm_path)
      record.update(fgsm_eps=fgsm['eps'], fgsm_accuracy=fgsm['accuracy'])
    seeds.append(dict(seed=config.seed + k, folder=os.path.relpath(folder, workdir), **record))
  common = {name: value for name, value in seeds[0].items()
            if name not in ('seed', 'folder') and all(s.get(name) == value for s in seeds)}
  results = dict(common, seed_runs=[s['folder'] for s in seeds], seeds=seeds, n=len(seeds),
                 **mean_std(seeds, skip=('seed',)))
  if parallel.is_main_process():
    runs.write_json(os.path.join(workdir, runs.RESULTS), results)
  acc_mean, acc_std = results['mean'].get('test_accuracy'), results['std'].get('test_accuracy')
  if acc_mean is not None:
    logging.info('Test accuracy over %d seeds: %.4f ± %.4f (mean ± std).', len(seeds), acc_mean,
                 acc_std)
  return results


def _each_member(mode, config, workdir: str) -> List[dict]:
  out = []
  for k, folder in enumerate(run_folders(config, workdir)):
    c = member_config(config, k)
    logging.info('seed %d (%s):', c.seed, folder)
    out.append(mode(c, folder))
  return out


def test(config, workdir: str):
  """The test mode: a solo run's (`analysis.test`), or every seed's, then RUN/results.json."""
  if size(config) == 1:
    return analysis.test(config, workdir)
  check_test_mode(config)
  _each_member(analysis.test, config, workdir)
  return write_results(config, workdir)


def fgsm(config, workdir: str):
  """The fgsm mode: a solo run's (`analysis.fgsm`), or every seed's; RUN/results.json is
  refreshed with their FGSM accuracies once every seed was tested."""
  if size(config) == 1:
    return analysis.fgsm(config, workdir)
  check_fgsm_mode(config)
  out = _each_member(analysis.fgsm, config, workdir)
  if all(os.path.isfile(os.path.join(f, runs.RESULTS)) for f in run_folders(config, workdir)):
    write_results(config, workdir)
  return out


def run_train(config, workdir: str):
  """The train mode: a solo run (`train.train_and_evaluate`) or training over seeds."""
  if size(config) == 1:
    return train.train_and_evaluate(config, workdir)
  return train_seeds(config, workdir)
