"""Genotypes as data: the DARTS operation set, reference architectures and derivation.

A genotype lists, for each of the 4 intermediate nodes of a cell, two (op, input)
pairs; inputs 0 and 1 are the two cell inputs c_{k-2} and c_{k-1}, input j >= 2 is
intermediate node j - 2.
"""

import ast
import collections
import json
import os
import re
from typing import Mapping, Optional, Tuple

import numpy as np

PRIMITIVES = (
    'none',
    'max_pool_3x3',
    'avg_pool_3x3',
    'skip_connect',
    'sep_conv_3x3',
    'sep_conv_5x5',
    'dil_conv_3x3',
    'dil_conv_5x5',
)
# Every op a search space can hold (`spaces`): the DARTS ops, then RobustDARTS's S4 `noise`.
# Op switches have one column per op here.
OPS = PRIMITIVES + ('noise',)
NUM_OPS = len(OPS)
CELLS = ('normal', 'reduce')

# The cell topology, enumerated here only: node j (0..STEPS-1) has an edge from each state
# i < 2 + j (0, 1: the cell inputs c_{k-2}, c_{k-1}; 2 + k: node k). Edges are numbered node
# by node, so node j's incoming edges are EDGES[NODE_EDGES[j]].
STEPS = 4
EDGES = tuple((i, j) for j in range(STEPS) for i in range(2 + j))  # (source state, node)
NUM_EDGES = len(EDGES)  # 14
NODE_EDGES = tuple(slice(j * (j + 3) // 2, (j + 1) * (j + 4) // 2) for j in range(STEPS))


def state_name(i: int) -> str:
  """'c_{k-2}', 'c_{k-1}' for the cell inputs, 'node k' for state 2 + k."""
  return ('c_{k-2}', 'c_{k-1}')[i] if i < 2 else f'node {i - 2}'


def edge_name(edge: int) -> str:
  """'c_{k-1} \u2192 node 1': edge `edge`'s input and node, as every figure, log line and
  TensorBoard chart names it."""
  source, node = EDGES[edge]
  return f'{state_name(source)} \u2192 node {node}'


def edge_tag(edge: int) -> str:
  """`edge_name` in the characters TensorBoard allows in a tag: 'c_k-1_to_node_1'."""
  name = edge_name(edge).replace('\u2192', 'to').replace('{', '').replace('}', '')
  return re.sub(r'[^-\w.]+', '_', name)

Genotype = collections.namedtuple(
    'Genotype', 'normal normal_concat reduce reduce_concat')

_CONCAT = (2, 3, 4, 5)


def _genotype(normal, reduce):
  return Genotype(
      normal=tuple((op, int(j)) for op, j in normal), normal_concat=_CONCAT,
      reduce=tuple((op, int(j)) for op, j in reduce), reduce_concat=_CONCAT)


REFERENCE_GENOTYPES = {
    'DARTS_V1': _genotype(
        normal=[('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('skip_connect', 0),
                ('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 1),
                ('sep_conv_3x3', 0), ('skip_connect', 2)],
        reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2),
                ('max_pool_3x3', 0), ('max_pool_3x3', 0), ('skip_connect', 2),
                ('skip_connect', 2), ('avg_pool_3x3', 0)]),
    'DARTS_V2': _genotype(
        normal=[('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0),
                ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('skip_connect', 0),
                ('skip_connect', 0), ('dil_conv_3x3', 2)],
        reduce=[('max_pool_3x3', 0), ('max_pool_3x3', 1), ('skip_connect', 2),
                ('max_pool_3x3', 1), ('max_pool_3x3', 0), ('skip_connect', 2),
                ('skip_connect', 2), ('max_pool_3x3', 1)]),
    'PC_DARTS_cifar': _genotype(
        normal=[('sep_conv_3x3', 1), ('skip_connect', 0), ('sep_conv_3x3', 0),
                ('dil_conv_3x3', 1), ('sep_conv_5x5', 0), ('sep_conv_3x3', 1),
                ('avg_pool_3x3', 0), ('dil_conv_3x3', 1)],
        reduce=[('sep_conv_5x5', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 1),
                ('sep_conv_5x5', 2), ('sep_conv_3x3', 0), ('sep_conv_3x3', 3),
                ('sep_conv_3x3', 1), ('sep_conv_3x3', 2)]),
    'PDARTS': _genotype(
        normal=[('skip_connect', 0), ('dil_conv_3x3', 1), ('skip_connect', 0),
                ('sep_conv_3x3', 1), ('sep_conv_3x3', 1), ('sep_conv_3x3', 3),
                ('sep_conv_3x3', 0), ('dil_conv_5x5', 4)],
        reduce=[('avg_pool_3x3', 0), ('sep_conv_5x5', 1), ('sep_conv_3x3', 0),
                ('dil_conv_5x5', 2), ('max_pool_3x3', 0), ('dil_conv_3x3', 1),
                ('dil_conv_3x3', 1), ('dil_conv_5x5', 3)]),
}


# The reference cells as results name them, and their published search cost in GPU-days
# (None: not published for that cell alone).
REFERENCE_METHODS = {
    'DARTS_V1': ('DARTS (1st order) cell', None),
    'DARTS_V2': ('DARTS (2nd order) cell', 1.0),
    'PC_DARTS_cifar': ('PC-DARTS cell', 0.1),
    'PDARTS': ('P-DARTS cell', 0.3),
}


def validate(genotype: Genotype) -> Genotype:
  """Checks that a genotype describes a valid 4-node DARTS cell pair."""
  for cell in ('normal', 'reduce'):
    edges = getattr(genotype, cell)
    if len(edges) != 2 * STEPS:
      raise ValueError(
          f'genotype.{cell} must list {2 * STEPS} (op, input) pairs, got {len(edges)}.')
    for k, (op, j) in enumerate(edges):
      if op not in OPS or op == 'none':
        raise ValueError(
            f'genotype.{cell}[{k}]: unknown op {op!r}; allowed: {OPS[1:]}.')
      node = k // 2
      if not 0 <= j < node + 2:
        raise ValueError(
            f'genotype.{cell}[{k}]: input {j} is out of range for node {node} '
            f'(allowed 0..{node + 1}).')
    concat = getattr(genotype, f'{cell}_concat')
    if (not concat or len(set(concat)) != len(concat)
        or any(not 0 <= c < STEPS + 2 for c in concat)):
      raise ValueError(f'genotype.{cell}_concat must be distinct node indices in '
                       f'0..{STEPS + 1}, got {list(concat)}.')
  return genotype


def to_dict(genotype: Genotype) -> dict:
  return {
      'normal': [[op, int(j)] for op, j in genotype.normal],
      'normal_concat': [int(c) for c in genotype.normal_concat],
      'reduce': [[op, int(j)] for op, j in genotype.reduce],
      'reduce_concat': [int(c) for c in genotype.reduce_concat],
  }


def _index(value, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f'{where} must be a whole number, got {value!r}.')
  return int(value)


def _edges(value, cell: str) -> tuple:
  if not isinstance(value, (list, tuple)) or not all(
      isinstance(e, (list, tuple)) and len(e) == 2 for e in value):
    raise ValueError(f'genotype.{cell} must be a list of [op, input] pairs, got {value!r}.')
  return tuple((op, _index(j, f'genotype.{cell}[{k}] input'))
               for k, (op, j) in enumerate(value))


def from_dict(d: Mapping) -> Genotype:
  if not isinstance(d, Mapping):
    raise ValueError(f'a genotype is a JSON object, got {type(d).__name__}.')
  missing = {'normal', 'normal_concat', 'reduce', 'reduce_concat'} - set(d)
  if missing:
    raise ValueError(f'genotype JSON is missing the keys {sorted(missing)}.')
  concat = {c: tuple(_index(i, f'genotype.{c}_concat') for i in d[f'{c}_concat'])
            for c in ('normal', 'reduce')}
  return validate(Genotype(
      normal=_edges(d['normal'], 'normal'), normal_concat=concat['normal'],
      reduce=_edges(d['reduce'], 'reduce'), reduce_concat=concat['reduce']))


def save(genotype: Genotype, path: str) -> None:
  """Writes the genotype as JSON (atomically, so a crash never leaves half a file)."""
  tmp = f'{path}.tmp'
  with open(tmp, 'w') as f:
    json.dump(to_dict(genotype), f, indent=1)
    f.write('\n')
  os.replace(tmp, path)


def load(path: str) -> Genotype:
  """The genotype in a JSON file; a damaged or invalid one is a ValueError naming the file."""
  with open(path) as f:
    try:
      return from_dict(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e.msg}, line {e.lineno}).') from None
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from None


def to_string(genotype: Genotype) -> str:
  """The genotype as the DARTS family's code prints it (and as `parse` and `get` read it):
  Genotype(normal=[('sep_conv_3x3', 1), ...], normal_concat=range(2, 6), reduce=...)."""
  def concat(c):
    c = [int(i) for i in c]
    return f'range({c[0]}, {c[-1] + 1})' if c == list(range(c[0], c[-1] + 1)) else str(c)
  parts = []
  for cell in ('normal', 'reduce'):
    edges = ', '.join(f'({op!r}, {int(j)})' for op, j in getattr(genotype, cell))
    parts += [f'{cell}=[{edges}]', f'{cell}_concat={concat(getattr(genotype, cell + "_concat"))}']
  return f'Genotype({", ".join(parts)})'


def _literal(node, where: str):
  """A literal, or `range(a, b)` as its list: what the DARTS family's genotypes.py holds."""
  try:
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
        and node.func.id == 'range' and not node.keywords):
      return list(range(*(_literal(a, where) for a in node.args)))
    return ast.literal_eval(node)
  except (TypeError, ValueError):
    raise ValueError(f'{where} must be a literal (lists, tuples, numbers, strings) or '
                     f'range(a, b), got {ast.unparse(node)!r}.') from None


def parse(text: str) -> Genotype:
  """A pasted `Genotype(normal=[...], normal_concat=..., reduce=[...], reduce_concat=...)`,
  as DARTS, PC-DARTS and P-DARTS print and store them; nothing in it is executed."""
  try:
    call = ast.parse(text.strip(), mode='eval').body
  except SyntaxError as e:
    raise ValueError(f'genotype {text[:60]!r}... is not valid Python syntax ({e.msg}).') from None
  if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
          and call.func.id == 'Genotype' and not call.args):
    raise ValueError('a pasted genotype is Genotype(normal=[...], normal_concat=..., '
                     'reduce=[...], reduce_concat=...) with keyword arguments.')
  return from_dict({k.arg: _literal(k.value, f'genotype.{k.arg}') for k in call.keywords})


