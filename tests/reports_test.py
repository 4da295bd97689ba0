"""Tests of the cell diagrams and the results table."""

import collections
import csv
import json
import os
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from pcp_jax import genotypes
from pcp_jax import reports


@pytest.mark.parametrize('name', sorted(genotypes.REFERENCE_GENOTYPES))
@pytest.mark.parametrize('cell', reports.CELLS)
def test_cell_diagram_png(tmp_path, name, cell):
  path = reports.plot_cell(genotypes.REFERENCE_GENOTYPES[name], cell, str(tmp_path / 'c.png'))
  with Image.open(path) as image:
    assert image.format == 'PNG'
    # Wider than tall: inputs on the left, output on the right.
    assert image.size[0] > image.size[1] > 100
    image.verify()


@pytest.mark.parametrize('name', sorted(genotypes.REFERENCE_GENOTYPES))
@pytest.mark.parametrize('cell', reports.CELLS)
def test_cell_diagram_svg_labels_every_edge(tmp_path, name, cell):
  genotype = genotypes.REFERENCE_GENOTYPES[name]
  path = reports.plot_cell(genotype, cell, str(tmp_path / 'c.svg'))
  root = ET.parse(path).getroot()
  assert root.tag.endswith('svg')
  texts = collections.Counter(
      element.text for element in root.iter() if element.tag.endswith('text'))
  ops = collections.Counter(op for op, _ in getattr(genotype, cell))
  assert {op: texts[op] for op in ops} == ops
  assert all(texts[str(node)] == 1 for node in range(genotypes.STEPS))


def test_cell_layout_puts_inputs_left_and_output_right():
  genotype = genotypes.REFERENCE_GENOTYPES['PDARTS']
  layout = reports.cell_layout(genotype, 'normal')
  x = {node: position[0] for node, position in layout.items()}
  intermediate = [x[state] for state in range(2, 2 + genotypes.STEPS)]
  assert x[0] == x[1] < min(intermediate)
  assert max(intermediate) < x[reports.OUTPUT]
  # Each node sits right of all its inputs, so every edge points rightwards.
  for k, (_, j) in enumerate(genotype.normal):
    assert x[j] < x[2 + k // 2]
  assert len(set(layout.values())) == len(layout)


def test_plot_genotype_writes_both_cells_in_each_format(tmp_path):
  genotype = genotypes.REFERENCE_GENOTYPES['PC_DARTS_cifar']
  paths = reports.plot_genotype(genotype, str(tmp_path / 'cells'), prefix='pc_',
                                formats=('png', 'svg'))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ['pc_normal.png', 'pc_normal.svg', 'pc_reduce.png', 'pc_reduce.svg']
  assert all(os.path.getsize(p) > 0 for p in paths)


def test_plot_cell_rejects_unknown_cell_and_format(tmp_path):
  genotype = genotypes.REFERENCE_GENOTYPES['DARTS_V2']
  with pytest.raises(ValueError, match='cell'):
    reports.plot_cell(genotype, 'both', str(tmp_path / 'c.png'))
  with pytest.raises(ValueError, match='jpg'):
    reports.plot_cell(genotype, 'normal', str(tmp_path / 'c.jpg'))


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


def test_results_table_rows(tmp_path):
  rows = reports.results_table(fake_runs(tmp_path))
  assert [row['Method'] for row in rows] == ['P-DARTS', 'PC-DARTS', 'SS PCP-DARTS (ssf=1)']
  assert rows[2] == {'Method': 'SS PCP-DARTS (ssf=1)', 'Test error (%)': '3.28',
                     'Last-epoch error (%)': '3.49', 'Params (M)': '4.21',
                     'Search cost (GPU-days)': '0.195',
                     'Dataset': 'cifar10'}
  assert rows[1]['Test error (%)'] == '2.57' and rows[1]['Params (M)'] == '3.63'
  assert rows[0]['Search cost (GPU-days)'] == rows[1]['Search cost (GPU-days)'] == '-'


def test_write_results_table_markdown_and_csv(tmp_path):
  md_path, csv_path = reports.write_results_table(fake_runs(tmp_path),
                                                  str(tmp_path / 'tables' / 'table2'))
  assert md_path.endswith('table2.md') and csv_path.endswith('table2.csv')
  lines = open(md_path).read().splitlines()
  assert lines[0] == ('| Method | Test error (%) | Last-epoch error (%) | Params (M) '
                      '| Search cost (GPU-days) | Dataset |')
  assert lines[1].count('|') == 7 and set(lines[1]) <= set('|:-')
  assert lines[2:] == [
      '| P-DARTS | 2.71 | - | 3.43 | - | cifar10 |',
      '| PC-DARTS | 2.57 | - | 3.63 | - | cifar10 |',
      '| SS PCP-DARTS (ssf=1) | 3.28 | 3.49 | 4.21 | 0.195 | cifar10 |',
  ]
  with open(csv_path, newline='') as f:
    records = list(csv.reader(f))
  assert records[0] == list(reports.COLUMNS)
  assert records[1:] == [
      ['P-DARTS', '2.71', '-', '3.43', '-', 'cifar10'],
      ['PC-DARTS', '2.57', '-', '3.63', '-', 'cifar10'],
      ['SS PCP-DARTS (ssf=1)', '3.28', '3.49', '4.21', '0.195', 'cifar10'],
  ]


def test_results_table_names_the_folder_without_results(tmp_path):
  runs = fake_runs(tmp_path)
  (tmp_path / 'crashed_run').mkdir()
  with pytest.raises(FileNotFoundError, match='crashed_run'):
    reports.results_table(runs + [str(tmp_path / 'crashed_run')])


def test_results_table_rejects_a_percentage_accuracy(tmp_path):
  run = write_run(tmp_path, 'percent', test_accuracy=97.2, params=1, dataset='cifar10')
  with pytest.raises(ValueError, match='fraction'):
    reports.results_table([run])
