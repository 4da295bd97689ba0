"""Checkpoints of any pytree state plus a small JSON metadata dict, on orbax.

Each save is synchronous and orbax writes a step to a temporary folder that it
renames only once complete, so a crash or SIGKILL never leaves the last good
checkpoint half-written. A step that still fails to restore (a file deleted or
truncated later) is skipped with a warning in favour of the one before it.
"""

import json
import os
import signal
import threading
from typing import Any, Callable, Mapping, Optional, Tuple, Union

from absl import logging
import orbax.checkpoint as ocp


class IncompatibleCheckpoint(ValueError):
  """A checkpoint that restores but belongs to a different run configuration."""


class Checkpointer:
  """The newest `max_to_keep` checkpoints of a run in `directory`, one folder per step."""

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
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            metadata=ocp.args.JsonSave(dict(metadata or {}))),
        force=True)
    self._manager.wait_until_finished()

  def restore(self, step: int, template: Any) -> Tuple[Any, dict]:
    """The (state, metadata) saved as `step`, with the tree structure and types of `template`."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(template), metadata=ocp.args.JsonRestore()))
    return restored.state, dict(restored.metadata or {})

  def restore_metadata(self, step: int) -> dict:
    """The metadata saved with `step` (without reading the state)."""
    restored = self._manager.restore(
        step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return dict(restored.metadata or {})

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
          f'None of the checkpoints {steps} in {self.directory} restores ({error}). If the '
          'run configuration changed, use a new workdir.') from error
    return None

  def close(self) -> None:
    self._manager.close()


def write_json(path: str, obj) -> None:
  """Writes JSON atomically (a crash never leaves half a file)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
    f.write('\n')
  os.replace(tmp, path)


class DeferredInterrupt:
  """Context manager: the first Ctrl-C only sets `requested`, so a loop can save and stop.

  A second Ctrl-C interrupts at once. Outside the main thread (where Python cannot install
  signal handlers) it does nothing and Ctrl-C behaves as usual.
  """

  def __init__(self, what: str = 'the run'):
    self.what = what
    self.requested = False
    self._previous = None

  def _handler(self, signum, frame):
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    logging.warning('Ctrl-C: %s saves a checkpoint after the current steps and stops; press '
                    'Ctrl-C again to stop at once (losing the steps since the last checkpoint).',
                    self.what)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handler)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
    return False
