"""TensorBoard event files: a run's scalars, architecture weights and text (`Writer`), and
its scalars read back (`read_scalars`), with tensorboardX's records and protos only (no
TensorFlow, no tensorboard).

Events are written in the caller's thread: an error such as a full disk surfaces at the call
that hit it (the run stops there, naming the file) instead of in a background thread, and
nothing is left to write at exit.
"""

import numbers
import os
import struct
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
from tensorboardX import event_file_writer
from tensorboardX import summary
from tensorboardX.proto import event_pb2

from pcp_jax import genotypes
from pcp_jax import parallel
from pcp_jax import runs


def scalar_value(value) -> Optional[float]:
  """A scalar's float value (booleans as 0/1), or None for anything else (strings, lists,
  dicts, arrays of more than one value)."""
  if isinstance(value, (bool, np.bool_)):
    return float(value)
  if isinstance(value, (numbers.Real, np.number)):
    return float(value)
  if isinstance(value, np.ndarray) and value.ndim == 0 and (
      np.issubdtype(value.dtype, np.number) or value.dtype == bool):
    return float(value)
  return None


def arch_tag(cell: str, edge: int, name: str) -> str:
  """The tag of an architecture weight: 'arch/normal/c_k-1_to_node_1/sep_conv_3x3', the edge
  named as the figures name it (`genotypes.edge_tag`)."""
  return f'arch/{cell}/{genotypes.edge_tag(edge)}/{name}'


def as_markdown(text: str) -> str:
  """`text` as a preformatted block of TensorBoard's text tab (markdown)."""
  return '\n'.join('    ' + line for line in text.splitlines())


class Writer:
  """The event file of one session of a mode: `workdir/tensorboard/<name>/`.

  Steps are the run's global step (counted across a search's stages), and an event at step
  `s` describes the run after `s` steps. After a resume, construct it with `purge_step` = the
  first step whose events the resumed session writes again, normally the restored
  checkpoint's step + 1: TensorBoard (and `read_scalars`) then hides the earlier sessions'
  events at steps >= purge_step, so replayed steps show once. On processes other than 0
  every method does nothing.
  """

  def __init__(self, workdir: str, name: str, purge_step: Optional[int] = None):
    self.logdir = os.path.join(workdir, runs.TENSORBOARD_DIR, name)
    self._file = None
    self._arch_layout_written = False
    if not parallel.is_main_process():
      return
    os.makedirs(self.logdir, exist_ok=True)
    # The file is named by the second and host; the nanosecond suffix keeps two sessions of
    # the same second apart and sorted in the order TensorBoard must read them (purges apply
    # to earlier files).
    self._file = event_file_writer.EventsWriter(os.path.join(self.logdir, 'events'),
                                                f'.{time.time_ns()}')
    if purge_step is not None:
      self._add(purge_step, session_log=event_pb2.SessionLog(
          status=event_pb2.SessionLog.START))

  def _add(self, step: int, **fields) -> None:
    with runs.writing(self.logdir):
      self._file.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), **fields))

  def write(self, step: int, scalars: Mapping[str, Any], prefix: str = '') -> None:
    """Writes each numeric value of `scalars` as `prefix + key` at `step`; booleans as 0/1;
    strings, nested dicts and other non-scalars are skipped."""
    if self._file is None:
      return
    values = [summary.scalar(prefix + key, v).value[0] for key, v in
              ((key, scalar_value(value)) for key, value in scalars.items()) if v is not None]
    if values:
      self._add(step, summary=summary.Summary(value=values))

  def write_text(self, step: int, tag: str, text: str) -> None:
    """`text` under `tag` in TensorBoard's text tab, at `step`, as a preformatted block."""
    if self._file is not None:
      self._add(step, summary=summary.text(tag, as_markdown(text)))

  def write_arch(self, step: int, weights: Mapping[str, Any]) -> None:
    """Writes architecture weights as `arch_tag(cell, edge, op)` scalars at `step`.

    `weights` is a row of `genotypes.arch_weights`: per cell ('normal', 'reduce'),
    `alphas_<cell>` (14 edges x len(primitives)) op probabilities, optionally
    `switches_<cell>` (ops off are skipped, so a pruned op's line ends) and `betas_<cell>`
    (14 edge-normalisation weights, written as `edge_weight`; all ones means the search has
    no betas and they are skipped), and `primitives` (default genotypes.PRIMITIVES). A
    custom-scalars layout (TensorBoard's CUSTOM SCALARS tab) draws each edge's ops as lines
    of one chart titled as the op-weight figure titles its panel.
    """
    if self._file is None:
      return
    primitives = list(weights.get('primitives', genotypes.PRIMITIVES))
    cells = [key[len('alphas_'):] for key in weights if key.startswith('alphas_')]
    scalars = {}
    for cell in cells:
      probs = np.asarray(weights[f'alphas_{cell}'], dtype=np.float64)
      on = np.asarray(weights.get(f'switches_{cell}', np.ones(probs.shape, bool)), bool)
      betas = weights.get(f'betas_{cell}')
      if betas is not None and np.all(np.asarray(betas) == 1.0):
        betas = None
      for e in range(probs.shape[0]):
        scalars.update({arch_tag(cell, e, op): probs[e, o]
                        for o, op in enumerate(primitives) if on[e, o]})
        if betas is not None:
          scalars[arch_tag(cell, e, 'edge_weight')] = float(betas[e])
    self.write(step, scalars)
    if not self._arch_layout_written and cells:
      self._add(step, summary=summary.custom_scalars({
          f'arch {cell}': {genotypes.edge_name(e): ['Multiline', [f'{arch_tag(cell, e, "")}.*']]
                           for e in range(np.shape(weights[f'alphas_{cell}'])[0])}
          for cell in cells}))
      self._arch_layout_written = True

  def flush(self) -> None:
    if self._file is not None:
      with runs.writing(self.logdir):
        self._file.flush()

  def close(self) -> None:
    if self._file is not None:
      events, self._file = self._file, None
      with runs.writing(self.logdir):
        events.close()

  def __enter__(self):
    return self

  def __exit__(self, error_type, *_):
    try:
      self.close()
    except OSError:
      if error_type is None:
        raise
      # Already stopping on an error (a full disk, most likely): that error is the news.
    return False


