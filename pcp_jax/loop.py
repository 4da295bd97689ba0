"""The epoch driver shared by the search and training.

A run is a sequence of phases (the stages of a search; training is one phase), each of
`epochs` epochs of `steps_per_epoch` steps. The driver runs a phase's steps in chunks on the
device (`run_steps`: no host round trip per step), ends each chunk where a progress line or
a periodic checkpoint is due, evaluates and writes one metric row per epoch, and saves a
checkpoint (`{'state', 'sums'}` plus JSON metadata) at every epoch's end and every
`checkpoint.every_steps` steps. What makes a phase a search stage or training is what it
hands the driver: its chunk function, its end-of-epoch row and its checkpoint metadata.

One interrupt path: the first SIGINT (Ctrl-C) or SIGTERM (SLURM's time limit, preemption,
Colab's shutdown) lets the current chunk finish, saves, and stops with `Interrupted`; a second
one stops at once. One non-finite stop: the on-device loop stops at the first step whose
metrics are not finite and the driver raises `NonFinite`, naming the step and keeping the
last good checkpoint. Rerunning the same config on the same workdir resumes from the newest
checkpoint that restores (`restore`), dropping the metric rows written after it.
"""

import contextlib
import dataclasses
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Mapping, Optional

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from pcp_jax import checkpoint
from pcp_jax import monitor


class Interrupted(KeyboardInterrupt):
  """The run stopped on a signal after saving; rerunning the same command resumes it."""

  def __init__(self, message: str, signum: int = signal.SIGINT):
    super().__init__(message)
    self.signum = signum


class NonFinite(FloatingPointError):
  """A loss or metric became NaN or infinite; the last good checkpoint is kept."""


class Signals:
  """Context manager: the first SIGINT or SIGTERM only sets `requested` (the loop saves and
  stops); a second one raises KeyboardInterrupt at once. Outside the main thread (where
  Python cannot install handlers) it does nothing."""

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self, what: str):
    self.what = what
    self.requested = None  # the signal number once one arrived
    self._previous = {}

  def _handler(self, signum, frame):
    del frame
    if self.requested is not None:
      raise KeyboardInterrupt
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
# Metric rows.


class Rows:
  """A JSON-lines file of rows, each with a global `step`, written by the main process.

  A line cut short (a kill or a full disk during an append) is dropped with a warning when
  it is the last one; anywhere else the file is reported with the line number.
  """

  def __init__(self, path: str, write: bool = True):
    self.path = path
    self.write = write

  def read(self) -> list:
    if not os.path.isfile(self.path):
      return []
    with open(self.path) as f:
      lines = f.read().split('\n')
    rows = []
    for number, line in enumerate(lines, 1):
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        if all(not rest.strip() for rest in lines[number:]):
          logging.warning('%s: line %d is cut short (an interrupted write); ignoring it.',
                          self.path, number)
          break
        raise ValueError(f'{self.path}: line {number} is not valid JSON; repair or delete '
                         'that line.') from None
    return rows

  def keep_until(self, step: int) -> None:
    """Keeps only the rows up to global step `step` (those after it are redone on resume)."""
    if self.write and os.path.exists(self.path):
      rows = [r for r in self.read() if r['step'] <= step]
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
      os.replace(tmp, self.path)

  def append(self, row: Mapping) -> None:
    if self.write:
      with open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
        f.flush()


# ---------------------------------------------------------------------------
# On-device steps and padded evaluation.


def run_steps(state, sums, images, labels, order, key, hparams, start, stop, *, step_fn,
              batch_size):
  """Runs steps `start`..`stop - 1` of an epoch in one on-device loop.

  `images`, `labels` and `order` (a permutation of each split) are dicts keyed by split;
  step `i` gets `batch = {split: (images, labels)}` of rows `order[split][i * batch_size:
  (i + 1) * batch_size]` and the key `fold_in(key, i)`: `step_fn(state, batch, key,
  *hparams) -> (state, metrics)`. Running an epoch in one call or in chunks (`start`, `stop`
  are traced: one compile serves all) gives the same result. `sums` accumulates the metrics.
  The loop stops after the first step whose metrics are not finite and returns its index
  as `bad_step` (else -1).

  Returns:
    (state, sums, bad_step).
  """

  def cond(carry):
    i, _, _, bad = carry
    return (i < stop) & (bad < 0)

  def body(carry):
    i, state, sums, bad = carry
    batch = {}
    for split in order:
      idx = jax.lax.dynamic_slice_in_dim(order[split], i * batch_size, batch_size)
      batch[split] = (images[split][idx], labels[split][idx])
    state, metrics = step_fn(state, batch, jax.random.fold_in(key, i), *hparams)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(m)) for m in metrics.values()]))
    sums = {name: sums[name] + metrics[name] for name in sums}
    return i + 1, state, sums, jnp.where(finite, bad, i)

  _, state, sums, bad = jax.lax.while_loop(
      cond, body, (jnp.asarray(start, jnp.int32), state, sums, jnp.int32(-1)))
  return state, sums, bad


