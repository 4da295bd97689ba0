"""What makes a run watchable: its log file, its config and environment, TensorBoard, progress.

A run's workdir gains, besides its checkpoints and metric rows:

  log.txt           every line the console shows from Python logging (absl included), appended
                    by each session (`attach_log`), so `tail -f log.txt` follows a run.
  config.json       the effective config of the latest session (`write_config`).
  environment.json  versions (python, jax, jaxlib, flax, optax, orbax), platform, devices,
                    processes, git commit, host and command line of the latest session
                    (`write_environment`; log.txt keeps every session's copy as a log line).
  tensorboard/NAME/ TensorBoard event files, one folder per mode (`events.Writer`): view them
                    with `tensorboard --logdir WORKDIR/tensorboard`.

`Progress` formats the periodic progress lines (steps/s, epoch and run ETAs) that go to the
console and log.txt. Only process 0 writes files; every process logs to its own console.
Nothing here imports TensorFlow or synchronises with the device: callers hand over values
they have already fetched.
"""

import datetime
import importlib.metadata
import json
import logging as py_logging
import math
import os
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from absl import flags
from absl import logging
import jax

import pcp_jax
from pcp_jax import events
from pcp_jax import parallel
from pcp_jax import runs

_LOG_FORMAT = '%(asctime)s %(levelname)s %(message)s'
_PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint')


# ---------------------------------------------------------------------------
# log.txt, config.json, environment.json


class _RunLogHandler(py_logging.FileHandler):
  """The log.txt handler; its own class so `attach_log` finds it among the root's handlers.

  When log.txt cannot be written (a full disk) it says so once on stderr and stops writing,
  instead of printing a traceback for every line; the console keeps every line."""

  failed = None  # the OSError that stopped it

  def emit(self, record):
    if self.failed is None:
      super().emit(record)

  def handleError(self, record):
    error = sys.exc_info()[1]
    if not isinstance(error, OSError):
      super().handleError(record)
      return
    self.failed = error
    sys.stderr.write(f'{self.baseFilename}: {error.strerror or error}; the log continues on the '
                     'console only.\n')


def _run_log_handlers(root: py_logging.Logger) -> List[py_logging.Handler]:
  # By class name: a notebook that reloads this module must still find the old handler.
  return [h for h in root.handlers if type(h).__name__ == _RunLogHandler.__name__]


def attach_log(workdir: str) -> Optional[str]:
  """Copies every log line that reaches the console into `workdir/log.txt` (appending).

  Idempotent: attaching the same workdir again adds nothing; another workdir moves the file
  handler there. Returns the log file's path (None on processes other than 0).
  """
  if not parallel.is_main_process():
    return None
  path = os.path.abspath(os.path.join(workdir, runs.LOG))
  root = py_logging.getLogger()
  if any(h.baseFilename == path for h in _run_log_handlers(root)):
    return path
  detach_log()
  os.makedirs(workdir, exist_ok=True)
  if not root.handlers:
    # Without app.run (a notebook, a script) the root has no handler and Python prints
    # warnings through `logging.lastResort`, which it skips once any handler exists; keep
    # that console output by installing it explicitly.
    root.addHandler(py_logging.lastResort)
  handler = _RunLogHandler(path, mode='a', encoding='utf-8')
  handler.setFormatter(py_logging.Formatter(_LOG_FORMAT))
  # The root sees absl's records (the 'absl' logger propagates) and other libraries' warnings,
  # exactly what absl's console handler (also on the root under app.run) prints.
  root.addHandler(handler)
  absl_logger = logging.get_absl_logger()
  if not flags.FLAGS.is_parsed() and absl_logger.getEffectiveLevel() > py_logging.INFO:
    # No command line set a verbosity (a notebook calling main.run, a test): absl then
    # drops INFO, which would leave log.txt without the progress lines.
    absl_logger.setLevel(py_logging.INFO)
  return path


def detach_log() -> None:
  """Stops copying log lines to a log.txt (closing it); a no-op when none is attached."""
  root = py_logging.getLogger()
  for handler in _run_log_handlers(root):
    root.removeHandler(handler)
    handler.close()
  if root.handlers == [py_logging.lastResort]:
    root.removeHandler(py_logging.lastResort)


def write_config(workdir: str, config, name: str = runs.CONFIG) -> Optional[str]:
  """Writes the effective config (an ml_collections ConfigDict or a plain dict) as JSON."""
  if not parallel.is_main_process():
    return None
  if hasattr(config, 'to_json_best_effort'):
    config = json.loads(config.to_json_best_effort())
  elif hasattr(config, 'to_dict'):
    config = config.to_dict()
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, name)
  runs.write_json(path, dict(config), sort_keys=True)
  return path


