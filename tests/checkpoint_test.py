"""Tests for pcp_jax.checkpoint: round trip, rotation, damaged checkpoints."""

import glob
import logging
import os

import chex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pcp_jax import checkpoint


def _state(scale):
  params = {'w': jnp.full((3, 4), scale, jnp.float32), 'b': np.arange(2, dtype=np.float32)}
  return {'params': params, 'opt_state': optax.adam(1e-3).init(params), 'epoch': int(scale)}


def test_round_trip_keeps_values_types_and_metadata(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'checkpoints'))
  ckpt.save(7, _state(2.0), metadata={'val_loss': 0.5, 'note': 'x'})
  step, state, metadata = checkpoint.Checkpointer(str(tmp_path / 'checkpoints')).restore_latest(
      _state(0.0))
  assert step == 7
  chex.assert_trees_all_equal(state, _state(2.0))
  assert isinstance(state['epoch'], int) and state['epoch'] == 2
  assert isinstance(state['opt_state'][0], optax.ScaleByAdamState)
  assert metadata == {'val_loss': 0.5, 'note': 'x'}


def test_rotation_keeps_the_newest_max_to_keep(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=2)
  for step in range(1, 5):
    ckpt.save(step, _state(float(step)))
  assert ckpt.all_steps() == [3, 4]
  assert ckpt.latest_step() == 4
  assert sorted(d for d in os.listdir(tmp_path) if not d.startswith('.')) == ['3', '4']


def test_saving_an_existing_step_replaces_it(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1.0))
  ckpt.save(1, _state(5.0))
  step, state, _ = ckpt.restore_latest(_state(0.0))
  assert step == 1 and state['epoch'] == 5


@pytest.mark.parametrize('damage', ['delete', 'truncate'])
# Orbax leaves an async task behind when a read fails; it is harmless noise.
@pytest.mark.filterwarnings('ignore::pytest.PytestUnraisableExceptionWarning')
def test_damaged_latest_falls_back_to_the_previous_with_a_warning(tmp_path, caplog, damage):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
  for step in (1, 2):
    ckpt.save(step, _state(float(step)), metadata={'epoch': step})
  data_files = glob.glob(str(tmp_path / '2' / 'state' / 'd' / '*'))
  assert data_files
  for path in data_files:
    if damage == 'delete':
      os.remove(path)
    else:
      with open(path, 'r+b') as f:
        f.truncate(5)
  with caplog.at_level(logging.WARNING):
    step, state, metadata = checkpoint.Checkpointer(str(tmp_path)).restore_latest(_state(0.0))
  assert step == 1 and metadata == {'epoch': 1}
  chex.assert_trees_all_equal(state, _state(1.0))
  assert any('Checkpoint 2' in r.getMessage() for r in caplog.records)
  assert os.path.isdir(tmp_path / '1')


def test_interrupted_save_leaves_the_last_good_checkpoint(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1.0))
  # What a SIGKILL during the save of step 2 leaves: orbax's temporary folder, never renamed.
  os.makedirs(tmp_path / '2.orbax-checkpoint-tmp-123' / 'state')
  step, state, _ = checkpoint.Checkpointer(str(tmp_path)).restore_latest(_state(0.0))
  assert step == 1 and state['epoch'] == 1


def test_no_restorable_checkpoint_raises(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1.0))
  with pytest.raises(IOError, match='None of the checkpoints'):
    ckpt.restore_latest({'other': np.zeros(3)})


def test_empty_directory_gives_none(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'fresh'))
  assert ckpt.restore_latest(_state(0.0)) is None
  assert ckpt.latest_step() is None


