"""Tests of the paper's Table II and the FGSM overlay."""

import csv
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from pcp_jax import genotypes
from pcp_jax import plots
from pcp_jax import reports
from pcp_jax import runs as runs_lib


def write_run(root, folder, **results):
  run_dir = root / folder
  run_dir.mkdir()
  results.setdefault('genotype', genotypes.to_dict(genotypes.REFERENCE_GENOTYPES['PDARTS']))
  (run_dir / 'results.json').write_text(json.dumps(results))
  return str(run_dir)


def fake_runs(tmp_path):
  return [
      write_run(tmp_path, 'ss_pcp_ssf1', method='SS PCP-DARTS (ssf=1)', test_accuracy=0.9672,
                last_test_accuracy=0.9651, params=4_213_456, dataset='cifar10',
                search_cost_days=0.19512),
      write_run(tmp_path, 'PC-DARTS', test_accuracy=0.9743, params=3_634_678,
                dataset='cifar10'),
      write_run(tmp_path, 'pdarts', method='P-DARTS', test_accuracy=0.9729, params=3_433_798,
                dataset='cifar10', search_cost_days=None),
  ]


def test_paper_table_rows_sorted_by_method(tmp_path):
  columns, rows = reports.paper_table(fake_runs(tmp_path))
  # No search folders: the cost is results.json's search_cost_days, of an unknown platform.
  assert columns == ['Method', 'Test error (%)', 'Last-epoch error (%)', 'Params (M)',
                     'Search cost (device-days)', 'Search method', 'n', 'Dataset']
  assert [row['Method'] for row in rows] == ['P-DARTS', 'PC-DARTS', 'SS PCP-DARTS (ssf=1)']
  assert rows[2] == {'Method': 'SS PCP-DARTS (ssf=1)', 'Test error (%)': '3.28',
                     'Last-epoch error (%)': '3.49', 'Params (M)': '4.21',
                     'Search cost (device-days)': '0.195', 'Search method': 'gradient-based',
                     'n': '1', 'Dataset': 'cifar10'}
  assert rows[1]['Test error (%)'] == '2.57' and rows[1]['Params (M)'] == '3.63'
  assert rows[0]['Last-epoch error (%)'] == rows[1]['Last-epoch error (%)'] == '-'
  assert rows[0]['Search cost (device-days)'] == rows[1]['Search cost (device-days)'] == '-'


def test_write_paper_table_markdown_and_csv(tmp_path):
  md_path, csv_path = reports.write_paper_table(fake_runs(tmp_path), str(tmp_path / 'tables'))
  assert md_path == str(tmp_path / 'tables' / 'table2.md')
  assert csv_path == str(tmp_path / 'tables' / 'table2.csv')
  lines = open(md_path, encoding='utf-8').read().splitlines()
  assert lines[0] == ('| Method | Test error (%) | Last-epoch error (%) | Params (M) '
                      '| Search cost (device-days) | Search method | n | Dataset |')
  assert lines[1].count('|') == 9 and set(lines[1]) <= set('|:-')
  assert lines[2:5] == [
      '| P-DARTS | 2.71 | - | 3.43 | - | gradient-based | 1 | cifar10 |',
      '| PC-DARTS | 2.57 | - | 3.63 | - | gradient-based | 1 | cifar10 |',
      '| SS PCP-DARTS (ssf=1) | 3.28 | 3.49 | 4.21 | 0.195 | gradient-based | 1 | cifar10 |',
  ]
  with open(csv_path, newline='', encoding='utf-8') as f:
    records = list(csv.reader(f))
  assert records[0] == lines[0].strip('| ').split(' | ')
  assert records[1:] == [
      ['P-DARTS', '2.71', '-', '3.43', '-', 'gradient-based', '1', 'cifar10'],
      ['PC-DARTS', '2.57', '-', '3.63', '-', 'gradient-based', '1', 'cifar10'],
      ['SS PCP-DARTS (ssf=1)', '3.28', '3.49', '4.21', '0.195', 'gradient-based', '1',
       'cifar10'],
  ]