def _version(package: str) -> Optional[str]:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def _git(folder: str, *args: str) -> Optional[subprocess.CompletedProcess]:
  try:  # A short timeout: a slow network file system must not hold up a run's start.
    return subprocess.run(['git', '-C', folder, *args], capture_output=True, text=True,
                          timeout=5, check=False)
  except (OSError, subprocess.SubprocessError):
    return None


def _git_state() -> Tuple[Optional[str], Optional[bool]]:
  """(commit, has uncommitted changes) of the checkout this package is imported from; both
  None for an installed package (or no git), so a commit never names some enclosing repo."""
  package = os.path.dirname(os.path.abspath(__file__))
  out = _git(package, 'rev-parse', '--show-toplevel', 'HEAD')
  lines = out.stdout.splitlines() if out is not None and out.returncode == 0 else []
  if len(lines) != 2 or (os.path.realpath(lines[0]) !=
                         os.path.realpath(os.path.dirname(package))):
    return None, None
  diff = _git(lines[0], 'diff', '--quiet', 'HEAD')  # exit status 1: changes
  return lines[1], (diff.returncode == 1 if diff is not None and diff.returncode in (0, 1)
                    else None)


def environment(mode: Optional[str] = None) -> Dict[str, Any]:
  """The software and hardware a session runs on (the contents of environment.json)."""
  devices = jax.devices()
  commit, dirty = _git_state()
  env = {
      'mode': mode,
      'started': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'python': platform.python_version(),
      'pcp_jax': pcp_jax.__version__,
      **{package: _version(package) for package in _PACKAGES},
      'platform': platform.platform(),
      'backend': jax.default_backend(),
      'device_kind': devices[0].device_kind if devices else None,
      'device_count': jax.device_count(),
      'local_device_count': jax.local_device_count(),
      'process_count': jax.process_count(),
      'git_commit': commit,
      'git_dirty': dirty,
      'hostname': socket.gethostname(),
      'argv': list(sys.argv),
  }
  return env


def write_environment(workdir: str, mode: Optional[str] = None) -> Dict[str, Any]:
  """Logs the environment (every process, one line) and writes environment.json (process 0)."""
  env = environment(mode)
  logging.info('environment: %s', json.dumps(env, sort_keys=True))
  if parallel.is_main_process():
    os.makedirs(workdir, exist_ok=True)
    runs.write_json(os.path.join(workdir, runs.ENVIRONMENT), env, sort_keys=True)
  return env


def start_run(workdir: str, config, mode: str) -> None:
  """The start of a session of `mode` in `workdir`: log.txt, config.json, environment.json.

  Call it once the config is validated and the workdir found compatible (a refused resume
  should leave the previous session's files as they are).
  """
  attach_log(workdir)
  logging.info('%s in %s', mode, os.path.abspath(workdir))
  write_config(workdir, config)
  write_environment(workdir, mode)


# ---------------------------------------------------------------------------
# Progress lines


def format_duration(seconds: float) -> str:
  """'0:23', '12:05', '5:12:03' (hours grow past 24), '?' when unknown."""
  if not math.isfinite(seconds) or seconds < 0:
    return '?'
  minutes, secs = divmod(int(round(seconds)), 60)
  hours, minutes = divmod(minutes, 60)
  return f'{hours}:{minutes:02d}:{secs:02d}' if hours else f'{minutes}:{secs:02d}'


# XLA's C++ side prints a block ending in "Very slow compile? If you want to file a bug, run
# with envvar XLA_FLAGS=--xla_dump_to=/tmp/foo ..." (with "The operation took ...") whenever one
# compilation passes two minutes, as a supernet's does on a CPU; no flag turns it off.
SLOW_COMPILE_NOTE = (' (minutes on a CPU; past two minutes XLA prints a "Very slow compile? '
                     '... file a bug" block: its timer, not an error)')