def zero_sums(names) -> dict:
  return {name: jnp.zeros((), jnp.float32) for name in names}


def evaluate(eval_fn, variables, images, labels, batch_size: int, key=None) -> dict:
  """Means over a whole split of what `eval_fn(variables, images, labels, mask, key)` sums
  per batch (a dict, e.g. {'loss', 'accuracy'}); the last batch is padded (repeating the
  last image, masked out) so one compile serves every batch. `images` may live on the host
  or the device."""
  n = images.shape[0]
  if n == 0:
    raise ValueError('Cannot evaluate on an empty split.')
  batch_size = min(batch_size, n)
  key = jax.random.key(0) if key is None else key
  totals = []
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size)
    mask = np.asarray(idx < n, np.float32)
    idx = np.minimum(idx, n - 1)
    totals.append(eval_fn(variables, images[idx], labels[idx], mask,
                          jax.random.fold_in(key, start)))
  totals = jax.device_get(totals)
  return {name: float(sum(np.float64(t[name]) for t in totals)) / n for name in totals[0]}


# ---------------------------------------------------------------------------
# Resume.


def fingerprint(config, free: tuple) -> dict:
  """The flattened config fields a checkpoint must agree with to be resumed: all but those
  starting with one of the prefixes in `free`."""
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
  return {k: v for k, v in flat.items() if not k.startswith(free)}


def check_fingerprint(saved: dict, current: dict, directory: str, what: str) -> None:
  """Raises IncompatibleCheckpoint naming the fields that differ."""
  changed = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
  if changed:
    details = ', '.join(f'{k}: {saved.get(k)!r} -> {current.get(k)!r}' for k in changed[:5])
    raise checkpoint.IncompatibleCheckpoint(
        f'The {what} checkpoints in {directory} belong to a different configuration '
        f'({details}). Rerun with the same config to resume, or use a new workdir.')


def restore(ckpt: checkpoint.Checkpointer, template: Callable[[dict], Any],
            config_fingerprint: dict, what: str):
  """(global step, {'state', 'sums'}, metadata) of the newest checkpoint that restores, or
  None. `template(metadata)` gives the tree's structure (shapes by `jax.eval_shape`); a
  checkpoint of another configuration is refused before its arrays are read."""

  def checked_template(meta):
    check_fingerprint(meta.get('config', {}), config_fingerprint, ckpt.directory, what)
    return template(meta)

  return ckpt.restore_latest(checked_template)


def zeros_like_shapes(shapes):
  """Host zeros shaped like `jax.eval_shape`'s output: a restore template."""
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)


# ---------------------------------------------------------------------------
# The driver.


@dataclasses.dataclass
class Run:
  """What the phases of one run share."""
  ckpt: checkpoint.Checkpointer
  rows: Rows
  what: str  # 'the search', 'training': in messages
  every_steps: int  # periodic checkpoints; 0: only at epoch ends
  log_every_steps: int  # progress lines; 0: none
  meta: dict  # metadata saved with every checkpoint (e.g. the config fingerprint)
  hint: str  # what to change after a non-finite loss
  signals: Signals
  progress: Any  # monitor.Progress: the lines at chunk ends
  scalars: Any  # monitor.Scalars: TensorBoard events of the rows
  place: Callable = lambda tree: tree  # puts step inputs where the steps expect them
  elapsed: float = 0.0  # seconds of earlier sessions
  session_start: float = dataclasses.field(default_factory=time.time)

  def elapsed_seconds(self) -> float:
    return self.elapsed + time.time() - self.session_start

  def save(self, global_step: int, state, sums, meta: Mapping) -> None:
    self.ckpt.save(global_step, {'state': state, 'sums': sums},
                   dict(self.meta, **meta, elapsed_seconds=self.elapsed_seconds()))

  def stop_if_requested(self, signum: Optional[int]) -> None:
    if signum:
      raise Interrupted(f'{self.what.capitalize()} stopped on {signal.Signals(signum).name}; '
                        f'saved in {self.ckpt.directory}. Rerun the same command to resume.',
                        signum)


@contextlib.contextmanager
def session(workdir: str, config, mode: str, *, total_steps: int, resume_step: int,
            resumed: bool, **run_fields):
  """The `Run` of one session of `mode` (search, train), once the workdir is found
  compatible: writes log.txt, config.json and environment.json (`monitor.start_run`), opens
  the TensorBoard writer (dropping the events a resumed session redoes), the progress lines
  and the signal handlers. `run_fields`: the rest of `Run`'s fields."""
  monitor.start_run(workdir, config, mode)
  with Signals(run_fields['what']) as signals, monitor.Scalars(
      workdir, mode, purge_step=resume_step + 1 if resumed else 0) as scalars:
    yield Run(signals=signals, scalars=scalars,
              progress=monitor.Progress(total_steps, resume_step, mode), **run_fields)


