"""Checkpoints of any pytree state plus a small JSON metadata dict, on orbax.

Each save is synchronous and orbax writes a step to a temporary folder that it
renames only once complete, so a crash or SIGKILL never leaves the last good
checkpoint half-written. A step that still fails to restore (a file deleted or
truncated later) is skipped with a warning in favour of the one before it. A run resumes
only from a checkpoint of its own configuration (`restore`: the config's fingerprint).
"""

import errno
import fcntl
import glob
import hashlib
import json
import os
import shutil
import socket
import time
from typing import Any, Callable, Mapping, Optional, Tuple, Union

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp

from pcp_jax import runs


class IncompatibleCheckpoint(ValueError):
  """A checkpoint that restores but belongs to a different run configuration."""


class CorruptCheckpoint(IOError):
  """A checkpoint whose arrays do not match the checksum saved with them."""


CHECKSUM_KEY = '_checksum'
METADATA_CHECKSUM_KEY = '_metadata_checksum'


def tree_checksum(tree: Any) -> str:
  """SHA-256 over the paths, dtypes, shapes and bytes of a tree's arrays."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    array = np.ascontiguousarray(jax.device_get(leaf))
    digest.update(f'{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};'.encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def metadata_checksum(metadata: Mapping) -> str:
  """SHA-256 over the metadata's canonical JSON (sorted keys): what resume reads from it
  (epoch, step, config record) is covered as the arrays are."""
  return hashlib.sha256(json.dumps(metadata, sort_keys=True).encode()).hexdigest()


class Checkpointer:
  """The newest `max_to_keep` checkpoints of a run in `directory`, one folder per step.

  Checksums of the arrays and of the rest of the metadata are saved in the metadata and
  verified on restore, so a damaged file that still decodes (a flipped bit, an edited
  epoch) is found like one that does not, and an older checkpoint is used instead."""

  def __init__(self, directory: str, max_to_keep: Optional[int] = 3):
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=True, enable_async_checkpointing=False))

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any, metadata: Optional[Mapping] = None) -> None:
    """Writes `state` and the JSON-ready `metadata` as `step`, replacing that step if present."""
    if step in self._manager.all_steps():
      # A resumed run redoes the steps after the checkpoint it resumed from.
      self._manager.delete(step)
    self._check_space(step, state)
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              metadata=ocp.args.JsonSave(dict(
                  metadata or {}, **{CHECKSUM_KEY: tree_checksum(state),
                                     METADATA_CHECKSUM_KEY: metadata_checksum(metadata or {})}))),
          force=True)
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      code = runs.disk_full(e)  # Orbax raises it as an OSError or a TensorStore ValueError
      if code is None:
        raise
      # The half-written step goes (the space it holds is the user's); the older ones stay.
      for partial in glob.glob(os.path.join(glob.escape(self.directory), f'{step}.*tmp*')):
        shutil.rmtree(partial, ignore_errors=True)
      raise runs.DiskFull(code, os.strerror(code), os.path.join(self.directory, str(step))) from e

  def _check_space(self, step: int, state: Any) -> None:
    """Raises `runs.DiskFull` before a save that the disk has no room for: Orbax's writes
    failing half-way leave their threads' errors and tracebacks behind, a check does not."""
    size = sum(getattr(leaf, 'nbytes', 0) for leaf in jax.tree_util.tree_leaves(state))
    if shutil.disk_usage(self.directory).free < size + size // 4 + 2**18:  # and metadata
      raise runs.DiskFull(errno.ENOSPC, os.strerror(errno.ENOSPC),
                          os.path.join(self.directory, str(step)))

  def restore(self, step: int, template: Any) -> Tuple[Any, dict]:
    """The (state, metadata) saved as `step`, with the tree structure and types of `template`.

    Raises:
      CorruptCheckpoint: the arrays read differ from those saved.
    """
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), metadata=ocp.args.JsonRestore()))
    metadata, expected = self._checked_metadata(step, restored.metadata)
    if expected is not None and tree_checksum(restored.state) != expected:
      raise CorruptCheckpoint(f'checkpoint {step} in {self.directory}: its arrays do not '
                              'match their checksum (damaged on disk)')
    return restored.state, metadata

  def restore_metadata(self, step: int) -> dict:
    """The metadata saved with `step` (without reading the state)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return self._checked_metadata(step, restored.metadata)[0]

  def _checked_metadata(self, step: int, saved) -> Tuple[dict, Optional[str]]:
    """(the caller's metadata, verified; the arrays' checksum) of what `save` stored.
    Checkpoints written before a checksum existed are taken as they are."""
    metadata = dict(saved or {})
    arrays_checksum = metadata.pop(CHECKSUM_KEY, None)
    expected = metadata.pop(METADATA_CHECKSUM_KEY, None)
    if expected is not None and metadata_checksum(metadata) != expected:
      raise CorruptCheckpoint(f'checkpoint {step} in {self.directory}: its metadata does not '
                              'match its checksum (edited or damaged on disk)')
    return metadata, arrays_checksum

  def restore_latest(self, template: Union[Any, Callable[[dict], Any]]
                     ) -> Optional[Tuple[int, Any, dict]]:
    """(step, state, metadata) of the newest checkpoint that restores; None if there is none.

    `template` is the state's structure, or a function of a checkpoint's metadata that
    returns it (when the structure depends on what was saved, e.g. a search stage).

    Raises:
      IOError: checkpoints exist but none of them restores into `template`.
    """
    steps = self.all_steps()
    error = None
    for step in reversed(steps):
      try:
        if callable(template):
          state, metadata = self.restore(step, template(self.restore_metadata(step)))
        else:
          state, metadata = self.restore(step, template)
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # pylint: disable=broad-except
        # Orbax and tensorstore raise many types for missing or damaged files.
        error = e
        logging.warning('Checkpoint %d in %s does not restore (%s: %s); trying an older one.',
                        step, self.directory, type(e).__name__, str(e)[:300])
        continue
      return step, state, metadata
    if steps:
      raise IOError(
          f'None of the checkpoints {steps} in {self.directory} restores (the newest fails '
          f'with {type(error).__name__}: {str(error)[:200]}): they are damaged, or of another '
          'network than this config builds.') from error
    return None

  def close(self) -> None:
    self._manager.close()


class WorkdirBusy(RuntimeError):
  """Another run holds the workdir."""


class WorkdirLock:
  """Context manager: one run at a time on a workdir (a second one is refused, naming the
  holder). The lock is the operating system's (`flock`), so a killed run never leaves it
  held. A workdir this run created and left empty (an early failure) is removed again."""

  NAME = runs.LOCK

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, self.NAME)
    self._file = None
    self._created = []  # the folders this run made, the workdir first

  def __enter__(self):
    folder = self.workdir
    while not os.path.isdir(folder):
      self._created.append(folder)
      folder = os.path.dirname(folder)
    os.makedirs(self.workdir, exist_ok=True)
    for _ in range(100):
      self._file = open(self.path, 'a+')  # pylint: disable=consider-using-with
      try:
        fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        self._file.seek(0)
        holder = self._file.read().strip() or 'a process'
        self._file.close()
        self.__exit__(None, None, None, locked=False)
        raise WorkdirBusy(f'{self.workdir} is in use by another run ({holder}); wait for it, '
                          'stop it, or use another --workdir.') from None
      # A holder that just finished removed the file it locked: this lock is on that old
      # file, not on the one at the path now; take the path's.
      try:
        same = os.path.samestat(os.fstat(self._file.fileno()), os.stat(self.path))
      except FileNotFoundError:
        same = False
      if same:
        break
      self._file.close()
    self._file.seek(0)
    self._file.truncate()
    self._file.write(f'pid {os.getpid()} on {socket.gethostname()} since '
                     f'{time.strftime("%Y-%m-%d %H:%M:%S")}\n')
    self._file.flush()
    return self

  def __exit__(self, *exc, locked=True):
    if locked:
      os.remove(self.path)  # while holding the lock: a later run locks a new file
      self._file.close()  # closing releases the lock
    for folder in self._created:  # those this run made and left empty (an early failure)
      if os.path.isdir(folder) and not os.listdir(folder):
        os.rmdir(folder)
    return False


# ---------------------------------------------------------------------------
# Resuming: a checkpoint of the same configuration.


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
    raise IncompatibleCheckpoint(
        f'The {what} checkpoints in {directory} belong to a different configuration '
        f'({details}). Rerun with the same config to resume, or use a new workdir.')


def restore(ckpt: Checkpointer, template: Callable[[dict], Any],
            config_fingerprint: dict, what: str, only: tuple = ()):
  """(global step, {'state', 'sums'}, metadata) of the newest checkpoint that restores, or
  None. `template(metadata)` gives the tree's structure (shapes by `jax.eval_shape`); a
  checkpoint of another configuration (in the fields starting with one of `only`, if given)
  is refused before its arrays are read."""

  def checked_template(meta):
    saved = meta.get('config', {})
    if only:
      saved, current = ({k: v for k, v in f.items() if k.startswith(only)}
                        for f in (saved, config_fingerprint))
    else:
      current = config_fingerprint
    check_fingerprint(saved, current, ckpt.directory, what)
    return template(meta)

  return ckpt.restore_latest(checked_template)


def zeros_like_shapes(shapes):
  """Host zeros shaped like `jax.eval_shape`'s output: a restore template."""
  return jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
