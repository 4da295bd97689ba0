"""The epoch driver's host-side parts: metric rows, chunk ends, signals, padded evaluation,
the config fingerprint. (The driver end to end: search_resume_test and train_test.)"""

import json
import os
import signal

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pcp_jax import checkpoint
from pcp_jax import loop


def test_rows_drop_a_trailing_cut_line_with_a_warning(tmp_path, caplog):
  path = str(tmp_path / 'metrics.jsonl')
  rows = loop.Rows(path)
  rows.append({'step': 4, 'loss': 1.0})
  rows.append({'step': 8, 'loss': 0.5})
  with open(path, 'a') as f:
    f.write('{"step": 12, "lo')  # a kill during an append
  assert rows.read() == [{'step': 4, 'loss': 1.0}, {'step': 8, 'loss': 0.5}]
  assert 'line 3 is cut short' in caplog.text
  rows.keep_until(4)  # a resume from step 4 rewrites the file without the cut line
  assert rows.read() == [{'step': 4, 'loss': 1.0}]
  rows.append({'step': 8, 'loss': 0.25})
  assert [r['loss'] for r in rows.read()] == [1.0, 0.25]


def test_rows_name_the_file_and_line_of_damage_inside(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 4}\nnot json\n{"step": 12}\n')
  with pytest.raises(ValueError, match=rf'{path}: line 2 is not valid JSON'):
    loop.Rows(str(path)).read()


def test_rows_of_other_processes_write_nothing(tmp_path):
  rows = loop.Rows(str(tmp_path / 'm.jsonl'), write=False)
  rows.append({'step': 1})
  rows.keep_until(0)
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize('step, steps, everies, expected', [
    (0, 10, (4, 3), 3), (3, 10, (4, 3), 4), (4, 10, (4, 3), 6), (8, 10, (4, 3), 9),
    (9, 10, (4, 3), 10), (0, 10, (0, 0), 10), (5, 10, (0, 5), 10)])
def test_chunks_end_where_a_line_or_a_checkpoint_is_due(step, steps, everies, expected):
  assert loop._next_stop(step, steps, *everies) == expected  # pylint: disable=protected-access


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_first_signal_is_deferred_and_the_second_stops_at_once(signum):
  before = signal.getsignal(signum)
  with loop.Signals('the test') as signals:
    os.kill(os.getpid(), signum)
    assert signals.requested == signum
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signum)
  assert signal.getsignal(signum) is before


def test_interrupted_names_the_signal_and_the_folder(tmp_path):
  run = loop.Run(ckpt=checkpoint.Checkpointer(str(tmp_path / 'ckpt')),
                 rows=loop.Rows(str(tmp_path / 'm.jsonl')), what='the search', every_steps=0,
                 log_every_steps=0, meta={}, hint='', signals=loop.Signals('x'),
                 progress=None, scalars=None)
  run.stop_if_requested(run.signals.agreed())  # nothing requested: goes on
  run.signals.requested = signal.SIGTERM
  with pytest.raises(loop.Interrupted, match=r'The search stopped on SIGTERM; saved in .*ckpt'):
    run.stop_if_requested(run.signals.agreed())


def test_evaluate_pads_the_last_batch_and_masks_it():
  images = np.arange(10, dtype=np.float32)
  labels = np.zeros(10, np.int32)
  seen = []

  def eval_fn(variables, x, y, mask, key):
    del variables, y, key
    seen.append(len(x))
    return {'sum': jnp.sum(x * mask), 'count': jnp.sum(mask)}

  means = loop.evaluate(eval_fn, None, images, labels, 4)
  assert seen == [4, 4, 4]  # one shape: one compile
  assert means == {'sum': pytest.approx(4.5), 'count': pytest.approx(1.0)}


def test_fingerprint_leaves_out_the_free_fields_and_names_the_changed_ones():
  config = ml_collections.ConfigDict({'seed': 0, 'train': {'lr': 0.1, 'epochs': 3},
                                      'stages': [{'layers': 5}]})
  saved = loop.fingerprint(config, ('train.epochs',))
  assert saved == {'seed': 0, 'train.lr': 0.1, 'stages.0.layers': 5}
  config.train.epochs = 10
  loop.check_fingerprint(saved, loop.fingerprint(config, ('train.epochs',)), 'dir', 'x')
  config.train.lr = 0.2
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r'train\.lr: 0\.1 -> 0\.2'):
    loop.check_fingerprint(saved, loop.fingerprint(config, ('train.epochs',)), 'dir', 'x')
  assert json.dumps(saved)  # stored in the checkpoint's JSON metadata