@dataclasses.dataclass
class Phase:
  """One stage of a search, or a whole training.

  chunk_fn(state, sums, *epoch_inputs(epoch), start, stop) -> (state, sums, bad_step) runs
  steps start..stop-1 of `epoch` on the device (`run_steps`); `epoch_inputs` gives what an
  epoch's chunks share (data, its order, its key, hyperparameters), computed once per epoch.
  end_epoch(state, means, epoch) -> row evaluates
  and returns the epoch's metric row (`means`: the epoch's step metrics averaged).
  save_meta(state, epoch, step) -> the phase's checkpoint metadata at step `step` of
  `epoch` (`step` 0 of `epoch` + 1 after an epoch's end). log_row(row) logs the epoch's line.
  """
  name: str  # 'stage 2/3', 'training'
  index: int  # saved as `phase` in the metadata
  num_phases: Optional[int]  # the search's stages; None for training (no stage in lines)
  epochs: int
  steps_per_epoch: int
  first_step: int  # global step number of the phase's step 0
  metric_names: tuple
  chunk_fn: Callable
  epoch_inputs: Callable
  end_epoch: Callable
  save_meta: Callable
  log_row: Callable

  def global_step(self, epoch: int, step: int) -> int:
    return self.first_step + epoch * self.steps_per_epoch + step


def _next_stop(step, steps, *everies):
  stops = [steps] + [(step // e + 1) * e for e in everies if e > 0]
  return min(stops)


def _sums_means(sums, count):
  return {k: float(v) / max(count, 1) for k, v in jax.device_get(sums).items()}


def run_phase(run: Run, phase: Phase, state, epoch: int = 0, step: int = 0, sums=None):
  """Runs `phase` from step `step` of `epoch` (with that epoch's `sums` so far when resuming
  mid-epoch) to its end; returns the final state."""
  steps = phase.steps_per_epoch
  compiled = False
  for epoch in range(epoch, phase.epochs):
    t_epoch = time.time()
    if step == 0 or sums is None:
      sums = run.place(zero_sums(phase.metric_names))
    run.progress.start_epoch(phase.index if phase.num_phases else None, phase.num_phases,
                             epoch, phase.epochs, steps, first_step=step)
    inputs = phase.epoch_inputs(epoch)
    while step < steps:
      stop = _next_stop(step, steps, run.log_every_steps, run.every_steps)
      if not compiled:
        run.progress.compiling(phase.name)
        t_compile = time.time()
      state, sums, bad = phase.chunk_fn(state, sums, *inputs, jnp.int32(step), jnp.int32(stop))
      bad = int(bad)  # waits for the chunk: the one host synchronisation per chunk
      just_compiled = not compiled
      if just_compiled:
        compiled = True
        run.progress.compiled(f'{phase.name} (and ran its first {stop - step} steps)',
                              time.time() - t_compile, step=stop)
      if bad >= 0:
        last = run.ckpt.latest_step()
        raise NonFinite(
            f'{run.what.capitalize()} stopped: a loss became NaN or infinite in '
            f'{phase.name}, epoch {epoch + 1}, step {bad + 1} of {steps} (global step '
            f'{phase.global_step(epoch, bad) + 1}). '
            + (f'The last good checkpoint (step {last}) is kept in {run.ckpt.directory}. '
               if last is not None else 'No checkpoint was written before it. ')
            + run.hint)
      if (run.log_every_steps and stop < steps and stop % run.log_every_steps == 0
          and not just_compiled):
        means = _sums_means(sums, stop)
        run.progress.update(stop, {'CE': means.get('train_loss'),
                                   'acc': means.get('train_acc')})
      step = stop
      requested = run.signals.agreed()
      if step < steps and ((run.every_steps and step % run.every_steps == 0) or requested):
        run.save(phase.global_step(epoch, step), state, sums,
                 dict(phase.save_meta(state, epoch, step), phase=phase.index, epoch=epoch,
                      step=step))
        run.stop_if_requested(requested)
    row = phase.end_epoch(state, _sums_means(sums, steps), epoch)
    row = dict(row, step=phase.global_step(epoch + 1, 0),
               epoch_seconds=time.time() - t_epoch, elapsed_seconds=run.elapsed_seconds())
    phase.log_row(row)
    run.rows.append(row)
    run.scalars.write(row['step'], row)
    run.scalars.flush()
    run.save(phase.global_step(epoch + 1, 0), state, sums,
             dict(phase.save_meta(state, epoch + 1, 0), phase=phase.index, epoch=epoch + 1,
                  step=0))
    run.stop_if_requested(run.signals.agreed())
    step = 0
  return state
