"""The run folder: the names of its files, their JSON and JSON-lines I/O, and the search a
trained genotype came from. Every module that reads or writes a run's file names it from here.
"""

import contextlib
import errno
import glob
import json
import os
from typing import Mapping, Optional

from absl import logging

from pcp_jax import genotypes
from pcp_jax import random_cells

# In every run folder.
CONFIG = 'config.json'
ENVIRONMENT = 'environment.json'
LOG = 'log.txt'
TENSORBOARD_DIR = 'tensorboard'
PLOTS_DIR = 'plots'
LOCK = '.lock'  # held by the run using the folder (checkpoint.WorkdirLock)
GENOTYPE = 'genotype.json'
# Written by a search.
SEARCH_SUMMARY = 'search_summary.json'
SEARCH_METRICS = 'search_metrics.jsonl'
ARCH_HISTORY = 'arch_history.jsonl'
GENOTYPE_LATEST = 'genotype_latest.json'
ARCH_WEIGHTS = 'arch.npz'
ARCH_STAGE = 'arch_stage{}.npz'  # the architecture each stage (from 1) ended with
SEARCH_CHECKPOINTS = 'search_checkpoints'
# Written by a population of searches (`population`) beside its members' search folders.
MEMBERS_DIR = 'members'
POPULATION = 'population.json'
POPULATION_METRICS = 'population_metrics.jsonl'  # per epoch: each metric's mean and std
# Written by the train, test and fgsm modes.
TRAIN_CONFIG = 'train_config.json'
TRAIN_METRICS = 'train_metrics.jsonl'
RESULTS = 'results.json'
FGSM = 'fgsm.json'
CHECKPOINTS = 'checkpoints'
BEST = 'best'
# Where a fresh start moves what an earlier run left in the folder (`set_aside`).
EARLIER = 'earlier_runs'
# What a run writes that a fresh start in the same folder would otherwise leave beside its
# own outputs (globs).
SEARCH_OUTPUTS = (GENOTYPE, SEARCH_SUMMARY, SEARCH_METRICS, ARCH_HISTORY, GENOTYPE_LATEST,
                  ARCH_WEIGHTS, 'arch_stage*.npz', 'normal.*', 'reduce.*', PLOTS_DIR)
TRAIN_OUTPUTS = (TRAIN_METRICS, RESULTS, FGSM, 'fgsm_*.png', BEST, PLOTS_DIR)


def check_folder(path, option: str) -> None:
  """A folder a command can make or write into, or a ValueError naming the `option` that
  gave it (before anything runs)."""
  if not isinstance(path, str) or not path.strip():
    raise ValueError(f'{option} must name a folder, got {path!r}.')
  existing = os.path.abspath(path)
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ValueError(f'{option} {path}: {existing} is a file, not a folder.')
  if not os.access(existing, os.W_OK | os.X_OK):
    raise ValueError(f'{option} {path}: {existing} is not writable.')


def set_aside(workdir: str, outputs) -> Optional[str]:
  """Moves the files and folders of `outputs` (globs) an earlier run left in `workdir` into
  `workdir/earlier_runs/<n>/`, so a fresh start's results never sit beside, or get reported
  as, an earlier run's; returns that folder (None when there was nothing)."""
  found = sorted({path for pattern in outputs
                  for path in glob.glob(os.path.join(glob.escape(workdir), pattern))})
  if not found:
    return None
  n = 1
  while os.path.exists(os.path.join(workdir, EARLIER, str(n))):
    n += 1
  folder = os.path.join(workdir, EARLIER, str(n))
  os.makedirs(folder)
  for path in found:
    os.replace(path, os.path.join(folder, os.path.basename(path)))
  logging.warning('%s held the outputs of an earlier run and no checkpoint to resume from: '
                  'moved %s to %s.', workdir, ', '.join(os.path.basename(p) for p in found),
                  folder)
  return folder


# A full disk, or a full quota: the same remedy.
_FULL = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
  """A write failed because the disk (or the user's quota) is full; `filename` names what
  was being written."""


