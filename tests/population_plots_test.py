"""Pictures of a population's folder (pcp_jax/population_plots.py) on a synthetic population
in the files' formats: members with different ops after stage 1, two ss_factor groups. A real
tiny population's folder: population_test's float64 test."""

import importlib
import json
import os

import numpy as np
import pytest
from PIL import Image

from plots_test import synthetic_search
from pcp_jax import genotypes
from pcp_jax import main
from pcp_jax import memory
from pcp_jax import plots
from pcp_jax import population
from pcp_jax import population_plots
from pcp_jax import runs
from pcp_jax import union

SS_FACTORS = (0.5, 0.5, 1.0, 1.0)
GENOTYPES = ('PDARTS', 'PDARTS', 'PC_DARTS_cifar', 'DARTS_V2')
PICTURES = ['population_agreement.png', 'population_curves.png',
            'population_op_weights_normal.png', 'population_op_weights_reduce.png']


def synthetic_population(run_dir, summary=True):
  """Four members (seeds 0, 1 for ss_factors 0.5 and 1.0), three stages of three epochs, each
  dropping its own weakest ops; population.json (when `summary`) and population_metrics.jsonl
  as `population.search_population` writes them; each member's config.json."""
  folders = [os.path.join(runs.MEMBERS_DIR, str(k)) for k in range(len(SS_FACTORS))]
  for k, (folder, factor) in enumerate(zip(folders, SS_FACTORS)):
    synthetic_search(os.path.join(run_dir, folder), epochs=3, warmup=1, betas=False, seed=k)
    runs.write_json(os.path.join(run_dir, folder, runs.CONFIG),
                    {'seed': k % 2, 'search': {'ss_factor': factor}})
  chosen = [genotypes.REFERENCE_GENOTYPES[name] for name in GENOTYPES]
  if summary:
    runs.write_json(os.path.join(run_dir, runs.POPULATION), {
        'size': len(folders), 'search_cost_hours': 0.1,
        'members': [{'member': k, 'seed': k % 2, 'ss_factor': f, 'folder': folder,
                     'genotype': genotypes.to_dict(g)}
                    for k, (f, folder, g) in enumerate(zip(SS_FACTORS, folders, chosen))],
        'agreement': union.agreement(chosen)})
  member_rows = [runs.Rows(os.path.join(run_dir, f, runs.SEARCH_METRICS), write=False).read()
                 for f in folders]
  rows = runs.Rows(os.path.join(run_dir, runs.POPULATION_METRICS))
  for epoch_rows in zip(*member_rows):
    rows.append(population._summary_row(list(epoch_rows)))  # pylint: disable=protected-access
  return run_dir


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  return synthetic_population(str(tmp_path_factory.mktemp('pop')))


@pytest.fixture(scope='module')
def members(run_dir):
  return population_plots.load_members(run_dir)


def test_a_population_folder_gets_its_pictures(run_dir):
  assert plots.main([run_dir]) == 0  # pcp-jax-plots RUN
  out = os.path.join(run_dir, runs.PLOTS_DIR)
  assert sorted(os.listdir(out)) == PICTURES
  for name in PICTURES:
    with Image.open(os.path.join(out, name)) as image:
      assert image.format == 'PNG' and min(image.size) > 400


def test_the_members_and_their_groups(members):
  assert [m.index for m in members] == [0, 1, 2, 3]
  assert [m.ss_factor for m in members] == list(SS_FACTORS)
  assert population_plots.groups(members) == {0.5: [0, 1], 1.0: [2, 3]}
  assert [len(m.metrics) for m in members] == [9] * 4
  # The members' ops differ after stage 1 (each drops its own weakest).
  last = [np.asarray(m.history[-1]['switches_normal']) for m in members]
  assert not all((s == last[0]).all() for s in last[1:])


def test_the_bands_are_the_population_metrics_mean_and_std(run_dir, members):
  """The curves' band over all members equals population_metrics.jsonl's mean and std."""
  summary = runs.Rows(os.path.join(run_dir, runs.POPULATION_METRICS), write=False).read()
  row_lists = [m.metrics for m in members]
  keys = population_plots.epochs(row_lists)
  assert keys == [(s, e) for s in (1, 2, 3) for e in (1, 2, 3)]
  for name in ('train_loss', 'valid_acc', 'arch_ce', 'arch_grad_cosine'):
    mean, std, count = population_plots.band(population_plots.aligned(row_lists, name, keys))
    np.testing.assert_allclose(mean, [r[f'{name}_mean'] for r in summary], rtol=1e-12)
    np.testing.assert_allclose(std, [r[f'{name}_std'] for r in summary], rtol=1e-9,
                               atol=1e-15)
    assert (count == 4).all()


def test_an_architecture_metric_of_a_frozen_epoch_is_no_measurement():
  rows = [[{'stage': 1, 'epoch': 1, 'arch_frozen': True, 'arch_ce': 0.0, 'train_loss': 2.0},
           {'stage': 1, 'epoch': 2, 'arch_frozen': False, 'arch_ce': 1.5}],
          [{'stage': 1, 'epoch': 2, 'arch_frozen': False, 'arch_ce': 2.5}]]
  keys = population_plots.epochs(rows)
  values = population_plots.aligned(rows, 'arch_ce', keys)
  np.testing.assert_array_equal(values, [[np.nan, 1.5], [np.nan, 2.5]])
  mean, std, count = population_plots.band(values)
  np.testing.assert_array_equal(count, [0, 2])
  assert np.isnan(mean[0]) and np.isnan(std[0])
  assert mean[1] == 2.0 and std[1] == 0.5


