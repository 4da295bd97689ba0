"""What the search and training loops share: on-device chunks of steps, the NaN stop,
signals and periodic saves, metric rows, padded evaluation and resume.

Each mode writes its own stage/epoch loop (`search.search`, `train.train_and_evaluate`) and
calls `run_epoch` for an epoch's steps: they run in chunks on the device (`run_steps`: no
host round trip per step), each ending where a progress line or a periodic checkpoint is
due. Checkpoints hold `{'state', 'sums'}` plus JSON metadata that the mode writes in one
place (its `save`), at every epoch's end and every `checkpoint.every_steps` steps.

One interrupt path: the first SIGINT (Ctrl-C) or SIGTERM (SLURM's time limit, preemption,
Colab's shutdown) lets the current chunk finish, saves, and stops with `Interrupted`; a second
one stops at once. One non-finite stop: the on-device loop stops at the first step whose
metrics are not finite and the driver raises `NonFinite`, naming the step and keeping the
last good checkpoint. Rerunning the same config on the same workdir resumes from the newest
checkpoint that restores (`checkpoint.restore`), dropping the metric rows written after it.
"""

import contextlib
import dataclasses
import functools
import os
import signal
import threading
import time
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Optional, Tuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from pcp_jax import augment
from pcp_jax import checkpoint
from pcp_jax import events
from pcp_jax import genotypes
from pcp_jax import losses
from pcp_jax import members as members_lib
from pcp_jax import monitor
from pcp_jax import parallel
from pcp_jax import runs


class Interrupted(KeyboardInterrupt):
  """The run stopped on a signal after saving; rerunning the same command resumes it."""

  def __init__(self, message: str, signum: int = signal.SIGINT):
    super().__init__(message)
    self.signum = signum


class NonFinite(FloatingPointError):
  """A loss or metric became NaN or infinite; the last good checkpoint is kept."""