def test_paper_table_names_the_folder_without_results(tmp_path):
  runs = fake_runs(tmp_path)
  (tmp_path / 'crashed_run').mkdir()
  with pytest.raises(FileNotFoundError, match='crashed_run'):
    reports.paper_table(runs + [str(tmp_path / 'crashed_run')])


@pytest.mark.parametrize('results, message', [
    ({'test_accuracy': 97.2, 'params': 1, 'dataset': 'cifar10'},
     'test_accuracy must be a fraction'),
    ({'test_accuracy': 0.97, 'last_test_accuracy': 96.5, 'params': 1, 'dataset': 'cifar10'},
     'last_test_accuracy must be a fraction'),
    ({'test_accuracy': 0.97}, r"missing the keys \['dataset', 'params'\]"),
    ({'test_accuracy': None, 'params': 1, 'dataset': 'cifar10'},
     'test_accuracy must be a fraction in \\[0, 1\\], got None'),
    ({'test_accuracy': 0.97, 'params': '3.6M', 'dataset': 'cifar10'},
     "params must be a number of parameters, got '3.6M'"),
    ({'test_accuracy': 0.97, 'params': 1, 'dataset': ['cifar10']}, 'dataset must be a name'),
])
def test_paper_table_names_the_file_of_bad_results(tmp_path, results, message):
  run = write_run(tmp_path, 'bad', **results)
  with pytest.raises(ValueError, match=message) as error:
    reports.paper_table([run])
  assert os.path.join(run, 'results.json') in str(error.value)
  assert '\n' not in str(error.value)


def test_paper_table_names_a_results_file_that_is_not_json(tmp_path):
  run = tmp_path / 'truncated'
  run.mkdir()
  (run / 'results.json').write_text('{"test_accuracy": 0.9')
  with pytest.raises(ValueError, match='not valid JSON') as error:
    reports.paper_table([str(run)])
  assert str(run / 'results.json') in str(error.value)
  (run / 'results.json').write_text('["test_accuracy", "params", "dataset"]')
  with pytest.raises(ValueError, match='holds a JSON list, not an object'):
    reports.paper_table([str(run)])


# ---------------------------------------------------------------------------
# python -m pcp_jax.reports: Table II over groups of runs and the FGSM overlay.

def write_search(root, folder, method, ssf, hours=4.8, devices=1, platform='gpu', seed=0,
                 config=None):
  search_dir = root / folder
  search_dir.mkdir()
  (search_dir / 'search_summary.json').write_text(json.dumps({
      'method': method, 'dataset': 'cifar10', 'seed': seed, 'ss_factor': ssf,
      'bt_scale': 'none', 'search_cost_hours': hours, 'search_cost_days': hours / 24,
      'device_count': devices, 'platform': platform, 'device_kind': 'H100'}))
  genotypes.save(genotypes.REFERENCE_GENOTYPES['PDARTS'], str(search_dir / 'genotype.json'))
  if config is not None:
    (search_dir / 'config.json').write_text(json.dumps(config))
  return search_dir


def write_trained(root, folder, search_dir, accuracy, params=3_500_000, top5=None, last=None,
                  **train):
  method = json.loads((search_dir / 'search_summary.json').read_text())['method']
  run = write_run(root, folder, method=method, test_accuracy=accuracy, params=params,
                  dataset='cifar10', genotype_source=str(search_dir / 'genotype.json'),
                  search_cost_days=0.2, last_test_accuracy=last,
                  **({'test_top5_accuracy': top5} if top5 else {}))
  if train:
    (root / folder / 'train_config.json').write_text(json.dumps({'seed': 0, 'train': train}))
  return run