class Progress:
  """Progress lines for an epoch loop that runs steps in chunks, e.g.

    search stage 2/3 epoch 4/25 step 120/195 | CE 1.234 acc 0.456 | 3.2 steps/s |
    epoch ETA 0:23 | run ETA 5:12:03

  (one line). The steps/s are those since the previous line; the ETAs use a rate smoothed
  over recent lines, counting step time only (no evaluation, checkpoint or compile time).
  The rate restarts at each `start_epoch` and `compiled`, so epoch-end work and compilation
  never count as step time. It only formats Python numbers the caller already fetched.
  """

  def __init__(self, total_steps: int, steps_done: int = 0, label: str = '',
               clock: Callable[[], float] = time.monotonic, smoothing: float = 0.5):
    """`total_steps`: the run's steps (all stages); `steps_done`: those done before this
    session (a resume); `smoothing`: the weight the rate keeps of earlier lines (0: none)."""
    self.total_steps = int(total_steps)
    self.run_step = int(steps_done)
    self.label = label
    self._clock = clock
    self._smoothing = smoothing
    self._steps = self._seconds = 0.0  # decayed step and second counts behind the rate
    self._epoch = None
    self._compiled_before = False
    self._last_step = 0
    self._last_time = clock()

  def start_epoch(self, stage: Optional[int], num_stages: Optional[int], epoch: int,
                  num_epochs: int, steps_per_epoch: int, first_step: int = 0) -> None:
    """Starts epoch `epoch` (0-based, as `stage`; shown 1-based) at step `first_step` of its
    `steps_per_epoch` (> 0 when a session resumes mid-epoch). `stage`/`num_stages` None for
    training leaves the stage out of the lines."""
    if self._epoch is not None:
      # The previous epoch ran to its end, past its last progress line.
      self.run_step += max(self._epoch[-1] - self._last_step, 0)
    self._epoch = (stage, num_stages, epoch, num_epochs, int(steps_per_epoch))
    self._last_step = int(first_step)
    self._last_time = self._clock()

  @property
  def steps_per_second(self) -> float:
    """The smoothed step rate (nan before the first measured line)."""
    return self._steps / self._seconds if self._seconds > 0 else math.nan

  def update(self, step: int, metrics: Optional[Mapping[str, Any]] = None) -> str:
    """Logs (INFO) and returns the line for step `step` of the current epoch (steps done in
    it), with `metrics` as `name value` pairs (4 significant digits; non-numbers skipped)."""
    if self._epoch is None:
      raise RuntimeError('Progress.update before start_epoch.')
    stage, num_stages, epoch, num_epochs, steps_per_epoch = self._epoch
    now = self._clock()
    steps, seconds = int(step) - self._last_step, now - self._last_time
    self.run_step += max(steps, 0)
    rate = steps / seconds if steps > 0 and seconds > 0 else math.nan
    if math.isfinite(rate):
      self._steps = self._smoothing * self._steps + steps
      self._seconds = self._smoothing * self._seconds + seconds
    self._last_step, self._last_time = int(step), now
    smoothed = self.steps_per_second
    where = []
    if self.label:
      where.append(self.label)
    if stage is not None and num_stages is not None:
      where.append(f'stage {stage + 1}/{num_stages}')
    where.append(f'epoch {epoch + 1}/{num_epochs} step {step}/{steps_per_epoch}')
    parts = [' '.join(where)]
    values = [(k, events.scalar_value(v)) for k, v in (metrics or {}).items()]
    if any(v is not None for _, v in values):
      parts.append(' '.join(f'{k} {v:.4g}' for k, v in values if v is not None))
    # '3.2', '0.456', '12.3', '4821': no exponent for fast tiny models.
    parts.append('? steps/s' if not math.isfinite(rate) else
                 f'{rate:.0f} steps/s' if rate >= 100 else f'{rate:.3g} steps/s')
    parts.append(f'epoch ETA {format_duration((steps_per_epoch - step) / smoothed)}')
    parts.append(f'run ETA {format_duration((self.total_steps - self.run_step) / smoothed)}')
    line = ' | '.join(parts)
    logging.info('%s', line)
    return line

  def compiling(self, what: str) -> None:
    """Logs that compiling `what` (e.g. 'stage 1') starts: the long silence that follows.
    The first time, it says what XLA prints when a compilation passes two minutes."""
    logging.info('compiling %s ...%s', what, '' if self._compiled_before else SLOW_COMPILE_NOTE)
    self._compiled_before = True

  def compiled(self, what: str, seconds: float, step: Optional[int] = None) -> None:
    """Logs the compile time and restarts the rate's clock (compiling is no step time).
    `step`: the step of the current epoch reached by the call that compiled (its steps count
    as done but not in the rate)."""
    logging.info('compiled %s in %.1f s', what, seconds)
    if step is not None and self._epoch is not None:
      self.run_step += max(int(step) - self._last_step, 0)
      self._last_step = int(step)
    self._last_time = self._clock()