class Signals:
  """Context manager: the first SIGINT or SIGTERM only sets `requested` (the loop saves and
  stops); a second one raises `Interrupted` at once. Outside the main thread (where
  Python cannot install handlers) it does nothing."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, what: str):
    self.what = what
    self.requested = None  # the signal number once one arrived
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if self.requested is not None:  # main.py answers it in one line, as the first one
      raise Interrupted(f'{self.what.capitalize()} stopped at once on a second '
                        f'{signal.Signals(signum).name}; the steps since the last checkpoint '
                        'are lost. Rerun the same command to resume.', signum)
    self.requested = signum
    logging.warning('%s: %s saves a checkpoint after the current steps and stops; signal '
                    'again to stop at once (losing the steps since the last checkpoint).',
                    signal.Signals(signum).name, self.what)

  def agreed(self) -> Optional[int]:
    """The signal that reached any process (every process calls this at the same point, so
    that all save and stop together), or None."""
    if jax.process_count() == 1:
      return self.requested
    got = multihost_utils.process_allgather(np.int32(self.requested or 0))
    return int(np.max(got)) or None

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = {s: signal.signal(s, self._handler) for s in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}
    return False


# ---------------------------------------------------------------------------
# On-device steps.


class EpochInputs(NamedTuple):
  """What an epoch's chunks share: the splits (dicts keyed by split, on every device), a
  permutation of each split, the epoch's key and the step's hyperparameters (a pytree of
  traced values, e.g. `search_step.HParams`)."""
  images: Mapping[str, Any]
  labels: Mapping[str, Any]
  order: Mapping[str, Any]
  key: Any
  hparams: Any


def run_steps(state, sums, images, labels, order, key, hparams, start, stop, *, step_fn,
              batch_size, members=False, at_once=0):
  """Runs steps `start`..`stop - 1` of an epoch in one on-device loop.

  Step `i` gets `batch = {split: (images, labels)}` of rows `order[split][i * batch_size:
  (i + 1) * batch_size]` and the key `fold_in(key, i)`: `step_fn(state, batch, key,
  hparams) -> (state, metrics)`. Running an epoch in one call or in chunks (`start`, `stop`
  are traced: one compile serves all) gives the same result. `sums` accumulates the metrics.
  The loop stops after the first step whose metrics are not finite and returns its index
  as `bad_step` (else -1).

  `members` (a population, `population`): `state`, `sums`, `order`, `key` and `hparams`
  carry a leading member axis, `images` and `labels` are shared, and each step is
  `step_fn` mapped over the members (`members.mapped`, `at_once` of them together), each
  with its own batch and key.

  Returns:
    (state, sums, bad_step).
  """

  def cond(carry):
    i, _, _, bad = carry
    return (i < stop) & (bad < 0)

  def body(carry):
    i, state, sums, bad = carry

    def batch_of(order):
      batch = {}
      for split in order:
        idx = jax.lax.dynamic_slice_in_dim(order[split], i * batch_size, batch_size)
        batch[split] = (images[split][idx], labels[split][idx])
      return batch

    def step(state, order, key, hparams):
      return step_fn(state, batch_of(order), jax.random.fold_in(key, i), hparams)

    if members:  # scalar hyperparameters are shared, arrays have a value per member
      axes = jax.tree_util.tree_map(members_lib.per_member_arrays, hparams)
      step = members_lib.mapped(step, (0, 0, 0, axes), at_once)
    state, metrics = step(state, order, key, hparams)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(m)) for m in metrics.values()]))
    sums = {name: sums[name] + metrics[name] for name in sums}
    return i + 1, state, sums, jnp.where(finite, bad, i)

  _, state, sums, bad = jax.lax.while_loop(
      cond, body, (jnp.asarray(start, jnp.int32), state, sums, jnp.int32(-1)))
  return state, sums, bad


def make_chunk_fn(step_fn: Callable, batch_size: int, mesh, members: bool = False,
                  shard_members: bool = False, at_once: int = 0):
  """`run_steps` of `step_fn`, data-parallel over `mesh`, jitted and compiled at its first
  call: chunk(state, sums, *EpochInputs, start, stop) -> (state, sums, bad_step), donating
  `state` and `sums`. Later calls must pass the same shapes, types and shardings.

  `members`: a population's chunk, its members split across `mesh` (`shard_members`:
  `members.split_across`) or each data-parallel over it, `at_once` of them together
  (`members.resolve`: 0 picks for the backend; 1: one after another, `members.InTurn`)."""
  split, at_once = shard_members and mesh.size > 1, members_lib.resolve(at_once)
  if members and at_once == 1 and not split:
    return members_lib.InTurn(
        _chunk_fn(step_fn, batch_size, mesh),
        (0, 0, None, None, 0, 0, members_lib.per_member_arrays, None, None),
        lambda out: (out[0], out[1], members_lib.first_bad_step(out[2])))
  return _chunk_fn(step_fn, batch_size, mesh, members, split, at_once)


def _chunk_fn(step_fn, batch_size, mesh, members=False, split=False, at_once=0):
  chunk = functools.partial(run_steps, step_fn=step_fn, batch_size=batch_size, members=members,
                            at_once=at_once)
  spread = members_lib.split_across(chunk, mesh) if split else parallel.data_parallel(
      chunk, mesh)
  return parallel.CompiledOnFirstCall(jax.jit(spread, donate_argnums=(0, 1)))


def zero_sums(names, dtype=jnp.float32, members: int = 0) -> dict:
  """Zero metric sums (per member of a population of `members`); `dtype` the metrics'
  (float64 for a float64 search)."""
  shape = (members,) if members else ()
  return {name: jnp.zeros(shape, jnp.promote_types(dtype, jnp.float32)) for name in names}


# ---------------------------------------------------------------------------
# Padded evaluation.


def eval_sums(variables, images, labels, mask, key, op_mask=None, *, model, mean, std):
  """Summed CE, correct and top-5 correct counts of a (padded) uint8 batch where `mask` is
  1, the network in eval mode (BN's running statistics; `key` draws a supernet's channels;
  `op_mask`: a population member's ops, `supernet.SearchNetwork`)."""
  x = augment.normalize(augment.to_float(images), mean, std)
  extra = {} if op_mask is None else {'op_mask': op_mask}
  logits, _ = model.apply(variables, x, train=False, rngs={'channels': key}, **extra)
  return losses.classification_sums(logits, labels, mask)


def make_eval_fn(model, mean, std, members: bool = False, member_mesh=None, at_once: int = 0):
  """`eval_sums` of `model` for `evaluate`, jitted. `members`: mapped over a population's
  variables, keys and op masks (`eval_fn(variables, images, labels, mask, keys, op_mask)`;
  `at_once` as `make_chunk_fn`'s) and compiled at its first call; `member_mesh`: the members
  split across its devices, each evaluating its own."""
  fn = functools.partial(eval_sums, model=model, mean=mean, std=std)
  if not members:
    return jax.jit(fn)
  axes, at_once = (0, None, None, None, 0, 0), members_lib.resolve(at_once)
  split = member_mesh is not None and member_mesh.size > 1
  if at_once == 1 and not split:
    return members_lib.InTurn(parallel.CompiledOnFirstCall(jax.jit(fn)), axes)
  fn = members_lib.mapped(fn, axes, at_once)
  if split:
    shard, shared = P(parallel.AXIS), P()
    fn = jax.shard_map(fn, mesh=member_mesh, in_specs=(shard, shared, shared, shared, shard,
                                                        shard), out_specs=shard, check_vma=False)
  return parallel.CompiledOnFirstCall(jax.jit(fn))


def padded_batches(n: int, batch_size: int) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
  """(indices, mask) of each batch of `batch_size` over `n` examples: the last batch is
  padded with the last index and masked out, so one compile serves every batch."""
  if n == 0:
    raise ValueError('Cannot evaluate on an empty split.')
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    yield np.minimum(idx, n - 1), np.asarray(idx < n, np.float32)


def evaluate(eval_fn, variables, images, labels, batch_size: int, key=None) -> dict:
  """Means over a whole split of what `eval_fn(variables, images, labels, mask, key)` sums
  per batch (`eval_sums`); `images` may live on the host or the device."""
  n = images.shape[0]
  batch_size = min(batch_size, max(n, 1))
  key = jax.random.key(0) if key is None else key
  totals = [eval_fn(variables, images[idx], labels[idx], mask, jax.random.fold_in(key, i))
            for i, (idx, mask) in enumerate(padded_batches(n, batch_size))]
  totals = jax.device_get(totals)
  return {name: float(sum(np.float64(t[name]) for t in totals)) / n for name in totals[0]}


def evaluate_members(eval_fn, variables, images, labels, batch_size: int, keys,
                     op_mask=None) -> list:
  """`evaluate` of a population (`make_eval_fn(..., members=True)`): each member's means, its
  key `keys[k]` folded with the batch index as a solo run's."""
  n = images.shape[0]
  batch_size = min(batch_size, max(n, 1))
  totals = [eval_fn(variables, images[idx], labels[idx], mask,
                    jax.vmap(lambda k, i=i: jax.random.fold_in(k, i))(keys), op_mask)
            for i, (idx, mask) in enumerate(padded_batches(n, batch_size))]
  totals = jax.device_get(totals)
  return [{name: float(sum(np.float64(t[name][k]) for t in totals)) / n for name in totals[0]}
          for k in range(len(keys))]


# ---------------------------------------------------------------------------
# A session's epochs.


@dataclasses.dataclass
class Session:
  """What the epochs of one session of a mode share."""
  ckpt: checkpoint.Checkpointer
  rows: runs.Rows  # the mode's metric rows, one per epoch
  what: str  # 'the search', 'training': in messages
  hint: str  # what to change after a non-finite loss
  every_steps: int  # periodic checkpoints; 0: only at epoch ends
  log_every_steps: int  # progress lines; 0: none
  signals: Signals
  progress: monitor.Progress
  tensorboard: events.Writer
  elapsed: float = 0.0  # seconds of earlier sessions
  started: float = dataclasses.field(default_factory=time.time)
  saved_elapsed: Optional[float] = None  # elapsed seconds at this session's latest save
  # The latest row of each rows file (by file name), saved with every checkpoint: a row lost
  # after its checkpoint comes back on resume (`resume_rows`).
  last_rows: dict = dataclasses.field(default_factory=dict)
  workdir: str = ''  # the run's folder: rows files are named relative to it

  def elapsed_seconds(self) -> float:
    return self.elapsed + time.time() - self.started

  def work_seconds(self) -> float:
    """The run's elapsed seconds at its latest checkpoint: a rerun of a finished run, which
    saves nothing, adds nothing."""
    return self.elapsed if self.saved_elapsed is None else self.saved_elapsed

  def save(self, global_step: int, state, sums, meta: Mapping) -> None:
    """A checkpoint of `{'state', 'sums'}` with the mode's metadata and the elapsed time."""
    self.saved_elapsed = self.elapsed_seconds()
    self.ckpt.save(global_step, {'state': state, 'sums': sums},
                   dict(meta, elapsed_seconds=self.saved_elapsed, rows=self.last_rows))

  def stop_if_requested(self) -> None:
    """Raises `Interrupted` if a signal reached any process (call after a save)."""
    signum = self.signals.agreed()
    if signum:
      raise Interrupted(f'{self.what.capitalize()} stopped on {signal.Signals(signum).name}; '
                        f'saved in {self.ckpt.directory}. Rerun the same command to resume.',
                        signum)

  def append(self, rows: runs.Rows, row: Mapping) -> None:
    """A row to `rows`, remembered for the next checkpoint."""
    rows.append(row)
    self.last_rows[_rows_key(rows, self.workdir)] = dict(row)

  def write_row(self, row: Mapping, rows: Optional[runs.Rows] = None,
                tensorboard: Optional[events.Writer] = None) -> None:
    """An epoch's metric row to the rows file and TensorBoard (its genotype, if any, as
    text): the session's own, or a population member's `rows` and `tensorboard`."""
    tensorboard = tensorboard or self.tensorboard
    self.append(rows or self.rows, row)
    tensorboard.write(row['step'], row)
    if 'genotype' in row:
      tensorboard.write_text(row['step'], 'genotype',
                             genotypes.to_string(genotypes.from_dict(row['genotype'])))
    tensorboard.flush()


def _rows_key(rows: runs.Rows, workdir: str) -> str:
  """A rows file's name in checkpoints: its path in the run's folder (`members/1/...` for a
  population's member), so the run may move."""
  return os.path.relpath(rows.path, workdir) if workdir else os.path.basename(rows.path)


def resume_rows(files, step: int, meta: Mapping, workdir: str = '') -> None:
  """Keeps the rows of each of `files` (`runs.Rows`) up to the checkpoint's global `step`
  (the resumed run redoes those after it), and appends the row the checkpoint saved (its
  `meta`) where a file lacks it: a row cut short or lost after its checkpoint was written,
  which the resumed run would not write again."""
  saved = meta.get('rows') or {}
  for rows in files:
    rows.keep_until(step)
    row = saved.get(_rows_key(rows, workdir))
    if row is None or not rows.write or any(r['step'] == row['step'] for r in rows.read()):
      continue
    rows.append(row)
    logging.warning('%s lacked the row of step %d (lost after its checkpoint was written); '
                    'restored it from the checkpoint.', rows.path, row['step'])


@contextlib.contextmanager
def session(workdir: str, config, mode: str, *, total_steps: int, resume_step: int,
            resumed: bool, **fields):
  """The `Session` of `mode` (search, train), once the workdir is found compatible: writes
  log.txt, config.json and environment.json (`monitor.start_run`), opens the TensorBoard
  writer (dropping the events a resumed session redoes; the config as text), the progress
  lines and the signal handlers. `fields`: the rest of `Session`'s fields."""
  monitor.start_run(workdir, config, mode)
  with Signals(fields['what']) as signals, events.Writer(
      workdir, mode, purge_step=resume_step + 1 if resumed else 0) as tensorboard:
    tensorboard.write_text(resume_step, 'config', str(config))
    yield Session(signals=signals, tensorboard=tensorboard, workdir=workdir,
                  progress=monitor.Progress(total_steps, resume_step, mode), **fields)


@dataclasses.dataclass(frozen=True)
class Epoch:
  """Where an epoch sits in its run: for messages, progress lines and global steps."""
  name: str  # 'stage 2/3', 'training'
  index: int
  epochs: int
  steps: int  # per epoch
  first_step: int  # the global step of its step 0
  stage: Optional[int] = None  # the search's stage (None: no stage in lines)
  stages: Optional[int] = None

  def global_step(self, step: int) -> int:
    return self.first_step + step


def next_stop(step: int, steps: int, *everies: int) -> int:
  """Where the chunk from `step` ends: the epoch's end or the next multiple of an `every`."""
  return min([steps] + [(step // e + 1) * e for e in everies if e > 0])


def host(tree):
  """`tree` as numpy arrays on the host."""
  return jax.tree_util.tree_map(np.asarray, jax.device_get(tree))


def means(sums, count: int) -> dict:
  """The sums fetched to the host, divided by `count` steps (a population's: the members'
  mean)."""
  return {k: float(np.mean(v)) / max(count, 1) for k, v in jax.device_get(sums).items()}


def run_epoch(sess: Session, chunk_fn, state, sums, inputs: EpochInputs, epoch: Epoch,
              step: int, save: Callable[[Any, Any, int], None]):
  """Runs steps `step`.. of `epoch` in on-device chunks (`chunk_fn`, `make_chunk_fn`);
  returns (state, sums). `sums` are the epoch's so far (a resume mid-epoch).

  Raises `NonFinite` at the first step whose metrics are not finite. Every
  `sess.every_steps` steps, and after the chunk a signal arrived in, `save(state, sums,
  step)` checkpoints mid-epoch; after a signal's save it raises `Interrupted`.
  """
  sess.progress.start_epoch(epoch.stage, epoch.stages, epoch.index, epoch.epochs, epoch.steps,
                            first_step=step)
  while step < epoch.steps:
    stop = next_stop(step, epoch.steps, sess.log_every_steps, sess.every_steps)
    compiling = not chunk_fn.compiled
    if compiling:
      sess.progress.compiling(epoch.name)
      t_compile = time.time()
    state, sums, bad = chunk_fn(state, sums, *inputs, jnp.int32(step), jnp.int32(stop))
    bad = int(bad)  # waits for the chunk: the one host synchronisation per chunk
    if compiling:
      sess.progress.compiled(f'{epoch.name} (and ran its first {stop - step} steps)',
                             time.time() - t_compile, step=stop)
    if bad >= 0:
      raise _non_finite(sess, epoch, bad)
    if (sess.log_every_steps and stop < epoch.steps and stop % sess.log_every_steps == 0
        and not compiling):
      m = means(sums, stop)
      sess.progress.update(stop, {'CE': m.get('train_loss'), 'acc': m.get('train_acc')})
    step = stop
    requested = sess.signals.agreed()
    if step < epoch.steps and ((sess.every_steps and step % sess.every_steps == 0)
                               or requested):
      save(state, sums, step)
      sess.stop_if_requested()
  return state, sums


def _non_finite(sess: Session, epoch: Epoch, bad: int) -> NonFinite:
  last = sess.ckpt.latest_step()
  return NonFinite(
      f'{sess.what.capitalize()} stopped: a loss became NaN or infinite in {epoch.name}, '
      f'epoch {epoch.index + 1}, step {bad + 1} of {epoch.steps} (global step '
      f'{epoch.global_step(bad) + 1}). '
      + (f'The last good checkpoint (step {last}) is kept in {sess.ckpt.directory}. '
         if last is not None else 'No checkpoint was written before it. ')
      + sess.hint)
