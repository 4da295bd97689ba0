"""Search checkpoints: Ctrl-C saves, stops and resumes to the uninterrupted result; config
changes are refused; SIGKILL at any point (slow: subprocesses) and rerun gives the
uninterrupted result; a corrupt latest checkpoint falls back.

The runs are subprocesses of one tiny config (the session's compilation cache, inherited
through the environment, makes all but the first nearly free). Faults are injected by the test
(a SIGKILL the process sends itself after its k-th checkpoint or during an epoch's evaluation;
files deleted from the newest checkpoint), not by the library.
"""

import importlib
import json
import logging as stdlib_logging
import os
import signal
import subprocess
import sys

from conftest import end_on_chunk
from conftest import on_chunk
from conftest import subprocess_env
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pcp_jax import checkpoint
from pcp_jax import genotypes
from pcp_jax import loop
from pcp_jax import main
from pcp_jax import population
from pcp_jax import runs
from pcp_jax import search

RUNNER = r'''
import importlib, os, signal, sys
from absl import logging
from pcp_jax import checkpoint, loop, main
logging.set_verbosity(logging.INFO)
workdir, every, kill_after_saves, kill_at_eval = sys.argv[1], *map(int, sys.argv[2:5])
config = importlib.import_module('configs.pc_darts').get_config('tiny')
config.checkpoint.every_steps = every
if kill_after_saves:
  save, count = checkpoint.Checkpointer.save, [0]
  def save_then_die(self, *args, **kwargs):
    save(self, *args, **kwargs)
    count[0] += 1
    if count[0] == kill_after_saves:
      os.kill(os.getpid(), signal.SIGKILL)
  checkpoint.Checkpointer.save = save_then_die
if kill_at_eval:
  evaluate, count = loop.evaluate, [0]
  def die_in_evaluation(*args, **kwargs):
    count[0] += 1
    if count[0] == kill_at_eval:
      os.kill(os.getpid(), signal.SIGKILL)
    return evaluate(*args, **kwargs)
  loop.evaluate = die_in_evaluation
main.run(config, workdir)
'''
TIMEOUT = 1200


def run(workdir, every=1, kill_after_saves=0, kill_at_eval=0):
  proc = subprocess.run(
      [sys.executable, '-c', RUNNER, str(workdir), str(every), str(kill_after_saves),
       str(kill_at_eval)], env=subprocess_env(), capture_output=True, text=True,
      timeout=TIMEOUT)
  return proc


def result(workdir):
  with open(os.path.join(workdir, 'genotype.json')) as f:
    genotype = json.load(f)
  arch = dict(np.load(os.path.join(workdir, 'arch.npz')))
  with open(os.path.join(workdir, 'search_metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  losses = [(r['stage'], r['epoch'], r['train_loss'], r['arch_loss'], r['valid_loss'])
            for r in rows]
  return genotype, arch, losses


def assert_same(a, b):
  assert a[0] == b[0]
  assert a[1].keys() == b[1].keys()
  for k in a[1]:
    np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=k)
  assert a[2] == b[2]


@pytest.fixture(scope='module')
def uninterrupted(tmp_path_factory):
  """One epoch-chunked run (checkpoints only at epoch ends), in this process."""
  workdir = tmp_path_factory.mktemp('uninterrupted')
  search.search(tiny_config(0), str(workdir))
  return result(workdir)


@pytest.mark.slow
def test_population_members_get_their_solo_results_and_resume_bitwise(uninterrupted, tmp_path,
                                                                      monkeypatch):
  """Float32 (the CPU wing here): two seeds as one program. Member 0's genotype is its solo
  run's (`uninterrupted`); Ctrl-C mid-epoch and a rerun give the uninterrupted population's
  results bit for bit."""
  config = tiny_config(1)
  config.search.population.seeds = 2
  population.run(config, str(tmp_path / 'pop'))
  members = [result(tmp_path / 'pop' / 'members' / str(k)) for k in range(2)]
  assert members[0][0] == uninterrupted[0]  # the genotype
  for k in uninterrupted[1]:
    np.testing.assert_allclose(members[0][1][k], uninterrupted[1][k], rtol=1e-3, atol=1e-5,
                               err_msg=k)

  def interrupt(state):
    os.kill(os.getpid(), signal.SIGINT)  # handled after this chunk of steps
    return state
  on_chunk(monkeypatch, 6, interrupt)  # epoch 2, step 2 (chunks of one step)
  with pytest.raises(loop.Interrupted, match='SIGINT'):
    population.run(config, str(tmp_path / 'stopped'))
  end_on_chunk(monkeypatch)
  population.run(config, str(tmp_path / 'stopped'))
  for k in range(2):
    assert_same(result(tmp_path / 'stopped' / 'members' / str(k)), members[k])