def disk_full(error: BaseException) -> Optional[int]:
  """The errno (ENOSPC, EDQUOT) when `error`, or an error it was raised from, is a full disk
  or quota: an OSError of that errno, or the text Orbax and TensorStore wrap one in; else
  None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in _FULL:
      return error.errno
    for code in _FULL:
      if os.strerror(code) in str(error):
        return code
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def writing(path: str):
  """Names `path` in an OSError raised without a file name (a write or flush into a full
  disk reports none)."""
  try:
    yield
  except OSError as e:
    if e.filename is not None or e.errno is None:
      raise
    raise OSError(e.errno, e.strerror, path) from e


def write_json(path: str, obj, sort_keys: bool = False) -> None:
  """Writes JSON atomically (a crash never leaves half a file)."""
  tmp = f'{path}.tmp'
  with writing(path), open(tmp, 'w') as f:
    json.dump(obj, f, indent=1, sort_keys=sort_keys, default=str)
    f.write('\n')
  os.replace(tmp, path)


def load_json(path: str) -> dict:
  """The JSON object in `path`; {} when there is no such file (a run without it)."""
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    try:
      value = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e.msg}, line {e.lineno}).') from None
  if not isinstance(value, dict):
    raise ValueError(f'{path} holds a JSON {type(value).__name__}, not an object.')
  return value


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
        row = json.loads(line)
      except json.JSONDecodeError:
        if all(not rest.strip() for rest in lines[number:]):
          logging.warning('%s: line %d is cut short (an interrupted write); ignoring it.',
                          self.path, number)
          break
        raise ValueError(f'{self.path}: line {number} is not valid JSON; repair or delete '
                         'that line.') from None
      if not isinstance(row, dict) or isinstance(row.get('step'), bool) or not isinstance(
          row.get('step'), int):
        raise ValueError(f'{self.path}: line {number} is not a row (a JSON object with a whole '
                         'number `step`); repair or delete that line.')
      rows.append(row)
    return rows

  def keep_until(self, step: int) -> None:
    """Keeps only the rows up to global step `step` (those after it are redone on resume)
    and drops a line cut short; a file with nothing to drop is left as it is."""
    if self.write and os.path.exists(self.path):
      text = ''.join(json.dumps(r) + '\n' for r in self.read() if r['step'] <= step)
      with open(self.path) as f:
        if f.read() == text:
          return
      tmp = self.path + '.tmp'
      with writing(self.path), open(tmp, 'w') as f:
        f.write(text)
      os.replace(tmp, self.path)

  def append(self, row: Mapping) -> None:
    if self.write:
      with writing(self.path), open(self.path, 'a') as f:
        f.write(json.dumps(row) + '\n')
        f.flush()


def search_folder(run_dir: str, source) -> str:
  """The search folder a trained genotype came from (holding search_summary.json), or ''.

  `source` is results.json's `genotype_source` (a search folder or a genotype.json path, as
  given to train; relative paths are tried from the working directory and from `run_dir`);
  a run folder that holds a search_summary.json itself is its own search folder."""
  candidates = []
  if source and source not in genotypes.REFERENCE_GENOTYPES:
    for path in (source, os.path.join(run_dir, source),
                 os.path.join(os.path.dirname(os.path.normpath(run_dir)), source)):
      candidates.append(path if os.path.isdir(path) else os.path.dirname(path))
  candidates.append(run_dir)
  for folder in candidates:
    if folder and os.path.isfile(os.path.join(folder, SEARCH_SUMMARY)):
      return folder
  return ''


def search_summary(source: str) -> dict:
  """The search_summary.json of the search a genotype came from (`config.genotype`: a search
  folder or its genotype.json); {} for a reference genotype or a file without one."""
  folder = search_folder('', source)
  return load_json(os.path.join(folder, SEARCH_SUMMARY)) if folder else {}


def method_name(source: str, method: str = '') -> str:
  """A trained genotype's name in results: `method` (train.method) if given, else the
  reference cell's published name, the search's method, the search folder's (or file's)
  name, 'pasted genotype' for a `Genotype(...)` given as text, or 'random cell' for
  `random:I`."""
  if method:
    return method
  if random_cells.index(source) is not None:
    return random_cells.METHOD
  if source in genotypes.REFERENCE_METHODS:
    return genotypes.REFERENCE_METHODS[source][0]
  if source.lstrip().startswith('Genotype('):
    return 'pasted genotype'
  searched = search_summary(source).get('method')
  if searched:
    return searched
  if os.path.isdir(source):
    return os.path.basename(os.path.normpath(source))
  stem = os.path.splitext(os.path.basename(source))[0]
  return (os.path.basename(os.path.dirname(os.path.abspath(source)))
          if stem == os.path.splitext(GENOTYPE)[0] else stem)