def grouped_runs(tmp_path):
  runs = []
  for seed, (accuracy, last) in enumerate(((0.97, 0.969), (0.968, 0.965), (0.972, 0.970))):
    search = write_search(tmp_path, f's_ss05_{seed}', 'SS PCP-DARTS', 0.5, seed=seed)
    runs.append(write_trained(tmp_path, f't_ss05_{seed}', search, accuracy, last=last,
                              params=3_400_000 + 100_000 * seed))
  search = write_search(tmp_path, 's_ss075', 'SS PCP-DARTS', 0.75, hours=2.4, devices=4)
  runs.append(write_trained(tmp_path, 't_ss075', search, 0.9701))
  search = write_search(tmp_path, 's_pcp', 'PCP-DARTS', 0.0)
  runs.append(write_trained(tmp_path, 't_pcp', search, 0.9688))
  return runs


def test_paper_table_groups_runs_of_a_method_and_ssf(tmp_path):
  columns, rows = reports.paper_table(grouped_runs(tmp_path))
  assert columns == ['Method', 'Test error (%)', 'Last-epoch error (%)', 'Params (M)',
                     'Search cost (GPU-days)', 'Search method', 'n', 'Dataset']
  by_method = {row['Method']: row for row in rows}
  assert list(by_method) == ['PCP-DARTS', 'SS PCP-DARTS (ssf 0.5)', 'SS PCP-DARTS (ssf 0.75)']
  # Errors 3.0, 3.2, 2.8: mean 3.00, sample std 0.20; last-epoch 3.1, 3.5, 3.0: 3.20 ± 0.26.
  assert by_method['SS PCP-DARTS (ssf 0.5)'] == {
      'Method': 'SS PCP-DARTS (ssf 0.5)', 'Test error (%)': '3.00 ± 0.20',
      'Last-epoch error (%)': '3.20 ± 0.26',
      'Params (M)': '3.50 ± 0.10', 'Search cost (GPU-days)': '0.200 ± 0.000',
      'Search method': 'gradient-based, self-supervised', 'n': '3', 'Dataset': 'cifar10'}
  # Device-days: 2.4 hours on 4 devices.
  assert by_method['SS PCP-DARTS (ssf 0.75)']['Search cost (GPU-days)'] == '0.400'
  assert by_method['SS PCP-DARTS (ssf 0.75)']['n'] == '1'
  assert by_method['PCP-DARTS']['Test error (%)'] == '3.12'
  assert by_method['PCP-DARTS']['Last-epoch error (%)'] == '-'
  assert by_method['PCP-DARTS']['Search method'] == 'gradient-based'


def test_paper_table_labels_a_cpu_search_in_cpu_days(tmp_path):
  search = write_search(tmp_path, 's_cpu', 'SS PCP-DARTS', 0.75, hours=12, devices=2,
                        platform='cpu')
  run = write_trained(tmp_path, 't_cpu', search, 0.5)
  columns, rows = reports.paper_table([run])
  assert 'Search cost (CPU-days)' in columns and 'Search cost (GPU-days)' not in columns
  assert rows[0]['Search cost (CPU-days)'] == '1.000'
  # Mixed platforms: the unit goes into each cell.
  gpu = write_trained(tmp_path, 't_gpu', write_search(tmp_path, 's_gpu', 'PCP-DARTS', 0.0), 0.9)
  columns, rows = reports.paper_table([run, gpu])
  assert 'Search cost' in columns
  assert sorted(row['Search cost'] for row in rows) == ['0.200 GPU-days', '1.000 CPU-days']


def test_paper_table_top5_and_differing_settings(tmp_path):
  search = write_search(tmp_path, 's', 'SS PCP-DARTS', 0.75)
  short = write_trained(tmp_path, 't_short', search, 0.9, top5=0.995, epochs=50)
  long = write_trained(tmp_path, 't_long', search, 0.97, top5=0.999, epochs=600)
  columns, rows = reports.paper_table([short, long])
  assert columns[2:4] == ['Top-5 accuracy (%)', 'Last-epoch error (%)']
  assert [(row['Method'], row['Top-5 accuracy (%)'], row['n']) for row in rows] == [
      ('SS PCP-DARTS (ssf 0.75, epochs 50)', '99.50', '1'),
      ('SS PCP-DARTS (ssf 0.75, epochs 600)', '99.90', '1')]


