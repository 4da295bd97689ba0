"""Search spaces: which ops each edge of each cell starts with (`search.space`).

`darts` puts `search.initial_ops` (all eight DARTS ops by default) on every edge of both cells.
`s1`..`s4` are RobustDARTS's reduced spaces (Zela et al., ICLR 2020, `src/spaces.py`), in
which DARTS collapses reliably: S1 a per-edge pair of ops, different in the normal and the
reduction cell; S2 {skip_connect, sep_conv_3x3} on every edge; S3 {none, skip_connect,
sep_conv_3x3}; S4 {noise, sep_conv_3x3}, `noise` being Gaussian noise N(0, 1) of the edge's
output shape.
"""

from typing import Dict

import numpy as np

from pcp_jax import genotypes

# S1, edge by edge (genotypes.EDGES order), as RobustDARTS lists it.
_S1_NORMAL = (
    ('skip_connect', 'dil_conv_3x3'), ('skip_connect', 'dil_conv_5x5'),
    ('skip_connect', 'dil_conv_5x5'), ('skip_connect', 'sep_conv_3x3'),
    ('skip_connect', 'dil_conv_3x3'), ('max_pool_3x3', 'skip_connect'),
    ('skip_connect', 'sep_conv_3x3'), ('skip_connect', 'sep_conv_3x3'),
    ('skip_connect', 'dil_conv_3x3'), ('skip_connect', 'sep_conv_3x3'),
    ('max_pool_3x3', 'skip_connect'), ('skip_connect', 'dil_conv_3x3'),
    ('dil_conv_3x3', 'dil_conv_5x5'), ('dil_conv_3x3', 'dil_conv_5x5'))
_S1_REDUCE = (
    ('max_pool_3x3', 'avg_pool_3x3'), ('max_pool_3x3', 'dil_conv_3x3'),
    ('max_pool_3x3', 'avg_pool_3x3'), ('max_pool_3x3', 'avg_pool_3x3'),
    ('skip_connect', 'dil_conv_5x5'), ('max_pool_3x3', 'avg_pool_3x3'),
    ('max_pool_3x3', 'sep_conv_3x3'), ('skip_connect', 'dil_conv_3x3'),
    ('skip_connect', 'dil_conv_5x5'), ('max_pool_3x3', 'avg_pool_3x3'),
    ('max_pool_3x3', 'avg_pool_3x3'), ('skip_connect', 'dil_conv_5x5'),
    ('skip_connect', 'dil_conv_5x5'), ('skip_connect', 'dil_conv_5x5'))


def _same(ops):
  return (tuple(ops),) * genotypes.NUM_EDGES


# space -> cell -> the ops of each edge
SPACES = {
    's1': {'normal': _S1_NORMAL, 'reduce': _S1_REDUCE},
    's2': {c: _same(('skip_connect', 'sep_conv_3x3')) for c in genotypes.CELLS},
    's3': {c: _same(('none', 'skip_connect', 'sep_conv_3x3')) for c in genotypes.CELLS},
    's4': {c: _same(('noise', 'sep_conv_3x3')) for c in genotypes.CELLS},
}
NAMES = ('darts',) + tuple(SPACES)


def _switches(edge_ops) -> np.ndarray:
  switches = np.zeros((genotypes.NUM_EDGES, genotypes.NUM_OPS), bool)
  for e, names in enumerate(edge_ops):
    switches[e, [genotypes.OPS.index(op) for op in names]] = True
  return switches


def initial_switches(space: str, initial_ops) -> Dict[str, np.ndarray]:
  """{'normal', 'reduce'}: (14, NUM_OPS) booleans, the ops each edge starts with."""
  if space == 'darts':
    return {c: _switches(_same(initial_ops)) for c in genotypes.CELLS}
  if space not in SPACES:
    raise ValueError(f'search.space must be one of {list(NAMES)}, got {space!r}.')
  return {c: _switches(SPACES[space][c]) for c in genotypes.CELLS}


def ops_per_edge(space: str, initial_ops) -> int:
  return int(initial_switches(space, initial_ops)['normal'][0].sum())