def _event_records(path: str):
  """The records of a TFRecord file: (uint64 length, uint32 crc, data, uint32 crc) each.
  Checksums are not verified; a cut-off last record (a writer still writing or killed) ends
  the file."""
  with open(path, 'rb') as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack('<Q', header[:8])
      data = f.read(length)
      if len(data) < length or len(f.read(4)) < 4:
        return
      yield data


def read_events(logdir: str):
  """The events of a TensorBoard run folder in written order (files in session order)."""
  # Event file names start with their creation time, so name order is session order.
  names = os.listdir(logdir) if os.path.isdir(logdir) else []
  for name in sorted(f for f in names if 'tfevents' in f):
    for record in _event_records(os.path.join(logdir, name)):
      yield event_pb2.Event.FromString(record)


def read_scalars(logdir: str) -> Dict[str, List[Tuple[int, float]]]:
  """The scalars of a TensorBoard run folder, {tag: [(step, value), ...]} in written order,
  as TensorBoard shows them: a session started with `purge_step` hides the earlier files'
  events at steps >= purge_step."""
  scalars: Dict[str, List[Tuple[int, float]]] = {}
  for event in read_events(logdir):
    if (event.HasField('session_log') and
        event.session_log.status == event_pb2.SessionLog.START):
      # TensorBoard's rule for a restarted session: drop every tag's events from this step.
      scalars = {tag: [(s, v) for s, v in points if s < event.step]
                 for tag, points in scalars.items()}
    if not event.HasField('summary'):
      continue
    for value in event.summary.value:
      if value.HasField('simple_value'):
        scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
  return {tag: points for tag, points in scalars.items() if points}


def read_texts(logdir: str) -> Dict[str, List[Tuple[int, str]]]:
  """The text summaries of a TensorBoard run folder, {tag: [(step, text), ...]}."""
  texts: Dict[str, List[Tuple[int, str]]] = {}
  for event in read_events(logdir):
    for value in event.summary.value:
      if value.metadata.plugin_data.plugin_name == 'text':
        texts.setdefault(value.tag, []).append(
            (event.step, value.tensor.string_val[0].decode('utf-8')))
  return texts
