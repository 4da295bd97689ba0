"""The up-front memory check (pcp_jax/memory.py): a step that cannot fit is refused in one line
naming the fields that drive it, before anything is created, loaded or compiled; one that fits
is logged with its estimate."""

import importlib
import os

import pytest

from pcp_jax import main
from pcp_jax import memory

GIB = 2**30


def _config(name, arg='tiny'):
  return importlib.import_module(f'configs.{name}').get_config(arg)


@pytest.fixture
def host_of(monkeypatch):
  """Sets the memory `memory.check` finds available (a host of that many GiB)."""
  def set_available(gib):
    monkeypatch.setattr(memory, 'available_bytes', lambda: (int(gib * GIB), 'host memory'))
  return set_available


@pytest.mark.parametrize('name, field, value, named', [
    ('pcp', 'search.channels', 2048, 'search.channels'),
    ('pcp', 'search.stages[0].layers', 1000, r'search.stages\[0\].layers'),
    ('ss_pcp', 'search.batch_size', 4096, 'search.batch_size'),
    ('pc_darts', 'search.curvature_batch', 1024, 'search.curvature_batch'),
    ('train_cifar10', 'train.channels', 4096, 'train.channels'),
    ('train_cifar10', 'train.layers', 2000, 'train.layers'),
])
def test_a_step_that_cannot_fit_is_refused_before_anything_is_made(
    tmp_path, host_of, name, field, value, named):
  host_of(24)
  config = _config(name, None)  # the paper's sizes, which fit in 24 GiB, grown by one field
  if field == 'search.curvature_batch':
    config.search.curvature_every = 2
  if field == 'search.stages[0].layers':
    config.search.stages[0].layers = value
  else:
    section, leaf = field.rsplit('.', 1)
    config[section.split('.')[0]][leaf] = value
  with pytest.raises(ValueError, match=rf'needs about .*iB, more than 1.25x the 24 GiB of host '
                                       rf'memory available: lower .*{named}.*memory_check=False'):
    main.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')
  config.memory_check = False  # the override named in the message lets it through the check
  assert memory.check(config, main.check(config)) == []


def test_the_papers_configs_fit_a_24_gib_host_and_their_estimates_are_logged(host_of, caplog):
  host_of(24)
  caplog.set_level('INFO')
  for name in ('pc_darts', 'pcp', 'ss_pcp', 'p_darts', 'train_cifar10'):
    config = _config(name, None)
    assert memory.check(config, main.check(config))
  assert 'Memory the steps will need (an estimate): search stage 1 ' in caplog.text
  assert 'GiB of host memory available' in caplog.text


def test_a_step_that_may_not_fit_is_warned_about_not_refused(host_of, caplog):
  config = _config('ss_pcp', None)  # its third stage needs about 24 GiB
  host_of(20)
  memory.check(config, ['search'])
  assert 'search.stages[2]' in caplog.text and 'may not fit' in caplog.text


def test_the_estimate_grows_with_what_a_step_keeps():
  config = _config('pc_darts', None)
  config.data.max_train = 256  # the data's share (under 1e-3 of the step's) aside
  base = memory.search_needs(config)[0].bytes
  config.search.batch_size *= 2
  assert memory.search_needs(config)[0].bytes == pytest.approx(2 * base, rel=1e-3)
  config.search.batch_size //= 2
  config.search.ss_factor = 0.5  # the CE batch and two Barlow Twins views
  assert memory.search_needs(config)[0].bytes == pytest.approx(3 * base, rel=1e-3)
  config.search.ss_factor, config.search.partial_k = 0.0, 1  # every channel through the ops
  assert memory.search_needs(config)[0].bytes > 3 * base
  config.search.partial_k = 4
  config.search.curvature_every = 2
  meter = memory.search_needs(config)[1]
  assert meter.name == 'collapse meter, stage 1' and meter.bytes > base


def test_cell_volumes_follow_the_reductions():
  # 5 cells, reductions at 1 and 3: 32 px x 8 ch, 16 x 16 (x2), 8 x 32 (x2).
  assert memory.cell_volumes(5, 8, 32) == 32 * 32 * 8 + 2 * 16 * 16 * 16 + 2 * 8 * 8 * 32
  assert memory.cell_volumes(3, 4, 28) == 28 * 28 * 4 + 14 * 14 * 8 + 7 * 7 * 16


def test_the_host_memory_is_read():
  available, where = memory.available_bytes()
  assert where == 'host memory' and available > 0
