"""Random cells of a search space: `--config.genotype=random:I`, the baseline of Yang et al.
(ICLR 2020, "NAS evaluation is frustratingly hard"), who found that many NAS methods barely
beat the average random cell trained with the same protocol.

Cell I is drawn from I alone (not from the training seed), so one cell can be trained over
several seeds and cell I is the same cell on every machine. It obeys what a derived genotype
obeys: each of the 4 nodes takes two distinct earlier states as inputs, every edge one of the
space's candidate ops other than `none`, the normal cell at most `max_skip_normal` (P-DARTS's
rule: 2) skip-connects, and the cell's output concatenates nodes 2..5. Inputs and ops are
drawn uniformly; a normal cell with too many skip-connects is drawn again, so every valid
cell is equally likely.

The space is the train config's `search.space` (with its `search.initial_ops` and
`search.max_skip_normal`) when the config has a `search` section, else the DARTS space (the
eight DARTS ops on every edge, at most two skip-connects), which is what configs/train_*.py
give.
"""

from typing import Mapping, Optional

import numpy as np

from pcp_jax import genotypes
from pcp_jax import spaces

PREFIX = 'random:'
METHOD = 'random cell'  # results.json's method of a random cell
_STREAM = 20200426  # keeps the cells' stream apart from any other use of seed I
_MAX_DRAWS = 100_000  # normal cells drawn before a space this strict is refused
_CONCAT = tuple(range(2, genotypes.STEPS + 2))


def index(source) -> Optional[int]:
  """I of a genotype source 'random:I', None for any other source; a ValueError naming
  --config.genotype for a malformed one ('random:', 'random:-1', 'random:x')."""
  if not isinstance(source, str) or not source.strip().startswith(PREFIX):
    return None
  text = source.strip()[len(PREFIX):]
  if not (text.isascii() and text.isdigit()):
    raise ValueError(f'--config.genotype={source!r}: a random cell is random:I with I a whole '
                     'number >= 0 (random:0, random:1, ...).')
  return int(text)


def _allowed(switches, cell: str) -> np.ndarray:
  allowed = genotypes.check_switches(switches, f'switches_{cell}').copy()
  allowed[:, genotypes.OPS.index('none')] = False
  return allowed


def _check_space(allowed: np.ndarray, cell: str, max_skip: Optional[int]) -> None:
  """Refuses a space that has no valid cell (too few edges with an op, or forced skips)."""
  skip = genotypes.OPS.index('skip_connect')
  forced = 0
  for node, edges in enumerate(genotypes.NODE_EDGES):
    usable = allowed[edges].any(axis=1)
    if usable.sum() < 2:
      raise ValueError(f'the search space leaves node {node} of the {cell} cell fewer than two '
                       'inputs with an op other than none; no random cell can be drawn.')
    others = (allowed[edges] & (np.arange(genotypes.NUM_OPS) != skip)).any(axis=1)
    forced += max(0, 2 - int(others.sum()))
  if max_skip is not None and forced > max_skip:
    raise ValueError(f'the search space forces {forced} skip-connects into the {cell} cell, '
                     f'more than the {max_skip} allowed; no random cell can be drawn.')


def _draw_cell(rng: np.random.Generator, allowed: np.ndarray) -> list:
  """(op, input) per node input: two distinct inputs per node, each with an allowed op."""
  gene = []
  for node, edges in enumerate(genotypes.NODE_EDGES):
    usable = np.flatnonzero(allowed[edges].any(axis=1))
    for source in sorted(rng.choice(usable, size=2, replace=False)):
      op = rng.choice(np.flatnonzero(allowed[edges.start + source]))
      gene.append((genotypes.OPS[op], int(source)))
  return gene


def draw(cell_index: int, switches: Optional[Mapping] = None,
         max_skip_normal: Optional[int] = 2) -> genotypes.Genotype:
  """Random cell `cell_index` of the space whose edges hold `switches` ({'normal',
  'reduce'}: (14, NUM_OPS) booleans; default the DARTS space); `max_skip_normal` None for no
  limit on the normal cell's skip-connects."""
  if isinstance(cell_index, bool) or not isinstance(cell_index, (int, np.integer)) or (
      cell_index < 0):
    raise ValueError(f'a random cell index is a whole number >= 0, got {cell_index!r}.')
  rng = np.random.default_rng([_STREAM, int(cell_index)])
  cells = {}
  for cell in genotypes.CELLS:
    allowed = _allowed(genotypes.all_switches() if switches is None else switches[cell], cell)
    limit = max_skip_normal if cell == 'normal' else None
    _check_space(allowed, cell, limit)
    for _ in range(_MAX_DRAWS):
      gene = _draw_cell(rng, allowed)
      if limit is None or sum(op == 'skip_connect' for op, _ in gene) <= limit:
        break
    else:
      raise ValueError(f'the search space gives a normal cell at most {limit} skip-connects '
                       f'too rarely: none in {_MAX_DRAWS} draws.')
    cells[cell] = tuple(gene)
  return genotypes.validate(genotypes.Genotype(
      normal=cells['normal'], normal_concat=_CONCAT,
      reduce=cells['reduce'], reduce_concat=_CONCAT))


def space_of(config) -> dict:
  """draw()'s `switches` and `max_skip_normal` for a config: its `search` section's space,
  else the DARTS space with at most two skip-connects."""
  search = config.get('search')
  if search is None:
    return {'switches': None, 'max_skip_normal': 2}
  max_skip = search.get('max_skip_normal', 2)
  return {'switches': spaces.initial_switches(search.get('space', 'darts'),
                                              search.get('initial_ops', genotypes.PRIMITIVES)),
          'max_skip_normal': None if max_skip is None or max_skip < 0 else max_skip}


def genotype(config) -> genotypes.Genotype:
  """The genotype `config.genotype` names: random cell I of the config's space for
  'random:I', else `genotypes.get` (a reference name, a file, a search folder, a pasted
  Genotype(...))."""
  cell_index = index(config.genotype)
  if cell_index is None:
    return genotypes.get(config.genotype)
  try:
    return draw(cell_index, **space_of(config))
  except ValueError as e:
    raise ValueError(f'--config.genotype={config.genotype!r}: {e}') from None