@pytest.mark.slow
def test_table_cli_writes_markdown_and_csv(tmp_path):
  runs = grouped_runs(tmp_path)
  result = subprocess.run(
      [sys.executable, '-m', 'pcp_jax.reports', 'table', *runs, '--out', str(tmp_path / 'out')],
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 0, result.stderr
  lines = (tmp_path / 'out' / 'table2.md').read_text().splitlines()
  assert lines[0] == ('| Method | Test error (%) | Last-epoch error (%) | Params (M) '
                      '| Search cost (GPU-days) | Search method | n | Dataset |')
  assert lines[3] == ('| SS PCP-DARTS (ssf 0.5) | 3.00 ± 0.20 | 3.20 ± 0.26 | 3.50 ± 0.10 '
                      '| 0.200 ± 0.000 | gradient-based, self-supervised | 3 | cifar10 |')
  with open(tmp_path / 'out' / 'table2.csv', newline='', encoding='utf-8') as f:
    records = list(csv.DictReader(f))
  assert [r['n'] for r in records] == ['1', '3', '1']


@pytest.mark.slow
def test_cli_names_the_run_folder_without_results(tmp_path):
  runs = grouped_runs(tmp_path)
  (tmp_path / 'crashed_run').mkdir()
  for command in ('table', 'fgsm'):
    result = subprocess.run(
        [sys.executable, '-m', 'pcp_jax.reports', command, runs[0], str(tmp_path / 'crashed_run'),
         '--out', str(tmp_path / 'out')], capture_output=True, text=True, check=False, timeout=120)
    assert result.returncode == 1
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1, result.stderr
    assert ('t_ss05_0' if command == 'fgsm' else 'crashed_run') in errors[0]
    assert ('fgsm.json' if command == 'fgsm' else 'results.json') in errors[0]


@pytest.mark.slow
def test_table_cli_names_a_bad_results_file_in_one_line(tmp_path):
  run = write_run(tmp_path, 'percent', test_accuracy=97.2, params=1, dataset='cifar10')
  result = subprocess.run(
      [sys.executable, '-m', 'pcp_jax.reports', 'table', run, '--out', str(tmp_path / 'out')],
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 1
  errors = result.stderr.strip().splitlines()
  assert len(errors) == 1, result.stderr
  assert os.path.join(run, 'results.json') in errors[0] and 'fraction' in errors[0]
  assert not (tmp_path / 'out').exists()


def write_fgsm(run_dir, scale):
  eps = [0.0, 0.01, 0.03]
  (run_dir / 'fgsm.json').write_text(json.dumps({
      'eps': eps, 'accuracy': [scale * (1 - 10 * e) for e in eps],
      'mean_true_prob': [scale * (1 - 12 * e) for e in eps],
      'examples': {'0': [0.9, 0.5, 0.1], '3': [0.8, 0.7, 0.2]}, 'method': 'ignored'}))


def test_fgsm_overlay_one_line_per_run(tmp_path, monkeypatch):
  runs = grouped_runs(tmp_path)
  chosen = [runs[0], runs[1], runs[3]]
  for scale, run in zip((0.9, 0.8, 0.7), chosen):
    write_fgsm(tmp_path / os.path.basename(run), scale)
  seen = {}
  plot_fgsm = plots.plot_fgsm

  def spy(results_by_name, out_dir, prefix):
    seen.update(results_by_name)
    return plot_fgsm(results_by_name, out_dir, prefix=prefix)

  monkeypatch.setattr(plots, 'plot_fgsm', spy)
  paths = reports.fgsm_overlay(chosen, str(tmp_path / 'fig13'))
  assert sorted(os.path.basename(p) for p in paths) == [
      'fgsm_compare_accuracy.png', 'fgsm_compare_examples.png', 'fgsm_compare_true_prob.png']
  # Two seeds of one method and settings keep their folders apart; the method comes from
  # results.json, with its ssf.
  assert sorted(seen) == ['SS PCP-DARTS (ssf 0.5) [t_ss05_0]', 'SS PCP-DARTS (ssf 0.5) [t_ss05_1]',
                          'SS PCP-DARTS (ssf 0.75)']
  assert seen['SS PCP-DARTS (ssf 0.75)']['accuracy'][0] == 0.7
  for path in paths:
    with Image.open(path) as image:
      assert image.format == 'PNG'


def test_runs_on_different_test_set_sizes_are_different_rows(tmp_path):
  runs = [write_run(tmp_path, f'r{i}', method='PC-DARTS', test_accuracy=acc, params=1,
                    dataset='cifar10', num_test_examples=n)
          for i, (acc, n) in enumerate([(0.9, 128), (0.8, 128), (0.97, 10000)])]
  _, rows = reports.paper_table(runs)
  assert [(r['Dataset'], r['n']) for r in rows] == [
      ('cifar10', '1'), ('cifar10 (128 of 10000 test images)', '2')]


def test_tiny_runs_and_published_cells_say_what_they_are(tmp_path):
  tiny = write_run(tmp_path, 'tiny', test_accuracy=0.3, params=1, dataset='cifar10',
                   num_test_examples=128, num_train_examples=256, genotype_source='PDARTS',
                   method=runs_lib.method_name('PDARTS'))
  _, (row,) = reports.paper_table([tiny])
  assert row['Method'] == 'P-DARTS cell'
  assert row['Dataset'] == 'cifar10 (256 of 50000 training images, 128 of 10000 test images)'
  assert row['Search cost (GPU-days)'] == '0.300'  # the published cell's published cost
  # Published rows beside one's own, on request.
  md, _ = reports.write_paper_table([tiny], str(tmp_path / 'out'), published=True)
  text = open(md).read()
  row = '| PC-DARTS, published | 2.57 | - | 3.6 | 0.1 | gradient-based | published | cifar10 |'
  assert row in text
  assert '| SS PCP-DARTS (ssf 0.75), the paper | 2.99 |' in text
  assert 'published' not in open(reports.write_paper_table([tiny], str(tmp_path / 'o2'))[0]).read()


def test_a_run_given_twice_is_refused(tmp_path):
  run = write_run(tmp_path, 'r', method='PC-DARTS', test_accuracy=0.9, params=1,
                  dataset='cifar10')
  os.symlink(run, tmp_path / 'link')
  for twice in ([run, run], [run, str(tmp_path / 'link')]):
    with pytest.raises(ValueError, match='is .* again; give each run once'):
      reports.paper_table(twice)


def test_a_run_tested_on_its_latest_checkpoint_is_not_called_the_best(tmp_path):
  runs = [write_run(tmp_path, f'r{i}', method='PC-DARTS', test_accuracy=acc, params=1,
                    dataset='cifar10', checkpoint=checkpoint)
          for i, (acc, checkpoint) in enumerate([(0.9, 'best'), (0.8, 'checkpoints'),
                                                 (0.7, None)])]
  columns, rows = reports.paper_table(runs)
  assert columns[:3] == ['Method', 'Test error (%)', 'Tested checkpoint']
  assert [(r['Tested checkpoint'], r['Test error (%)'], r['n']) for r in rows] == [
      ('best', '20.00 ± 14.14', '2'), ('latest (best/ unusable)', '20.00', '1')]
  _, rows = reports.paper_table(runs[:1])
  assert 'Tested checkpoint' not in rows[0]  # only when some run was not tested on its best


def test_a_bad_out_folder_is_named_as_the_option(tmp_path, capsys):
  run = write_run(tmp_path, 'r', method='PC-DARTS', test_accuracy=0.9, params=1,
                  dataset='cifar10')
  afile = tmp_path / 'a_file'
  afile.write_text('x')
  for command in ('table', 'fgsm'):
    assert reports.main([command, run, '--out', str(afile / 'out')]) == 1
    assert capsys.readouterr().err == (
        f'error: --out {afile}/out: {afile} is a file, not a folder.\n')
  assert reports.main(['table', run, '--out', '']) == 1
  assert capsys.readouterr().err == "error: --out must name a folder, got ''.\n"