def damage_newest_checkpoint(ckpt_dir):
  """Overwrites the newest checkpoint's array data (its metadata still reads); its step and
  the one before."""
  steps = sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  assert len(steps) >= 2
  for root, _, files in os.walk(ckpt_dir / str(steps[-1]) / 'state'):
    for name in files:
      with open(os.path.join(root, name), 'wb') as f:
        f.write(b'garbage')
  return steps[-1], steps[-2]


@pytest.mark.slow
@pytest.mark.parametrize('every,kill_after_saves,kill_at_eval,corrupt', [
    # Right after the 3rd checkpoint (mid-epoch), which is then damaged: the rerun falls
    # back to the 2nd.
    (1, 3, 0, True),
    # During the 2nd epoch's evaluation: the steps after the last save are redone.
    (3, 0, 2, False),
])
def test_sigkill_and_rerun_gives_the_uninterrupted_result(
    uninterrupted, tmp_path, caplog, every, kill_after_saves, kill_at_eval, corrupt):
  killed = run(tmp_path, every, kill_after_saves, kill_at_eval)
  assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
  assert not os.path.exists(tmp_path / 'genotype.json')
  assert os.listdir(tmp_path / 'search_checkpoints')
  if corrupt:
    damaged, previous = damage_newest_checkpoint(tmp_path / 'search_checkpoints')
  # The rerun in this process: the stage `uninterrupted` built serves it (`parallel.reused`).
  with caplog.at_level(stdlib_logging.INFO):
    search.search(tiny_config(every), str(tmp_path))
  if corrupt:
    assert f'Checkpoint {damaged} in' in caplog.text
    assert 'trying an older one' in caplog.text
    assert f'Resuming the search from checkpoint {previous}' in caplog.text
  else:
    assert 'Resuming the search from checkpoint' in caplog.text
  assert_same(result(tmp_path), uninterrupted)


def tiny_config(every):
  config = importlib.import_module('configs.pc_darts').get_config('tiny')
  config.checkpoint.every_steps = every
  return config


