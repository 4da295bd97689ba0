"""Tests of pcp_jax.monitor: log.txt, config.json, environment.json, TensorBoard, progress."""

import json
import logging as py_logging
import os

from absl import logging
import jax
import ml_collections
import numpy as np
import pytest

from pcp_jax import genotypes
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


def test_scalars_read_back(tmp_path):
  with monitor.Scalars(str(tmp_path), 'search') as writer:
    for step in (10, 20, 30):
      writer.write(step, {'train_loss': 1.0 / step, 'best': step == 20, 'lr': np.float32(0.5),
                          'stage': 1, 'genotype': 'text', 'nested': {'x': 1.0},
                          'list': [1.0, 2.0], 'zero_d': np.array(2.5)}, prefix='search/')
  scalars = monitor.read_scalars(os.path.join(tmp_path, 'tensorboard', 'search'))
  assert set(scalars) == {'search/train_loss', 'search/best', 'search/lr', 'search/stage',
                          'search/zero_d'}
  assert [s for s, _ in scalars['search/train_loss']] == [10, 20, 30]
  np.testing.assert_allclose([v for _, v in scalars['search/train_loss']],
                             [0.1, 0.05, 1 / 30], rtol=1e-6)
  assert scalars['search/best'] == [(10, 0.0), (20, 1.0), (30, 0.0)]
  assert scalars['search/lr'] == [(10, 0.5), (20, 0.5), (30, 0.5)]


def test_purge_step_drops_replayed_steps(tmp_path):
  logdir = os.path.join(tmp_path, 'tensorboard', 'train')
  with monitor.Scalars(str(tmp_path), 'train') as writer:
    for step in range(1, 7):
      writer.write(step, {'loss': float(step), 'acc': 0.1 * step})
  # The checkpoint was at step 4: the resumed session redoes steps 5.. with new values.
  with monitor.Scalars(str(tmp_path), 'train', purge_step=5) as writer:
    for step in range(5, 9):
      writer.write(step, {'loss': 100.0 + step})
  scalars = monitor.read_scalars(logdir)
  assert len([f for f in os.listdir(logdir) if 'tfevents' in f]) == 2
  assert scalars['loss'] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                             (5, 105.0), (6, 106.0), (7, 107.0), (8, 108.0)]
  # A tag the resumed session does not write again is cut at the purge step too.
  assert [s for s, _ in scalars['acc']] == [1, 2, 3, 4]


def test_arch_weights_written(tmp_path):
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(genotypes.NUM_EDGES, genotypes.NUM_OPS))
  switches = np.ones_like(probs, bool)
  switches[:, 0] = False  # 'none' is off: skipped
  probs[~switches] = 0
  probs /= probs.sum(axis=1, keepdims=True)
  betas = rng.uniform(size=genotypes.NUM_EDGES)
  row = {'primitives': list(genotypes.OPS),
         'alphas_normal': probs.tolist(), 'switches_normal': switches.tolist(),
         'betas_normal': betas.tolist(),
         'alphas_reduce': probs.tolist(), 'switches_reduce': switches.tolist(),
         'betas_reduce': np.ones(genotypes.NUM_EDGES).tolist()}  # all ones: no betas
  with monitor.Scalars(str(tmp_path), 'search') as writer:
    writer.write_arch(7, row)
    writer.write_arch(8, row)
  scalars = monitor.read_scalars(os.path.join(tmp_path, 'tensorboard', 'search'))
  op = genotypes.PRIMITIVES[3]
  assert [s for s, _ in scalars[f'arch/normal/edge03/{op}']] == [7, 8]
  np.testing.assert_allclose(scalars[f'arch/normal/edge03/{op}'][0][1], probs[3, 3], rtol=1e-6)
  np.testing.assert_allclose(scalars['arch/normal/edge13/edge_weight'][0][1], betas[13],
                             rtol=1e-6)
  assert f'arch/normal/edge00/{genotypes.PRIMITIVES[0]}' not in scalars
  assert 'arch/reduce/edge00/edge_weight' not in scalars
  per_cell = (genotypes.NUM_OPS - 1) * genotypes.NUM_EDGES
  assert len(scalars) == 2 * per_cell + genotypes.NUM_EDGES


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