def get(name_or_path: str) -> Genotype:
  """A genotype by reference name (e.g. 'PC_DARTS_cifar'), JSON file path, search workdir, or
  as pasted text `Genotype(normal=[...], ...)` (`parse`)."""
  if name_or_path in REFERENCE_GENOTYPES:
    return REFERENCE_GENOTYPES[name_or_path]
  if name_or_path.lstrip().startswith('Genotype('):
    return parse(name_or_path)
  if os.path.isfile(name_or_path):
    return load(name_or_path)
  if os.path.isdir(name_or_path) and os.path.isfile(
      os.path.join(name_or_path, 'genotype.json')):
    return load(os.path.join(name_or_path, 'genotype.json'))
  raise ValueError(
      f'genotype {name_or_path!r} is neither a reference name '
      f'({", ".join(REFERENCE_GENOTYPES)}), a genotype.json file, a search workdir nor a '
      'pasted Genotype(...).')


# ---------------------------------------------------------------------------
# Op switches: which of the OPS each of the 14 edges still has.


def reduction_indices(layers: int) -> Tuple[int, int]:
  """The cells of a `layers`-cell network that are reduction cells (at 1/3 and 2/3 depth)."""
  return (layers // 3, 2 * layers // 3)


def all_switches() -> np.ndarray:
  """The DARTS space: the eight PRIMITIVES on every edge."""
  switches = np.zeros((NUM_EDGES, NUM_OPS), dtype=bool)
  switches[:, :len(PRIMITIVES)] = True
  return switches


def switches_to_tuple(switches, uniform: bool = True) -> tuple:
  """A hashable form of a (14, NUM_OPS) boolean switch array (for module attributes)."""
  return tuple(tuple(bool(s) for s in row) for row in check_switches(switches, uniform=uniform))


def check_switches(switches, name='switches', uniform: bool = True) -> np.ndarray:
  """(14, NUM_OPS) booleans; (14, 8) ones (the DARTS ops only, as runs before `noise` wrote
  them) gain an off `noise` column. `uniform`: the same number of ops on every edge (a
  search's switches; a population's union may differ per edge)."""
  switches = np.asarray(switches, dtype=bool)
  if switches.shape == (NUM_EDGES, len(PRIMITIVES)):
    switches = np.concatenate(
        [switches, np.zeros((NUM_EDGES, NUM_OPS - len(PRIMITIVES)), bool)], axis=1)
  if switches.shape != (NUM_EDGES, NUM_OPS):
    raise ValueError(f'{name} must have shape ({NUM_EDGES}, {NUM_OPS}), got {switches.shape}.')
  counts = switches.sum(axis=1)
  if counts.min() < 1 or (uniform and counts.min() != counts.max()):
    raise ValueError(
        f'{name} must keep the same number (>= 1) of ops on every edge, got {counts.tolist()}.')
  return switches


def edge_softmax(alphas, switches) -> np.ndarray:
  """Softmax of (14, n_on) alphas scattered to a (14, NUM_OPS) array; ops that are off get
  0."""
  alphas = np.asarray(alphas, dtype=np.float64)
  switches = check_switches(switches)
  if alphas.shape != (NUM_EDGES, int(switches[0].sum())):
    raise ValueError(
        f'alphas of shape {alphas.shape} do not match switches with '
        f'{int(switches[0].sum())} ops per edge.')
  e = np.exp(alphas - alphas.max(axis=1, keepdims=True))
  probs = e / e.sum(axis=1, keepdims=True)
  full = np.zeros((NUM_EDGES, NUM_OPS))
  full[switches] = probs.reshape(-1)
  return full


def node_softmax(betas) -> np.ndarray:
  """Edge-normalisation weights: softmax of the betas within each node's incoming edges."""
  betas = np.asarray(betas, dtype=np.float64)
  out = np.empty_like(betas)
  for edges in NODE_EDGES:
    e = np.exp(betas[edges] - betas[edges].max())
    out[edges] = e / e.sum()
  return out


def arch_weights(arch, switches, use_betas) -> dict:
  """Softmaxed alphas ((14, NUM_OPS), 0 for ops off) and edge-normalised betas (14) of both
  cells, as lists: one row of `arch_history.jsonl`."""
  row = {'primitives': list(OPS)}
  for cell in ('normal', 'reduce'):
    row[f'alphas_{cell}'] = edge_softmax(
        np.asarray(arch[f'alphas_{cell}']), switches[cell]).round(6).tolist()
    betas = (node_softmax(np.asarray(arch[f'betas_{cell}'])) if use_betas
             else np.ones(NUM_EDGES))
    row[f'betas_{cell}'] = np.asarray(betas).round(6).tolist()
    row[f'switches_{cell}'] = switches[cell].tolist()
  return row


def drop_weakest_ops(alphas, switches, num_keep: int, drop_none_first: bool = False) -> np.ndarray:
  """P-DARTS op dropping: keep the `num_keep` strongest ops (by softmax) on each edge.

  With `drop_none_first` (the last stage), `none` is dropped before any other op.
  Ties drop the higher op index first, so the lower index survives.
  """
  switches = check_switches(switches)
  probs = edge_softmax(alphas, switches)
  new = np.zeros_like(switches)
  for e in range(NUM_EDGES):
    on = [k for k in range(NUM_OPS) if switches[e, k]]
    if num_keep > len(on):
      raise ValueError(f'cannot keep {num_keep} ops on an edge that has {len(on)}.')
    strength = {k: probs[e, k] for k in on}
    if drop_none_first and 0 in strength:
      strength[0] = -np.inf
    keep = sorted(on, key=lambda k: (-strength[k], k))[:num_keep]
    new[e, keep] = True
  return new


def describe_dropped(before, after) -> str:
  """The ops `after` switched off per edge, as P-DARTS logs its stages:
  'c_{k-2} \u2192 node 0: none, avg_pool_3x3; ...'."""
  edges = []
  for e, (was, now) in enumerate(zip(check_switches(before), check_switches(after))):
    ops = ', '.join(OPS[k] for k in np.flatnonzero(was & ~now)) or '-'
    edges.append(f'{edge_name(e)}: {ops}')
  return '; '.join(edges)


def _parse_cell(weights: np.ndarray, allowed: np.ndarray):
  """Top-2 incoming edges per node by their best allowed op, strongest edge first."""
  masked = np.where(allowed, weights, -np.inf)
  best_op = masked.argmax(axis=1)  # argmax: ties go to the lower index
  strength = masked.max(axis=1)
  gene = []
  for node_edges in NODE_EDGES:
    start = node_edges.start
    edges = sorted(range(node_edges.stop - start), key=lambda j: (-strength[start + j], j))[:2]
    for j in edges:
      if not np.isfinite(strength[start + j]):
        raise ValueError(f'edge {start + j} has no op left to choose besides `none`.')
      gene.append((OPS[best_op[start + j]], j, start + j))
  return gene


def derive_genotype(arch: Mapping[str, np.ndarray], use_betas: bool = True,
                    switches_normal=None, switches_reduce=None,
                    max_skip_normal: Optional[int] = None) -> Genotype:
  """Derives the discrete genotype from the 'arch' collection.

  Args:
    arch: mapping with `alphas_normal`, `alphas_reduce` (14 x ops-on) and, when
      `use_betas`, `betas_normal`, `betas_reduce` (14).
    use_betas: weight each edge's op probabilities by its edge-normalisation weight
      (PC-DARTS); without it the plain softmax of the alphas is used (DARTS/P-DARTS).
    switches_normal, switches_reduce: (14, NUM_OPS) booleans saying which OPS the alpha
      columns stand for (default: the eight PRIMITIVES on).
    max_skip_normal: the P-DARTS rule; while the normal cell has more skip-connects
      than this, the weakest chosen skip-connect is removed and the cell re-derived.

  `none` is never chosen. Each node keeps its two strongest incoming edges, listed
  strongest first; ties go to the lower index.
  """
  cells = {}
  for cell, switches in (('normal', switches_normal), ('reduce', switches_reduce)):
    switches = all_switches() if switches is None else check_switches(
        switches, f'switches_{cell}')
    weights = edge_softmax(np.asarray(arch[f'alphas_{cell}']), switches)
    if use_betas:
      weights = weights * node_softmax(np.asarray(arch[f'betas_{cell}']))[:, None]
    allowed = switches.copy()
    allowed[:, PRIMITIVES.index('none')] = False
    gene = _parse_cell(weights, allowed)
    if cell == 'normal' and max_skip_normal is not None:
      skip = PRIMITIVES.index('skip_connect')
      while sum(op == 'skip_connect' for op, _, _ in gene) > max_skip_normal:
        # Remove the weakest chosen skip-connect whose edge or node has another op to offer.
        for _, e in sorted((weights[e, skip], e) for op, _, e in gene if op == 'skip_connect'):
          allowed[e, skip] = False
          try:
            gene = _parse_cell(weights, allowed)
            break
          except ValueError:
            allowed[e, skip] = True
        else:
          break  # every remaining skip-connect is the only choice left for its node
    cells[cell] = [(op, j) for op, j, _ in gene]
  return _genotype(cells['normal'], cells['reduce'])
