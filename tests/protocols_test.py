"""Tests of Table II's protocols (all searches; best of N searches, trained k times), the
random-cell baseline row with its relative improvement, and runs trained over seeds."""

import csv
import json

import numpy as np
import pytest

from pcp_jax import reports


def write_search(folder, method='SS PCP-DARTS', ssf=0.5):
  folder.mkdir(parents=True)
  (folder / 'search_summary.json').write_text(json.dumps({
      'method': method, 'dataset': 'cifar10', 'ss_factor': ssf, 'bt_scale': 'none',
      'search_cost_hours': 4.8, 'device_count': 1, 'platform': 'gpu'}))
  return folder


def write_run(folder, source, test, valid=None, method='SS PCP-DARTS', val_split='0.1',
              epoch=3, **results):
  """A trained run: results.json, and train_metrics.jsonl whose row of the tested epoch has
  validation accuracy `valid` (the other epochs a higher one, which must not count)."""
  folder.mkdir(parents=True)
  record = dict(method=method, test_accuracy=test, params=3_000_000, dataset='cifar10',
                genotype_source=str(source), checkpoint='best', checkpoint_epoch=epoch,
                val_split=val_split)
  (folder / 'results.json').write_text(json.dumps(dict(record, **results)))
  if valid is not None:
    rows = [{'epoch': e, 'step': 10 * e, 'valid_acc': valid if e == epoch else 0.999}
            for e in range(1, epoch + 2)]
    (folder / 'train_metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rows))
  return str(folder)


# Three searches of one population, each trained twice: (test, validation) accuracies. Search
# 2 tests best, search 1 validates best: the paper's protocol must pick search 1.
POPULATION = {0: [(0.950, 0.900), (0.952, 0.904)],
              1: [(0.940, 0.930), (0.946, 0.926)],
              2: [(0.970, 0.910), (0.968, 0.912)]}


def population_runs(tmp_path, val_split='0.1'):
  run_dirs = []
  for member, trained in POPULATION.items():
    search = write_search(tmp_path / 'pop' / 'members' / str(member))
    for seed, (test, valid) in enumerate(trained):
      run_dirs.append(write_run(tmp_path / f'train_m{member}_s{seed}', search, test, valid,
                                val_split=val_split))
  return run_dirs


def _error(accuracies):
  errors = [100 * (1 - a) for a in accuracies]
  return f'{np.mean(errors):.2f} ± {np.std(errors, ddof=1):.2f}'


def test_best_of_n_selects_on_validation_not_test(tmp_path):
  table = reports.build_table(population_runs(tmp_path))
  assert table.columns[:5] == ['Method', 'Test error, all searches (%)',
                               'Test error, best of N searches (%)', 'Searches (N)',
                               'Runs of the best (k)']
  (row,) = table.rows
  every = [test for trained in POPULATION.values() for test, _ in trained]
  assert row['Test error, all searches (%)'] == _error(every)
  # Search 1: validation 0.930, 0.926 (the best mean); test errors 6.0 and 5.4.
  assert row['Test error, best of N searches (%)'] == _error([0.940, 0.946]) == '5.70 ± 0.42'
  assert (row['Searches (N)'], row['Runs of the best (k)'], row['n']) == ('3', '2', '6')
  assert any('best mean validation accuracy' in note for note in table.notes)
  assert not any('validate on the test set' in note for note in table.notes)


def test_a_selection_that_saw_the_test_set_says_so(tmp_path):
  table = reports.build_table(population_runs(tmp_path, val_split='test'))
  assert table.rows[0]['Test error, best of N searches (%)'] == '5.70 ± 0.42'
  assert any('validate on the test set' in note for note in table.notes)


def test_runs_without_validation_rows_leave_the_table_as_it_was(tmp_path):
  search = write_search(tmp_path / 's0')
  other = write_search(tmp_path / 's1')
  run_dirs = [write_run(tmp_path / 't0', search, 0.95), write_run(tmp_path / 't1', other, 0.96)]
  columns, (row,) = reports.paper_table(run_dirs)
  assert columns[:2] == ['Method', 'Test error (%)'] and 'Searches (N)' not in columns
  assert row['Test error (%)'] == _error([0.95, 0.96])


def random_runs(tmp_path):
  """Random cells 0 and 1 trained twice, cell 2 once."""
  accuracies = {0: [0.90, 0.92], 1: [0.88, 0.86], 2: [0.91]}
  run_dirs = [write_run(tmp_path / f'random{cell}_s{seed}', f'random:{cell}', test, 0.9,
                        method='random cell')
              for cell, tests in accuracies.items() for seed, test in enumerate(tests)]
  return run_dirs, [a for tests in accuracies.values() for a in tests]


def test_random_cells_are_one_row_and_methods_gain_their_relative_improvement(tmp_path):
  run_dirs, accuracies = random_runs(tmp_path)
  table = reports.build_table(population_runs(tmp_path) + run_dirs)
  assert table.columns[5:7] == ['RI over random, all searches (%)',
                                'RI over random, best of N (%)']
  method, random = table.rows
  assert random['Method'] == 'Random cells (3 cells)' and random['n'] == '5'
  assert random['Search method'] == 'random sampling'
  assert random['Test error, all searches (%)'] == _error(accuracies)
  assert random['RI over random, all searches (%)'] == '-'
  # Best of 3 random cells by validation (all 0.9: the first, cell 0).
  assert random['Test error, best of N searches (%)'] == _error([0.90, 0.92])
  assert (random['Searches (N)'], random['Runs of the best (k)']) == ('3', '2')
  random_mean = np.mean(accuracies)  # 0.894
  every = [test for trained in POPULATION.values() for test, _ in trained]
  ri_all = 100 * (np.mean(every) - random_mean) / random_mean
  ri_best = 100 * (np.mean([0.940, 0.946]) - random_mean) / random_mean
  assert method['RI over random, all searches (%)'] == f'{ri_all:+.2f}' == '+6.75'
  assert method['RI over random, best of N (%)'] == f'{ri_best:+.2f}' == '+5.48'


def test_random_cells_alone_and_on_another_dataset(tmp_path):
  run_dirs, accuracies = random_runs(tmp_path)
  columns, rows = reports.paper_table(run_dirs[:2])  # one cell: no searches to choose from
  assert columns[:3] == ['Method', 'Test error (%)', 'RI over random, all searches (%)']
  assert rows[0]['Method'] == 'Random cells (1 cells)'
  # A method on a dataset without random cells has no RI.
  other = write_run(tmp_path / 'c100', 'PDARTS', 0.8, method='P-DARTS cell',
                    dataset='cifar100')
  _, rows = reports.paper_table(run_dirs + [other])
  assert [(r['Method'], r['RI over random, all searches (%)']) for r in rows] == [
      ('P-DARTS cell', '-'), ('Random cells (3 cells)', '-')]


def write_seeds(tmp_path, name, source, accuracies, valid):
  run = tmp_path / name
  seed_dirs = [write_run(run / 'seeds' / str(k), source, a, valid)
               for k, a in enumerate(accuracies)]
  (run / 'results.json').write_text(json.dumps({
      'seed_runs': [f'seeds/{k}' for k in range(len(accuracies))],
      'test_accuracy': float(np.mean(accuracies)), 'params': 1, 'dataset': 'cifar10'}))
  return str(run), seed_dirs


def test_a_run_trained_over_seeds_is_its_seed_runs(tmp_path):
  first = write_search(tmp_path / 'pop' / 'members' / '0')
  second = write_search(tmp_path / 'pop' / 'members' / '1')
  run_a, _ = write_seeds(tmp_path, 'train_a', first, [0.95, 0.93, 0.94], valid=0.80)
  run_b, seeds_b = write_seeds(tmp_path, 'train_b', second, [0.90, 0.92], valid=0.85)
  table = reports.build_table([run_a, run_b])
  (row,) = table.rows
  assert row['n'] == '5'
  assert row['Test error, all searches (%)'] == _error([0.95, 0.93, 0.94, 0.90, 0.92])
  assert row['Test error, best of N searches (%)'] == _error([0.90, 0.92])
  assert (row['Searches (N)'], row['Runs of the best (k)']) == ('2', '2')
  # A seed folder given beside its run is the same run twice.
  with pytest.raises(ValueError, match='again; give each run once'):
    reports.build_table([run_b, seeds_b[0]])


@pytest.mark.parametrize('seed_runs, message', [
    ('seeds/0', 'seed_runs must be a non-empty list'),
    ([], 'seed_runs must be a non-empty list'),
    (['seeds/0', 'seeds/7'], "lists the seed run 'seeds/7', but .*seeds/7 is not a folder"),
])
def test_a_bad_seed_list_is_named_in_one_line(tmp_path, seed_runs, message):
  run, _ = write_seeds(tmp_path, 'train', write_search(tmp_path / 's'), [0.9], valid=0.8)
  results = json.loads((tmp_path / 'train' / 'results.json').read_text())
  (tmp_path / 'train' / 'results.json').write_text(json.dumps(dict(results,
                                                                   seed_runs=seed_runs)))
  with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
    reports.build_table([run])
  assert str(tmp_path / 'train' / 'results.json') in str(error.value)
  assert '\n' not in str(error.value)


def test_write_paper_table_with_both_protocols_and_the_random_row(tmp_path):
  run_dirs, _ = random_runs(tmp_path)
  md, csv_path = reports.write_paper_table(population_runs(tmp_path) + run_dirs,
                                           str(tmp_path / 'out'), published=True)
  text = open(md, encoding='utf-8').read()
  lines = text.splitlines()
  assert lines[0].startswith('| Method | Test error, all searches (%) | Test error, best of N '
                             'searches (%) | Searches (N) | Runs of the best (k) | RI over')
  assert lines[2].startswith('| SS PCP-DARTS (ssf 0.5) | 4.57 ± 1.21 | 5.70 ± 0.42 | 3 | 2 '
                             '| +6.75 | +5.48 |')
  assert lines[3].startswith('| Random cells (3 cells) | 10.60 ± 2.41 | 9.00 ± 1.41 | 3 | 2 '
                             '| - | - |')
  # The published rows' errors are their papers' own protocol, under the first error column.
  assert '| PC-DARTS, published | 2.57 | - | - | - | - | - |' in text
  assert 'Yang et al., ICLR 2020' in text and 'best mean validation accuracy' in text
  with open(csv_path, newline='', encoding='utf-8') as f:
    records = list(csv.DictReader(f))
  assert records[1]['Method'] == 'Random cells (3 cells)'
  assert records[1]['Runs of the best (k)'] == '2'