def test_op_weight_bands_are_over_the_members_that_have_the_op(members):
  row_lists = [m.history for m in members]
  keys = population_plots.epochs(row_lists)
  weights = population_plots.op_weights(row_lists, 'reduce', keys)
  assert weights.shape == (4, 9, genotypes.NUM_EDGES, genotypes.NUM_OPS)
  mean, std, count = population_plots.band(weights)
  # From the raw rows: the last epoch's weights of each op on, member by member.
  raw = [(np.asarray(m.history[-1]['alphas_reduce']), np.asarray(m.history[-1]
                                                                  ['switches_reduce']))
         for m in members]
  mixed = 0
  for edge in range(genotypes.NUM_EDGES):
    for op in range(len(genotypes.PRIMITIVES)):
      have = [a[edge, op] for a, on in raw if on[edge, op]]
      assert count[-1, edge, op] == len(have)
      if have:
        np.testing.assert_allclose(mean[-1, edge, op], np.mean(have), rtol=1e-12)
        np.testing.assert_allclose(std[-1, edge, op], np.std(have), rtol=1e-9, atol=1e-15)
      else:
        assert np.isnan(mean[-1, edge, op])
      mixed += 0 < len(have) < 4
  assert mixed > 0  # some ops are on in some members only
  # The first stage keeps every op of the DARTS space in every member; noise never.
  assert (count[0, :, :len(genotypes.PRIMITIVES)] == 4).all() and (count[..., -1] == 0).all()


def test_op_weights_figure_names_each_edge_and_the_op_most_members_chose(members):
  fig = population_plots.op_weights_figure(members, 'normal')
  assert len(fig.axes) == genotypes.NUM_EDGES
  counts = population_plots.choice_counts([m.genotype for m in members], 'normal')
  for edge, ax in enumerate(fig.axes):
    name = genotypes.edge_name(edge)
    if counts[edge].any():
      op = genotypes.OPS[int(np.argmax(counts[edge]))]
      assert ax.get_title() == f'{name}: {op} {counts[edge].max()}/4'
    else:
      assert ax.get_title() == name
  # Two ss_factor groups: a line style each.
  styles = {line.get_linestyle() for line in fig.axes[0].get_lines()
            if line.get_xdata()[0] != line.get_xdata()[-1]}  # not the stage boundaries
  assert styles == {'-', '--'}


def test_agreement_counts_match_population_json(run_dir, members):
  """The edge x op counts equal population.json's agreement (per node and slot)."""
  summary = runs.load_json(os.path.join(run_dir, runs.POPULATION))
  inputs = {genotypes.state_name(i): i for i in range(genotypes.STEPS + 1)}
  for cell in genotypes.CELLS:
    counts = population_plots.choice_counts([m.genotype for m in members], cell)
    want = np.zeros_like(counts)
    for row in summary['agreement'][cell]:
      for choice, n in row['choices'].items():
        op, source = choice.split(' <- ')
        edge = genotypes.EDGES.index((inputs[source], row['node'] - 2))
        want[edge, genotypes.OPS.index(op)] += n
    np.testing.assert_array_equal(counts, want)
    assert counts.sum() == 4 * 2 * genotypes.STEPS
  fig = population_plots.agreement_figure(members)
  maps = [ax.get_images()[0].get_array() for ax in fig.axes if ax.get_images()]
  assert len(maps) == 6  # all members, then each ss_factor group; two cells each
  assert [int(m.sum()) for m in maps] == [32, 32, 16, 16, 16, 16]


def test_a_running_population_is_drawn_from_its_member_folders(tmp_path):
  """Before population.json: the members from their folders and config.json; no agreement."""
  run_dir = synthetic_population(str(tmp_path), summary=False)
  members = population_plots.load_members(run_dir)
  assert [m.ss_factor for m in members] == list(SS_FACTORS)
  assert all(m.genotype is None for m in members)
  assert sorted(name for name, _ in population_plots.figures(run_dir)) == PICTURES[1:]


def test_a_population_command_draws_the_members_and_then_the_population(tmp_path,
                                                                        monkeypatch):
  """`pcp-jax` on a population draws each member's folder, then RUN's (the overlays)."""
  config = importlib.import_module('configs.pcp').get_config('seeds=2,tiny')
  drawn = []
  monkeypatch.setattr(main, 'MODES', dict(main.MODES, search=lambda c, w: None))
  monkeypatch.setattr(memory, 'check', lambda *args: None)
  monkeypatch.setattr(plots, 'plot_run', lambda folder: drawn.append(folder) or [
      os.path.join(folder, runs.PLOTS_DIR, 'x.png')])
  main.run(config, str(tmp_path))
  assert drawn == [os.path.join(str(tmp_path), runs.MEMBERS_DIR, '0'),
                   os.path.join(str(tmp_path), runs.MEMBERS_DIR, '1'), str(tmp_path)]
  drawn.clear()
  main.run(importlib.import_module('configs.pcp').get_config('tiny'), str(tmp_path / 'solo'))
  assert drawn == [str(tmp_path / 'solo')]


def test_a_folder_with_nothing_to_plot_is_one_line(tmp_path, capsys):
  assert plots.main([str(tmp_path)]) == 1
  assert 'nothing to plot' in capsys.readouterr().err
  os.makedirs(tmp_path / runs.MEMBERS_DIR)
  assert plots.main([str(tmp_path)]) == 1
  assert 'without members' in capsys.readouterr().err
  with open(tmp_path / runs.POPULATION, 'w') as f:
    json.dump({'members': [{'member': 0}]}, f)
  assert plots.main([str(tmp_path)]) == 1
  assert "population.json: member 0 lacks 'folder'" in capsys.readouterr().err
