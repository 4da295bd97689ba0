"""Tests of the random-cell baseline (`--config.genotype=random:I`)."""

import json
import os

import ml_collections
import numpy as np
import pytest

from configs import train_cifar10
from pcp_jax import genotypes
from pcp_jax import main
from pcp_jax import networks
from pcp_jax import random_cells
from pcp_jax import runs
from pcp_jax import spaces
from pcp_jax import train

# Of the first 20 000 cells, the one with the fewest convolutions (two sep_conv_5x5): the
# cheapest to compile for the end-to-end test.
CHEAP_CELL = 5872


def _assert_valid(genotype, allowed=None, max_skip_normal=2):
  """The constraints of a derived genotype, checked independently of the drawing code."""
  allowed = allowed or {c: set(genotypes.PRIMITIVES) - {'none'} for c in genotypes.CELLS}
  genotypes.validate(genotype)
  for cell in genotypes.CELLS:
    edges = getattr(genotype, cell)
    assert getattr(genotype, f'{cell}_concat') == (2, 3, 4, 5)
    for node in range(genotypes.STEPS):
      (op_a, a), (op_b, b) = edges[2 * node: 2 * node + 2]
      assert a != b and 0 <= a < node + 2 and 0 <= b < node + 2, (cell, node, edges)
      for op, source in ((op_a, a), (op_b, b)):
        edge = genotypes.EDGES.index((source, node))
        ops = allowed[cell] if isinstance(allowed[cell], set) else allowed[cell][edge]
        assert op != 'none' and op in ops, (cell, edge, op)
  skips = sum(op == 'skip_connect' for op, _ in genotype.normal)
  assert max_skip_normal is None or skips <= max_skip_normal


def test_the_same_index_is_the_same_cell_and_indices_differ():
  cells = [random_cells.draw(i) for i in range(50)]
  assert [random_cells.draw(i) for i in range(50)] == cells
  assert len({genotypes.to_string(c) for c in cells}) == 50
  # As JSON and as pasted text, a random cell is an ordinary genotype.
  assert genotypes.from_dict(genotypes.to_dict(cells[7])) == cells[7]
  assert genotypes.parse(genotypes.to_string(cells[7])) == cells[7]


def test_every_draw_is_a_valid_cell_of_the_darts_space():
  skips, ops, inputs = [], set(), set()
  for i in range(400):
    genotype = random_cells.draw(i)
    _assert_valid(genotype)
    skips.append(sum(op == 'skip_connect' for op, _ in genotype.normal))
    ops.update(op for op, _ in genotype.normal + genotype.reduce)
    inputs.update((node, genotype.normal[2 * node][1], genotype.normal[2 * node + 1][1])
                  for node in range(genotypes.STEPS))
  # Uniform draws reach every op and every pair of inputs (listed in increasing order), and
  # the skip limit is met, not avoided.
  assert ops == set(genotypes.PRIMITIVES) - {'none'}
  assert inputs == {(node, a, b) for node in range(genotypes.STEPS)
                    for a in range(node + 2) for b in range(a + 1, node + 2)}
  assert max(skips) == 2 and min(skips) == 0


@pytest.mark.parametrize('space', spaces.NAMES)
def test_draws_keep_to_the_ops_of_each_space(space):
  switches = spaces.initial_switches(space, genotypes.PRIMITIVES)
  allowed = {c: [{genotypes.OPS[k] for k in np.flatnonzero(row)} for row in switches[c]]
             for c in genotypes.CELLS}
  for i in range(100):
    _assert_valid(random_cells.draw(i, switches), allowed)


def test_the_train_configs_search_space_decides_else_darts():
  config = train_cifar10.get_config()
  config.genotype = 'random:3'
  assert random_cells.genotype(config) == random_cells.draw(3)
  # A config with a search section draws from its space, under its skip limit.
  config = ml_collections.ConfigDict({'genotype': 'random:3', 'search': {
      'space': 's2', 'initial_ops': genotypes.PRIMITIVES, 'max_skip_normal': -1}})
  genotype = random_cells.genotype(config)
  assert {op for op, _ in genotype.normal + genotype.reduce} <= {'skip_connect', 'sep_conv_3x3'}
  assert genotype == random_cells.draw(3, spaces.initial_switches('s2', ()), None)
  config.search.max_skip_normal = 2
  _assert_valid(random_cells.genotype(config), max_skip_normal=2)
  # Drawn from I alone: the training seed does not change the cell.
  config.seed = 5
  assert random_cells.genotype(config) == random_cells.draw(3, spaces.initial_switches(
      's2', ()))


def test_a_space_without_a_valid_cell_is_refused():
  skip_only = spaces.initial_switches('darts', ('none', 'skip_connect'))
  with pytest.raises(ValueError, match='forces 8 skip-connects into the normal cell'):
    random_cells.draw(0, skip_only)
  none_only = spaces.initial_switches('darts', ('none',))
  with pytest.raises(ValueError, match='fewer than two inputs'):
    random_cells.draw(0, none_only)
  # Without the skip limit, the same space gives all-skip cells.
  genotype = random_cells.draw(0, skip_only, None)
  assert {op for op, _ in genotype.normal + genotype.reduce} == {'skip_connect'}


@pytest.mark.parametrize('source', ['random:', 'random:-1', 'random:x', 'random:1.5'])
def test_bad_forms_are_one_line_naming_the_option(source):
  config = train_cifar10.get_config('tiny')
  config.genotype = source
  with pytest.raises(ValueError) as error:
    main.check(config)
  message = main.user_message(error.value, '/tmp')
  assert message.startswith(f'--config.genotype={source!r}: ') and '\n' not in message
  assert 'random:I' in message


def test_a_random_cell_trains_and_tests_end_to_end(tmp_path):
  config = train_cifar10.get_config('tiny')
  config.genotype = f'random:{CHEAP_CELL}'
  config.modes = 'train,test'
  config.data.max_train = 32
  config.data.max_test = 16
  config.train.epochs = 1
  config.train.eval_batch_size = 16
  workdir = str(tmp_path / 'run')
  main.run(config, workdir)
  genotype = random_cells.draw(CHEAP_CELL)
  with open(os.path.join(workdir, runs.RESULTS)) as f:
    results = json.load(f)
  assert results['genotype_source'] == f'random:{CHEAP_CELL}'
  assert results['method'] == 'random cell' and results['search_cost_days'] is None
  assert results['genotype'] == genotypes.to_dict(genotype)
  assert genotypes.load(os.path.join(workdir, runs.GENOTYPE)) == genotype
  assert results['params'] == networks.count_params(genotype, 4, 3, 10, image_shape=(32, 32, 3))
  assert 0 <= results['test_accuracy'] <= 1
  for cell in genotypes.CELLS:  # the cell diagrams of the run's plots
    assert os.path.getsize(os.path.join(workdir, runs.PLOTS_DIR, f'genotype_{cell}.png')) > 0
  # Another seed trains the same cell in the same workdir's eyes; another cell is refused.
  config.seed = 1
  assert train.load_genotype(config, workdir) == genotype
  config.genotype = f'random:{CHEAP_CELL + 1}'
  with pytest.raises(ValueError, match='another genotype'):
    train.load_genotype(config, workdir)
