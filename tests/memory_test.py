"""The up-front memory check (pcp_jax/memory.py): a step that cannot fit is refused in one line
naming the fields that drive it, before anything is created, loaded or compiled; one that fits
is logged with its estimate."""

import importlib
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import data
from pcp_jax import genotypes
from pcp_jax import main
from pcp_jax import memory
from pcp_jax import models
from pcp_jax import networks
from pcp_jax import spaces
from pcp_jax import supernet

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
  with pytest.raises(ValueError, match=rf'needs about .*iB, more than {memory.REFUSE_FACTOR:g}x '
                                       rf'the 24 GiB of host memory available: lower .*{named}'
                                       r'.*memory_check=False'):
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
  config = _config('ss_pcp', None)  # its third stage needs about 25 GiB
  host_of(23)
  memory.check(config, ['search'])
  assert 'search.stages[2]' in caplog.text and 'may not fit' in caplog.text


def test_the_estimate_grows_with_what_a_step_keeps():
  config = _config('pc_darts', None)
  config.data.max_train = 256  # the data's share (under 1e-3 of the step's) aside
  base = memory.search_needs(config)[0].bytes
  held = memory.weight_bytes(memory.search_weights(config, 8, 8), config.search.optim.weights,
                             memory.SEARCH_WEIGHT_COPIES)
  config.search.batch_size *= 2  # the activations double, the weights stay
  assert memory.search_needs(config)[0].bytes == pytest.approx(2 * base - held, rel=1e-3)
  config.search.batch_size //= 2
  config.search.ss_factor = 0.5  # the CE batch and two Barlow Twins views through the cells
  views = memory.search_needs(config)[0].bytes
  assert 2.5 * base < views < 3 * base
  config.search.ss_factor, config.search.partial_k = 0.0, 1  # every channel through the ops
  assert memory.search_needs(config)[0].bytes > 3 * base
  config.search.partial_k = 4
  config.search.curvature_every = 2
  meter = memory.search_needs(config)[1]
  assert meter.name == 'collapse meter, stage 1' and meter.bytes > base


def test_members_one_after_another_hold_one_members_activations():
  config = _config('pc_darts', None)
  config.data.max_train = 256
  solo = memory.search_needs(config)[0].bytes
  held = memory.weight_bytes(memory.search_weights(config, 8, 8), config.search.optim.weights,
                             memory.SEARCH_WEIGHT_COPIES)
  config.search.population.seeds = 4
  config.search.population.members_at_once = 4  # all four vmapped
  together = memory.search_needs(config)[0]
  assert together.bytes == pytest.approx(4 * solo, rel=1e-3)
  assert '4 members (4 at once)' in together.what
  assert 'search.population.members_at_once' in together.fields
  config.search.population.members_at_once = 1  # one after another: their weights only
  assert memory.search_needs(config)[0].bytes == pytest.approx(solo + 3 * held, rel=1e-3)
  config.search.population.members_at_once = 2
  assert memory.search_needs(config)[0].bytes == pytest.approx(2 * solo + 2 * held, rel=1e-3)
  train = _config('train_cifar10', None)
  one = memory.train_need(train).bytes
  train.train.seeds, train.train.seeds_at_once = 3, 3
  assert memory.train_need(train).bytes > 2.5 * one
  train.train.seeds_at_once = 1
  assert one < memory.train_need(train).bytes < 1.5 * one


def test_a_wide_network_of_few_cells_is_refused_for_its_weights(host_of):
  # Issue 31: estimated at 15.2 GiB from its activations alone, it grew past 23 GB on a host
  # with 22 GiB free; its 328 M weights, their gradients and momentum add about 6 GiB.
  host_of(22)
  config = _config('pcp')
  config.search.channels = 2048
  with pytest.raises(ValueError, match=r'search.stages\[0\] .*its step \(.* GiB of activations, '
                                       r'.* GiB for 328 M weights, their gradients and optimiser\)'
                                       r' needs about .*search.channels.*memory_check=False'):
    memory.check(config, main.check(config))  # not main.run: a step that passes would run


def test_the_weights_grow_with_the_square_of_the_channels():
  config = _config('pcp', None)
  config.search.channels = 256  # wide enough for the 1x1 convolutions to dominate
  narrow = memory.search_weights(config, 5, 8)
  config.search.channels *= 4
  assert memory.search_weights(config, 5, 8) == pytest.approx(16 * narrow, rel=0.05)
  sgd = memory.weight_bytes(10**6, config.search.optim.weights, 2)
  assert memory.weight_bytes(10**6, config.search.optim.arch, 2) == sgd + 4 * 10**6  # Adam's


def _variables(model, init, image_shape):
  shapes = jax.eval_shape(lambda k: init(model.clone(bn_axis_name=None), k, image_shape),
                          jax.random.PRNGKey(0))['params']
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(shapes))


@pytest.mark.parametrize('arg, ss, keep', [
    ('tiny', 0, None), ('tiny,space=s1', 0, None), ('tiny,dataset=cifar100', 0.5, None),
    (None, 0, 1), (None, 0, 3)])
def test_the_weights_counted_are_the_networks(arg, ss, keep):
  config = _config('pcp', arg)
  # From 8 channels per op on (32 / K), sep_conv_3x3 outweighs dil_conv_5x5.
  config.search.ss_factor, config.search.channels = ss, 32 if keep else 8
  s = config.search
  info = data.DATASETS[config.data.dataset]
  switches = spaces.initial_switches(s.space, s.initial_ops)
  ops = int(switches['normal'][0].sum())
  if keep:  # a later stage: each edge keeps its `keep` heaviest ops
    heaviest = [genotypes.OPS.index(n) for n in ('sep_conv_5x5', 'sep_conv_3x3', 'dil_conv_5x5')]
    for cell in switches.values():
      cell[:] = False
      cell[:, heaviest[:keep]] = True
    ops = keep
  model = models.search_network(config, 4, switches, info.num_classes)
  expected = _variables(model, supernet.init_variables, (32, 32, info.channels))
  if ss:
    expected += _variables(models.projector(config), lambda m, k, _: m.init(
        k, jnp.zeros((2, s.channels * 16))), None)
  counted = memory.search_weights(config, 4, ops)
  assert counted + (memory.projector_weights(config) if ss else 0) == expected


@pytest.mark.parametrize('genotype', ['PC_DARTS_cifar', 'DARTS_V1'])
def test_the_evaluation_networks_weights_counted_are_its_own(genotype):
  config = _config('train_cifar10')
  config.genotype = genotype
  g = genotypes.get(genotype)
  assert memory.train_weights(config, g) == networks.count_params(
      g, config.train.channels, config.train.layers, auxiliary=True)
  config.train.auxiliary = False
  assert memory.train_weights(config, g) == networks.count_params(
      g, config.train.channels, config.train.layers)
  assert memory.train_weights(config, memory.HEAVIEST_GENOTYPE) > memory.train_weights(config, g)


def test_cell_volumes_follow_the_reductions():
  # 5 cells, reductions at 1 and 3: 32 px x 8 ch, 16 x 16 (x2), 8 x 32 (x2).
  assert memory.cell_volumes(5, 8, 32) == 32 * 32 * 8 + 2 * 16 * 16 * 16 + 2 * 8 * 8 * 32
  assert memory.cell_volumes(3, 4, 28) == 28 * 28 * 4 + 14 * 14 * 8 + 7 * 7 * 16


def test_the_host_memory_is_read():
  available, where = memory.available_bytes()
  assert where == 'host memory' and available > 0
