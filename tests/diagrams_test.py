"""Tests of the cell diagrams of genotypes."""

import collections
import os
import xml.etree.ElementTree as ET

import pytest
from PIL import Image

from pcp_jax import diagrams
from pcp_jax import genotypes


@pytest.mark.parametrize('name', sorted(genotypes.REFERENCE_GENOTYPES))
@pytest.mark.parametrize('cell', diagrams.CELLS)
def test_cell_diagram_png(tmp_path, name, cell):
  path = diagrams.plot_cell(genotypes.REFERENCE_GENOTYPES[name], cell, str(tmp_path / 'c.png'))
  with Image.open(path) as image:
    assert image.format == 'PNG'
    # Wider than tall: inputs on the left, output on the right.
    assert image.size[0] > image.size[1] > 100
    image.verify()


@pytest.mark.parametrize('name', sorted(genotypes.REFERENCE_GENOTYPES))
@pytest.mark.parametrize('cell', diagrams.CELLS)
def test_cell_diagram_svg_labels_every_edge(tmp_path, name, cell):
  genotype = genotypes.REFERENCE_GENOTYPES[name]
  path = diagrams.plot_cell(genotype, cell, str(tmp_path / 'c.svg'))
  root = ET.parse(path).getroot()
  assert root.tag.endswith('svg')
  texts = collections.Counter(
      element.text for element in root.iter() if element.tag.endswith('text'))
  ops = collections.Counter(op for op, _ in getattr(genotype, cell))
  assert {op: texts[op] for op in ops} == ops
  assert all(texts[str(node)] == 1 for node in range(genotypes.STEPS))


def test_cell_layout_puts_inputs_left_and_output_right():
  genotype = genotypes.REFERENCE_GENOTYPES['PDARTS']
  layout = diagrams.cell_layout(genotype, 'normal')
  x = {node: position[0] for node, position in layout.items()}
  intermediate = [x[state] for state in range(2, 2 + genotypes.STEPS)]
  assert x[0] == x[1] < min(intermediate)
  assert max(intermediate) < x[diagrams.OUTPUT]
  # Each node sits right of all its inputs, so every edge points rightwards.
  for k, (_, j) in enumerate(genotype.normal):
    assert x[j] < x[2 + k // 2]
  assert len(set(layout.values())) == len(layout)


def test_plot_genotype_writes_both_cells_in_each_format(tmp_path):
  genotype = genotypes.REFERENCE_GENOTYPES['PC_DARTS_cifar']
  paths = diagrams.plot_genotype(genotype, str(tmp_path / 'cells'), prefix='pc_',
                                formats=('png', 'svg'))
  names = sorted(os.path.basename(p) for p in paths)
  assert names == ['pc_normal.png', 'pc_normal.svg', 'pc_reduce.png', 'pc_reduce.svg']
  for path in paths:
    if path.endswith('.png'):
      with Image.open(path) as image:
        assert image.format == 'PNG'
    else:
      assert ET.parse(path).getroot().tag.endswith('svg')


def test_plot_cell_rejects_unknown_cell_and_format(tmp_path):
  genotype = genotypes.REFERENCE_GENOTYPES['DARTS_V2']
  with pytest.raises(ValueError, match='cell'):
    diagrams.plot_cell(genotype, 'both', str(tmp_path / 'c.png'))
  with pytest.raises(ValueError, match='jpg'):
    diagrams.plot_cell(genotype, 'normal', str(tmp_path / 'c.jpg'))
