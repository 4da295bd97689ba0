"""Tests of pcp_jax.monitor: log.txt, config.json, environment.json, progress lines."""

import json
import logging as py_logging
import os

from absl import logging
import jax
import ml_collections
import pytest

from pcp_jax import monitor


@pytest.fixture(autouse=True)
def _detached_log():
  # The log handler is process-wide; leave none behind for other test files.
  absl_level = logging.get_absl_logger().level
  yield
  monitor.detach_log()
  logging.get_absl_logger().setLevel(absl_level)


def _lines(path):
  with open(path) as f:
    return f.read().splitlines()


def test_log_file_gets_lines_once_and_follows_the_workdir(tmp_path):
  first, second = tmp_path / 'a', tmp_path / 'b'
  monitor.attach_log(str(first))
  monitor.attach_log(str(first))  # again: must not duplicate lines
  logging.info('line one %d', 1)
  logging.warning('line two')
  lines = _lines(first / 'log.txt')
  assert sum('line one 1' in line for line in lines) == 1
  assert sum('WARNING line two' in line for line in lines) == 1
  assert len([h for h in py_logging.getLogger().handlers
              if isinstance(h, monitor._RunLogHandler)]) == 1

  monitor.attach_log(str(second))
  logging.info('line three')
  assert not any('line three' in line for line in _lines(first / 'log.txt'))
  assert sum('line three' in line for line in _lines(second / 'log.txt')) == 1

  # A resumed session appends.
  monitor.attach_log(str(first))
  logging.info('line four')
  lines = _lines(first / 'log.txt')
  assert sum('line one 1' in line for line in lines) == 1
  assert sum('line four' in line for line in lines) == 1


def test_start_run_writes_config_and_environment(tmp_path):
  config = ml_collections.ConfigDict({
      'modes': 'search', 'seed': 3,
      'search': {'lr': 0.025, 'initial_ops': ('none', 'skip_connect'), 'use_betas': True}})
  monitor.start_run(str(tmp_path), config, 'search')
  with open(tmp_path / 'config.json') as f:
    saved = json.load(f)
  assert ml_collections.ConfigDict(saved).to_dict() == ml_collections.ConfigDict(
      {**config.to_dict(), 'search': {**config.search.to_dict(),
                                      'initial_ops': ['none', 'skip_connect']}}).to_dict()
  with open(tmp_path / 'environment.json') as f:
    env = json.load(f)
  assert env['jax'] == jax.__version__
  assert env['device_count'] == jax.device_count()
  assert env['process_count'] == jax.process_count()
  assert env['mode'] == 'search'
  assert set(env) >= {'python', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'platform',
                      'device_kind', 'git_commit', 'hostname', 'argv'}
  assert not os.path.exists(tmp_path / 'config.json.tmp')
  # The environment line went to log.txt too.
  assert any('environment: ' in line and jax.__version__ in line
             for line in _lines(tmp_path / 'log.txt'))

  monitor.write_config(str(tmp_path), {'plain': 1, 'nested': {'x': [1, 2]}}, 'plain.json')
  with open(tmp_path / 'plain.json') as f:
    assert json.load(f) == {'plain': 1, 'nested': {'x': [1, 2]}}


class FakeClock:

  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_progress_line():
  clock = FakeClock()
  # A 3-stage search of 2 epochs x 100 steps each, resumed after 250 steps (stage 2, epoch 1,
  # step 50).
  progress = monitor.Progress(total_steps=600, steps_done=250, label='search', clock=clock)
  progress.compiling('stage 2')
  clock.now += 80.0
  progress.compiled('stage 2', 80.0)
  progress.start_epoch(1, 3, 0, 2, 100, first_step=50)
  clock.now += 10.0
  line = progress.update(70, {'CE': 1.23456, 'acc': 0.456, 'note': 'skipped'})
  assert line == ('search stage 2/3 epoch 1/2 step 70/100 | CE 1.235 acc 0.456 | 2 steps/s'
                  ' | epoch ETA 0:15 | run ETA 2:45')
  assert progress.run_step == 270
  clock.now += 5.0
  line = progress.update(90, {'CE': 1.0})
  # The smoothed rate mixes 2 and 4 steps/s; the ETAs stay finite.
  assert 'step 90/100' in line and '| 4 steps/s |' in line
  rate = progress.steps_per_second
  assert 2 < rate < 4
  assert f'epoch ETA {monitor.format_duration(10 / rate)}' in line
  assert f'run ETA {monitor.format_duration(310 / rate)}' in line

  # Epoch-end work (evaluation, checkpoint) is no step time: the next epoch's first line
  # measures from start_epoch; the 10 unlogged steps of the previous epoch count as done.
  clock.now += 300.0
  progress.start_epoch(1, 3, 1, 2, 100)
  clock.now += 25.0
  line = progress.update(100, {})
  assert line.startswith('search stage 2/3 epoch 2/2 step 100/100 | 4 steps/s | epoch ETA 0:00')
  assert progress.run_step == 400


def test_progress_line_for_training_and_durations():
  clock = FakeClock()
  progress = monitor.Progress(total_steps=10_000_000, clock=clock)
  progress.start_epoch(None, None, 0, 600, 195)
  assert 'steps/s' in progress.update(0, {'loss': 2.0})  # no step yet: rate unknown
  clock.now += 2.0
  line = progress.update(4, {'loss': 2.0})
  assert line.startswith('epoch 1/600 step 4/195 | loss 2 | 2 steps/s | epoch ETA 1:36 |')
  assert line.endswith('run ETA 1388:53:18')
  assert monitor.format_duration(float('nan')) == '?'
  assert monitor.format_duration(59.6) == '1:00'
  assert monitor.format_duration(3600) == '1:00:00'


def test_steps_run_by_the_compiling_call_count_as_done_but_not_in_the_rate():
  clock = FakeClock()
  progress = monitor.Progress(total_steps=100, label='train', clock=clock)
  progress.start_epoch(None, None, 0, 2, 50)
  progress.compiling('training')
  clock.now += 60.0  # compiling, then 10 steps in the same call
  progress.compiled('training', 60.0, step=10)
  assert progress.run_step == 10
  clock.now += 5.0
  line = progress.update(20)
  assert '| 2 steps/s |' in line and 'epoch ETA 0:15' in line and 'run ETA 0:40' in line
  assert progress.run_step == 20


def test_a_log_file_that_cannot_be_written_says_so_once_and_stops(tmp_path, capfd):
  path = monitor.attach_log(str(tmp_path))
  handler = next(h for h in py_logging.getLogger().handlers
                 if isinstance(h, monitor._RunLogHandler))

  tries = []

  def full(_):
    tries.append(1)
    raise OSError(28, 'No space left on device')
  handler.stream.write = full
  for i in range(3):
    logging.warning('line %d', i)
  err = capfd.readouterr().err
  assert err.count(f'{path}: No space left on device; the log continues on the console') == 1
  assert 'Traceback' not in err and 'Logging error' not in err
  assert len(tries) == 1  # the lines after it are not tried again


def test_the_first_compile_line_explains_xlas_slow_compile_block(tmp_path):
  monitor.attach_log(str(tmp_path))
  progress = monitor.Progress(total_steps=10, label='search')
  progress.compiling('stage 1/2')
  progress.compiling('stage 2/2')
  lines = [line for line in _lines(tmp_path / 'log.txt') if 'compiling' in line]
  assert 'Very slow compile?' in lines[0] and 'not an error' in lines[0]
  assert lines[1].endswith('compiling stage 2/2 ...')
