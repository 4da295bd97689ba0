"""The shared loop parts with a fake state: chunks, resume mid-epoch, the NaN stop, signals
and periodic saves, padded evaluation, the config fingerprint. Each mode end to end:
search_resume_test and train_test."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pcp_jax import checkpoint
from pcp_jax import loop
from pcp_jax import monitor
from pcp_jax import parallel
from pcp_jax import runs


@pytest.mark.parametrize('step, steps, everies, expected', [
    (0, 10, (4, 3), 3), (3, 10, (4, 3), 4), (4, 10, (4, 3), 6), (8, 10, (4, 3), 9),
    (9, 10, (4, 3), 10), (0, 10, (0, 0), 10), (5, 10, (0, 5), 10)])
def test_chunks_end_where_a_line_or_a_checkpoint_is_due(step, steps, everies, expected):
  assert loop.next_stop(step, steps, *everies) == expected


@pytest.mark.parametrize('signum', [signal.SIGINT, signal.SIGTERM])
def test_first_signal_is_deferred_and_the_second_stops_at_once(signum):
  before = signal.getsignal(signum)
  with loop.Signals('the test') as signals:
    os.kill(os.getpid(), signum)
    assert signals.requested == signum
    # One line for main.py (an Interrupted), not a traceback from wherever it lands.
    with pytest.raises(loop.Interrupted, match='The test stopped at once on a second '
                                               f'{signal.Signals(signum).name}') as stopped:
      os.kill(os.getpid(), signum)
    assert stopped.value.signum == signum
  assert signal.getsignal(signum) is before


def test_interrupted_names_the_signal_and_the_folder(tmp_path):
  sess = _session(tmp_path, what='the search')
  sess.stop_if_requested()  # nothing requested: goes on
  sess.signals.requested = signal.SIGTERM
  with pytest.raises(loop.Interrupted, match=r'The search stopped on SIGTERM; saved in .*ckpt'):
    sess.stop_if_requested()


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
  saved = checkpoint.fingerprint(config, ('train.epochs',))
  assert saved == {'seed': 0, 'train.lr': 0.1, 'stages.0.layers': 5}
  config.train.epochs = 10
  checkpoint.check_fingerprint(saved, checkpoint.fingerprint(config, ('train.epochs',)), 'dir', 'x')
  config.train.lr = 0.2
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r'train\.lr: 0\.1 -> 0\.2'):
    checkpoint.check_fingerprint(saved, checkpoint.fingerprint(config, ('train.epochs',)), 'dir',
                                 'x')
  assert json.dumps(saved)  # stored in the checkpoint's JSON metadata


# ---------------------------------------------------------------------------
# run_epoch on a fake state: the state counts steps and sums the batches it saw, in order.

STEPS, BATCH = 10, 2


def _session(tmp_path, every_steps=0, log_every_steps=0, what='training'):
  return loop.Session(ckpt=checkpoint.Checkpointer(str(tmp_path / 'ckpt')),
                      rows=None, what=what, hint='Lower the lr.', every_steps=every_steps,
                      log_every_steps=log_every_steps, signals=loop.Signals(what),
                      progress=monitor.Progress(STEPS), tensorboard=None)


def _fake_step(state, batch, key, hparams):
  del key
  images, _ = batch['train']
  value = jnp.sum(images) * hparams
  state = {'steps': state['steps'] + 1,
           'trace': state['trace'] * 1.5 + value}  # order-dependent
  return state, {'train_loss': value, 'train_acc': jnp.float32(1.0)}


def _inputs(bad_step=None):
  images = np.arange(STEPS * BATCH, dtype=np.float32).reshape(STEPS * BATCH, 1)
  if bad_step is not None:
    images[bad_step * BATCH] = np.nan
  order = np.random.default_rng(0).permutation(STEPS * BATCH).astype(np.int32)
  if bad_step is not None:  # the NaN row lands in batch `bad_step`
    order = np.arange(STEPS * BATCH, dtype=np.int32)
  return loop.EpochInputs({'train': images}, {'train': np.zeros(STEPS * BATCH, np.int32)},
                          {'train': order}, jax.random.key(0), jnp.float32(0.5))


def _fresh():
  return ({'steps': jnp.int32(0), 'trace': jnp.float32(0.0)},
          loop.zero_sums(('train_loss', 'train_acc')))


EPOCH = loop.Epoch('training', 2, 5, STEPS, 2 * STEPS)


def _run(sess, state, sums, step=0, inputs=None, saves=None):
  chunk_fn = loop.make_chunk_fn(_fake_step, BATCH, parallel.make_mesh(1))

  def save(state, sums, at):
    if saves is not None:
      saves.append((at, jax.device_get(state), jax.device_get(sums)))

  return loop.run_epoch(sess, chunk_fn, state, sums, inputs or _inputs(), EPOCH, step, save)


def _assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_an_epoch_in_chunks_equals_one_chunk_and_saves_every_n_steps(tmp_path):
  whole = _run(_session(tmp_path), *_fresh())
  saves = []
  chunked = _run(_session(tmp_path, every_steps=3, log_every_steps=2), *_fresh(), saves=saves)
  _assert_same(whole, chunked)
  assert int(whole[0]['steps']) == STEPS
  assert [at for at, _, _ in saves] == [3, 6, 9]


def test_a_resume_mid_epoch_finishes_as_the_uninterrupted_epoch(tmp_path):
  whole = _run(_session(tmp_path), *_fresh())
  saves = []
  _run(_session(tmp_path, every_steps=4), *_fresh(), saves=saves)
  at, state, sums = saves[1]
  assert at == 8
  resumed = _run(_session(tmp_path), state, sums, step=at)
  _assert_same(whole, resumed)


def test_a_nan_stops_naming_the_step_and_the_kept_checkpoint(tmp_path):
  sess = _session(tmp_path, every_steps=3)
  sess.ckpt.save(23, {'x': np.zeros(1)}, {})
  with pytest.raises(loop.NonFinite) as e:
    _run(sess, *_fresh(), inputs=_inputs(bad_step=6))
  message = str(e.value)
  assert 'training, epoch 3, step 7 of 10 (global step 27)' in message
  assert 'The last good checkpoint (step 23) is kept' in message and 'Lower the lr.' in message


def test_a_nan_before_any_checkpoint_says_so(tmp_path):
  with pytest.raises(loop.NonFinite, match='step 1 of 10 .*No checkpoint was written'):
    _run(_session(tmp_path), *_fresh(), inputs=_inputs(bad_step=0))


def test_a_signal_saves_after_the_chunk_it_arrived_in_and_stops(tmp_path, monkeypatch):
  sess = _session(tmp_path, log_every_steps=4)
  chunks = []
  agreed = sess.signals.agreed

  def signal_after_second_chunk():
    chunks.append(1)
    if len(chunks) == 2:
      sess.signals.requested = signal.SIGTERM
    return agreed()

  monkeypatch.setattr(sess.signals, 'agreed', signal_after_second_chunk)
  saves = []
  with pytest.raises(loop.Interrupted, match='Training stopped on SIGTERM'):
    _run(sess, *_fresh(), saves=saves)
  assert [at for at, _, _ in saves] == [8]
  assert int(saves[0][1]['steps']) == 8


def test_a_row_lost_after_its_checkpoint_comes_back_from_it(tmp_path):
  sess, rows = _session(tmp_path), runs.Rows(str(tmp_path / 'metrics.jsonl'))
  for step in (10, 20):
    sess.append(rows, {'step': step, 'loss': 1.0 / step})
  sess.save(20, *_fresh(), {'epoch': 2})
  sess.append(rows, {'step': 25, 'loss': 0.0})  # after the checkpoint: redone on resume
  meta = sess.ckpt.restore_metadata(20)
  loop.resume_rows([rows], 20, meta)
  assert rows.read() == [{'step': 10, 'loss': 0.1}, {'step': 20, 'loss': 0.05}]
  # The row of the checkpoint's epoch cut short (a kill, a full disk, a copy): it comes back.
  with open(rows.path) as f:
    text = f.read()
  with open(rows.path, 'w') as f:
    f.write(text[:-10])
  loop.resume_rows([rows], 20, meta)
  assert rows.read() == [{'step': 10, 'loss': 0.1}, {'step': 20, 'loss': 0.05}]
  with open(rows.path) as f:
    assert f.read() == text
  # Nothing to restore: the file is left as it is.
  mtime = os.stat(rows.path).st_mtime_ns
  loop.resume_rows([rows], 20, meta)
  assert os.stat(rows.path).st_mtime_ns == mtime