def test_ctrl_c_saves_stops_refuses_a_changed_config_and_resumes(uninterrupted, tmp_path,
                                                                 monkeypatch, caplog):
  def interrupt(state):
    os.kill(os.getpid(), signal.SIGINT)  # handled after this chunk of steps
    return state
  on_chunk(monkeypatch, 6, interrupt)  # epoch 2, step 2 (chunks of one step)
  handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
  with pytest.raises(loop.Interrupted, match='SIGINT.*Rerun the same command'):
    search.search(tiny_config(1), str(tmp_path))
  assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers
  meta = checkpoint.Checkpointer(str(tmp_path / 'search_checkpoints')).restore_metadata(6)
  assert (meta['epoch'], meta['step']) == (1, 2)
  end_on_chunk(monkeypatch)
  # Epoch 1's rows, written before its checkpoint, cut short afterwards (a copy, a full disk):
  # the resumed search writes them again from the checkpoint that holds them.
  for name in ('search_metrics.jsonl', 'arch_history.jsonl'):
    text = (tmp_path / name).read_text()
    (tmp_path / name).write_text(text[:len(text) // 2])

  changed = tiny_config(1)
  changed.search.optim.weights.lr = 0.5
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=r'search\.optim\.weights\.lr: 0\.1 -> 0\.5'):
    search.search(changed, str(tmp_path))
  search.search(tiny_config(1), str(tmp_path))
  assert 'search_metrics.jsonl lacked the row of step 4' in caplog.text
  assert_same(result(tmp_path), uninterrupted)
  # A rerun of the finished search says so and changes nothing.
  files = {name: os.stat(tmp_path / name).st_mtime_ns
           for name in ('genotype.json', 'search_summary.json', 'search_metrics.jsonl',
                        'arch.npz')}
  again = search.search(tiny_config(1), str(tmp_path))
  assert genotypes.to_dict(again) == uninterrupted[0]
  assert files == {name: os.stat(tmp_path / name).st_mtime_ns for name in files}


@pytest.mark.slow
def test_a_full_disk_in_a_save_stops_naming_the_checkpoint_and_keeps_the_earlier_ones(
    tmp_path, monkeypatch):
  save, calls = ocp.CheckpointManager.save, []

  def full_at_the_third(self, step, *args, **kwargs):
    calls.append(step)
    if len(calls) == 3:  # as Orbax reports TensorStore's failed write, its folder half made
      os.makedirs(os.path.join(str(self.directory), f'{step}.orbax-checkpoint-tmp', 'state'))
      raise ValueError(f'RESOURCE_EXHAUSTED: Failed writing: "{self.directory}/{step}": Failed '
                       "to write 7563 bytes to file 13: No space left on device "
                       "[os_error_code='28']")
    return save(self, step, *args, **kwargs)
  monkeypatch.setattr(ocp.CheckpointManager, 'save', full_at_the_third)
  with pytest.raises(runs.DiskFull) as stopped:
    search.search(tiny_config(1), str(tmp_path))
  monkeypatch.undo()
  folder = tmp_path / 'search_checkpoints'
  assert stopped.value.filename == str(folder / '3')
  assert main.user_message(stopped.value, str(tmp_path)) == (
      f'{folder}/3: the disk is full (No space left on device). Free space on it and rerun '
      'the same command to resume (the checkpoints saved are intact).')
  assert sorted(os.listdir(folder)) == ['1', '2']  # the half-written step is gone
  # (The rerun's result: test_a_full_disk_on_the_command_line_is_one_line_and_the_rerun_resumes.)


CLI_RUNNER = r'''
import os, signal, sys
from absl import app
from pcp_jax import checkpoint, main
save, count = checkpoint.Checkpointer.save, [0]
def save_then_sigterm(self, *args, **kwargs):
  save(self, *args, **kwargs)
  count[0] += 1
  if count[0] == 2:  # as SLURM's time limit or a preemption would, mid-epoch
    os.kill(os.getpid(), signal.SIGTERM)
checkpoint.Checkpointer.save = save_then_sigterm
root, workdir = sys.argv[1:3]
sys.argv = ['pcp_jax.main', f'--config={root}/configs/pc_darts.py:tiny', f'--workdir={workdir}',
            '--config.checkpoint.every_steps=1']
app.run(main.main, flags_parser=main.parse_flags)
'''


@pytest.mark.slow
def test_sigterm_on_the_command_line_saves_exits_143_and_resumes(uninterrupted, tmp_path):
  # The stop on the command line; the rerun in this process, on the stage `uninterrupted`
  # built (`parallel.reused`).
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  stopped = subprocess.run([sys.executable, '-c', CLI_RUNNER, root, str(tmp_path)],
                           env=subprocess_env(), capture_output=True, text=True,
                           timeout=TIMEOUT)
  assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
  assert 'The search stopped on SIGTERM; saved in' in stopped.stderr
  assert 'Traceback' not in stopped.stderr
  assert 'checkpoint_manager.py' not in stopped.stderr  # Orbax's INFO lines: only with -v
  # The signal came while the 2nd checkpoint was saved: that checkpoint holds everything
  # run so far, so the search stops right after it.
  ckpt = checkpoint.Checkpointer(str(tmp_path / 'search_checkpoints'))
  assert ckpt.latest_step() == 2 and ckpt.restore_metadata(2)['step'] == 2
  search.search(tiny_config(1), str(tmp_path))
  assert_same(result(tmp_path), uninterrupted)


CLI_FULL_DISK_RUNNER = r'''
import builtins, sys
from absl import app
from pcp_jax import main, runs

class FullDisk:
  # A file on a disk that fills during the first write: half of it lands, then ENOSPC.
  def __init__(self, f):
    self.f = f
  def write(self, text):
    self.f.write(text[:len(text) // 2])
    self.f.flush()
    raise OSError(28, 'No space left on device')
  def __enter__(self):
    return self
  def __exit__(self, *exc):
    self.f.close()

def open_on_a_full_disk(path, mode='r', *args, **kwargs):
  f = builtins.open(path, mode, *args, **kwargs)
  return FullDisk(f) if str(path).endswith('search_metrics.jsonl') and 'a' in mode else f
runs.open = open_on_a_full_disk  # the rows files' writes, as Rows.append makes them
root, workdir = sys.argv[1:3]
sys.argv = ['pcp_jax.main', f'--config={root}/configs/pc_darts.py:tiny', f'--workdir={workdir}',
            '--config.checkpoint.every_steps=1']
app.run(main.main, flags_parser=main.parse_flags)
'''


@pytest.mark.slow
def test_a_full_disk_on_the_command_line_is_one_line_and_the_rerun_resumes(uninterrupted,
                                                                         tmp_path, caplog):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  stopped = subprocess.run([sys.executable, '-c', CLI_FULL_DISK_RUNNER, root, str(tmp_path)],
                           env=subprocess_env(), capture_output=True, text=True,
                           timeout=TIMEOUT)
  assert stopped.returncode == 1, stopped.stderr[-3000:]
  assert 'Traceback' not in stopped.stderr
  assert stopped.stderr.strip().splitlines()[-1].endswith(
      f'{tmp_path}/search_metrics.jsonl: the disk is full (No space left on device). Free '
      'space on it and rerun the same command to resume (the checkpoints saved are intact).')
  with caplog.at_level(stdlib_logging.WARNING):  # the rerun in this process
    search.search(tiny_config(1), str(tmp_path))
  assert 'search_metrics.jsonl: line 1 is cut short' in caplog.text
  assert_same(result(tmp_path), uninterrupted)