def test_arrays_that_do_not_match_their_checksum_fall_back_with_a_warning(tmp_path, caplog):
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
  ckpt.save(1, _state(1.0))
  ckpt.save(2, _state(2.0))
  # The arrays of step 2 now differ from what its checksum says (as a flipped bit that still
  # decodes would make them).
  [path] = [p for p in glob.glob(str(tmp_path / '2' / '**'), recursive=True)
            if os.path.isfile(p) and checkpoint.CHECKSUM_KEY.encode() in open(p, 'rb').read()]
  text = open(path).read()
  digest = checkpoint.tree_checksum(_state(2.0))
  assert digest in text
  with open(path, 'w') as f:
    f.write(text.replace(digest, checkpoint.tree_checksum(_state(3.0))))
  with caplog.at_level(logging.WARNING):
    step, state, metadata = ckpt.restore_latest(_state(0.0))
  assert step == 1 and state['epoch'] == 1
  assert checkpoint.CHECKSUM_KEY not in metadata
  assert 'Checkpoint 2' in caplog.text and 'do not match their checksum' in caplog.text


@pytest.mark.parametrize('edit', [('"epoch": 2', '"epoch": 3'), ('"seed": 0', '"seed": 1')])
def test_edited_metadata_falls_back_with_a_warning_not_a_refusal(tmp_path, caplog, edit):
  # What resume reads from the metadata (the epoch to go on from, the config record) is
  # covered by a checksum: an edit is a damaged checkpoint, not another configuration.
  ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=3)
  for step in (1, 2):
    ckpt.save(step, _state(float(step)), metadata={'epoch': step, 'config': {'seed': 0}})
  path = str(tmp_path / '2' / 'metadata' / 'metadata')
  text = open(path).read()
  assert edit[0] in text
  with open(path, 'w') as f:
    f.write(text.replace(*edit))

  def template(metadata):
    if metadata['config'] != {'seed': 0}:
      raise checkpoint.IncompatibleCheckpoint('another configuration')
    return _state(0.0)

  with caplog.at_level(logging.WARNING):
    step, state, metadata = ckpt.restore_latest(template)
  assert step == 1 and state['epoch'] == 1 and metadata['epoch'] == 1
  assert checkpoint.METADATA_CHECKSUM_KEY not in metadata
  assert 'Checkpoint 2' in caplog.text and 'metadata does not match' in caplog.text


def test_workdir_lock_takes_the_file_at_its_path_not_one_a_finished_run_removed(
    tmp_path, monkeypatch):
  # The narrow window: this run opened the lock file just before its holder removed it and
  # let go; locking that removed file must not count, or a third run could hold the new one.
  path = tmp_path / checkpoint.WorkdirLock.NAME
  path.write_text('pid 1\n')
  orphan = open(path, 'a+')  # pylint: disable=consider-using-with
  path.unlink()
  handles = iter([orphan])
  real_open = open
  monkeypatch.setattr('builtins.open', lambda *a, **k: next(handles, None) or real_open(*a, **k))
  with checkpoint.WorkdirLock(str(tmp_path)) as lock:
    assert orphan.closed and os.path.samestat(os.fstat(lock._file.fileno()), os.stat(path))
    assert path.read_text().startswith(f'pid {os.getpid()} ')


def test_workdir_lock_removes_the_folders_a_failed_start_made(tmp_path):
  workdir = tmp_path / 'new' / 'nested' / 'run'
  with pytest.raises(RuntimeError):
    with checkpoint.WorkdirLock(str(workdir)):
      raise RuntimeError('failed before writing anything')
  assert os.listdir(tmp_path) == []
  kept = tmp_path / 'kept'
  with checkpoint.WorkdirLock(str(kept / 'run')):
    (kept / 'run' / 'genotype.json').write_text('{}')
  assert os.listdir(kept / 'run') == ['genotype.json']


def test_a_save_the_disk_has_no_room_for_is_refused_before_writing(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, _state(1.0))
  big = {'w': np.zeros((1024, 1024), np.float32)}  # 4 MiB
  free = checkpoint.shutil.disk_usage(str(tmp_path))._replace(free=4 * 2**20)
  monkeypatch.setattr(checkpoint.shutil, 'disk_usage', lambda _: free)
  with pytest.raises(checkpoint.runs.DiskFull, match='No space left on device') as full:
    ckpt.save(2, big)
  assert full.value.filename == os.path.join(str(tmp_path), '2')
  assert sorted(os.listdir(tmp_path)) == ['1']  # nothing half-written; the last one kept
  ckpt.save(2, {'w': np.zeros(4, np.float32)})  # what fits is saved
  assert ckpt.all_steps() == [1, 2]
