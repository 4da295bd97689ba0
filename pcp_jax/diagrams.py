"""Cell diagrams of genotypes, drawn like the DARTS papers' figures: inputs left, the output
node right, each edge labelled with its op and routed around the other nodes.
"""

import os
from typing import Dict, Sequence, Tuple

import matplotlib
from matplotlib import patches
from matplotlib.figure import Figure
from matplotlib.textpath import TextPath
import numpy as np

from pcp_jax import genotypes

CELLS = ('normal', 'reduce')
FORMATS = ('png', 'svg', 'pdf')
OUTPUT = 'out'  # The layout key of the output node c_{k}.

_INCH_PER_UNIT = 0.9  # Figure scale: data units are laid out at a fixed physical size.
_RANK_SPACING = 3.2
_ROW_SPACING = 1.4
_NODE_WIDTH, _NODE_HEIGHT = 1.0, 0.55
_NODE_FONTSIZE, _LABEL_FONTSIZE = 12, 8.5
_COLORS = {'input': '#c1e1c1', 'node': '#add8e6', 'output': '#eee8aa'}
_CURVATURES = (0.0, 0.15, -0.15, 0.3, -0.3, 0.45, -0.45)
_LABEL_POSITIONS = (0.5, 0.42, 0.58, 0.34, 0.66, 0.27, 0.73)


def _node_label(node) -> str:
  if node == OUTPUT:
    return r'$c_{k}$'
  return (r'$c_{k-2}$', r'$c_{k-1}$')[node] if node < 2 else str(node - 2)


def _cell_edges(genotype: genotypes.Genotype, cell: str):
  """(op, source state, destination state) per genotype edge; states 0, 1 are the inputs."""
  if cell not in CELLS:
    raise ValueError(f'cell must be one of {CELLS}, got {cell!r}.')
  genotypes.validate(genotype)
  return [(op, j, 2 + k // 2) for k, (op, j) in enumerate(getattr(genotype, cell))]


def cell_layout(genotype: genotypes.Genotype, cell: str) -> Dict[object, Tuple[float, float]]:
  """(x, y) of each state (0..5) and of OUTPUT: a column per depth, inputs left, output right.

  Within a column, nodes are ordered by the mean height of their inputs (fewer crossings).
  """
  edges = _cell_edges(genotype, cell)
  inputs = {state: [j for _, j, dst in edges if dst == state]
            for state in range(2, 2 + genotypes.STEPS)}
  rank = {0: 0, 1: 0}
  for state in range(2, 2 + genotypes.STEPS):
    rank[state] = 1 + max(rank[j] for j in inputs[state])
  rank[OUTPUT] = 1 + max(rank.values())
  layout = {0: (0.0, _ROW_SPACING / 2), 1: (0.0, -_ROW_SPACING / 2)}
  for r in range(1, rank[OUTPUT] + 1):
    column = [node for node in rank if rank[node] == r]
    if column == [OUTPUT]:
      layout[OUTPUT] = (r * _RANK_SPACING, 0.0)
      break
    column.sort(key=lambda s: (-np.mean([layout[j][1] for j in inputs[s]]), s))
    for row, state in enumerate(column):
      layout[state] = (r * _RANK_SPACING, ((len(column) - 1) / 2 - row) * _ROW_SPACING)
  return layout


def _bezier(p0, p1, rad, t):
  """Points at parameters t of matplotlib's arc3 curve from p0 to p1 (equal-aspect axes)."""
  (x0, y0), (x1, y1) = p0, p1
  # arc3's control point: the chord midpoint + rad * (dy, -dx).
  cx, cy = (x0 + x1) / 2 + rad * (y1 - y0), (y0 + y1) / 2 - rad * (x1 - x0)
  t = np.asarray(t)[:, None]
  return ((1 - t) ** 2 * np.array([x0, y0]) + 2 * t * (1 - t) * np.array([cx, cy])
          + t ** 2 * np.array([x1, y1]))


def _inside(points, center, half_width, half_height) -> int:
  offset = np.abs(points - np.asarray(center))
  return int(np.sum((offset[:, 0] < half_width) & (offset[:, 1] < half_height)))


def _route_edges(layout, pairs):
  """A curvature per (src, dst) pair: the straightest arc that misses all other nodes."""
  t = np.linspace(0.03, 0.97, 48)
  margin = 0.15
  routes = []
  for src, dst in pairs:
    def hits(rad):
      points = _bezier(layout[src], layout[dst], rad, t)
      return sum(_inside(points, center, _NODE_WIDTH / 2 + margin, _NODE_HEIGHT / 2 + margin)
                 for node, center in layout.items() if node not in (src, dst))
    # The same two states joined twice (a hand-written genotype): give each its own arc.
    taken = {rad for (s, d), rad in routes if (s, d) == (src, dst)}
    candidates = [rad for rad in _CURVATURES if rad not in taken]
    rad = min(candidates, key=lambda rad: (hits(rad), candidates.index(rad)))
    routes.append(((src, dst), rad))
  return [rad for _, rad in routes]


def _label_size(text):
  """Width and height, in data units, of an edge label (with its padding)."""
  extents = TextPath((0, 0), text, size=_LABEL_FONTSIZE).get_extents()
  points_per_unit = 72 * _INCH_PER_UNIT
  return (extents.width + 6) / points_per_unit, (extents.height + 5) / points_per_unit


def _place_labels(layout, edges, curvatures, curves):
  """A point on each labelled edge where its label covers no node, label or other edge."""
  placed = []
  for k, ((op, src, dst), rad) in enumerate(zip(edges, curvatures)):
    width, height = _label_size(op)
    others = np.concatenate([c for i, c in enumerate(curves) if i != k])

    def cost(t):
      center = _bezier(layout[src], layout[dst], rad, [t])[0]
      nodes = sum(
          _inside(np.array([center]), c, (_NODE_WIDTH + width) / 2, (_NODE_HEIGHT + height) / 2)
          for c in layout.values())
      labels = sum(abs(center[0] - x) < (width + w) / 2 and abs(center[1] - y) < (height + h) / 2
                   for (x, y), w, h in placed)
      return 100 * (nodes + labels) + _inside(others, center, width / 2, height / 2)

    t = min(_LABEL_POSITIONS, key=lambda t: (cost(t), _LABEL_POSITIONS.index(t)))
    center = _bezier(layout[src], layout[dst], rad, [t])[0]
    placed.append((tuple(center), width, height))
  return [center for center, _, _ in placed]


def plot_cell(genotype: genotypes.Genotype, cell: str, path: str) -> str:
  """Draws the `cell` ('normal' or 'reduce') of a genotype like the DARTS papers' figures.

  The format comes from the extension of `path` (.png, .svg or .pdf). SVG keeps its text
  as text, so labels stay searchable and editable.
  """
  fmt = os.path.splitext(path)[1].lstrip('.').lower()
  if fmt not in FORMATS:
    raise ValueError(f'plot_cell writes {FORMATS}, not {path!r}.')
  edges = _cell_edges(genotype, cell)
  layout = cell_layout(genotype, cell)
  concat_pairs = [(state, OUTPUT) for state in getattr(genotype, f'{cell}_concat')]
  pairs = [(src, dst) for _, src, dst in edges] + concat_pairs
  curvatures = _route_edges(layout, pairs)
  curves = [_bezier(layout[s], layout[d], rad, np.linspace(0, 1, 48))
            for (s, d), rad in zip(pairs, curvatures)]
  label_centers = _place_labels(layout, edges, curvatures[:len(edges)], curves)

  # Fit the canvas to nodes, arcs and labels, at a fixed scale so text sizes are as measured.
  extent = np.concatenate(curves + [np.array(list(layout.values()))])
  lo = extent.min(axis=0) - [_NODE_WIDTH / 2 + 0.25, _NODE_HEIGHT / 2 + 0.25]
  hi = extent.max(axis=0) + [_NODE_WIDTH / 2 + 0.25, _NODE_HEIGHT / 2 + 0.25]
  for (x, y), (op, _, _) in zip(label_centers, edges):
    width, height = _label_size(op)
    lo = np.minimum(lo, [x - width / 2 - 0.1, y - height / 2 - 0.1])
    hi = np.maximum(hi, [x + width / 2 + 0.1, y + height / 2 + 0.1])
  fig = Figure(figsize=tuple((hi - lo) * _INCH_PER_UNIT))
  ax = fig.add_axes((0, 0, 1, 1))
  ax.set_xlim(lo[0], hi[0])
  ax.set_ylim(lo[1], hi[1])
  ax.set_aspect('equal')
  ax.axis('off')

  boxes = {}
  for node, (x, y) in layout.items():
    kind = 'output' if node == OUTPUT else 'input' if node < 2 else 'node'
    boxes[node] = patches.FancyBboxPatch(
        (x - _NODE_WIDTH / 2, y - _NODE_HEIGHT / 2), _NODE_WIDTH, _NODE_HEIGHT,
        boxstyle='round,pad=0.04', facecolor=_COLORS[kind], edgecolor='black', zorder=2)
    ax.add_patch(boxes[node])
    ax.text(x, y, _node_label(node), ha='center', va='center', fontsize=_NODE_FONTSIZE,
            zorder=3)
  for k, ((src, dst), rad) in enumerate(zip(pairs, curvatures)):
    ax.add_patch(patches.FancyArrowPatch(
        layout[src], layout[dst], patchA=boxes[src], patchB=boxes[dst],
        connectionstyle=f'arc3,rad={rad}', arrowstyle='-|>', mutation_scale=12,
        color='black' if k < len(edges) else 'gray', linewidth=1.1, zorder=1))
  for (x, y), (op, _, _) in zip(label_centers, edges):
    ax.text(x, y, op, ha='center', va='center', fontsize=_LABEL_FONTSIZE, zorder=4,
            bbox=dict(boxstyle='round,pad=0.15', facecolor='white', edgecolor='none',
                      alpha=0.85))

  # No creation date in SVG/PDF, so the same genotype always gives the same file.
  metadata = {'svg': {'Date': None}, 'pdf': {'CreationDate': None}}.get(fmt)
  with matplotlib.rc_context({'svg.fonttype': 'none'}):
    fig.savefig(path, format=fmt, dpi=150, metadata=metadata)
  return path


def plot_genotype(genotype: genotypes.Genotype, out_dir: str, prefix: str = '',
                  formats: Sequence[str] = ('png',)) -> list:
  """Writes `{prefix}normal.{fmt}` and `{prefix}reduce.{fmt}` per format; returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  return [plot_cell(genotype, cell, os.path.join(out_dir, f'{prefix}{cell}.{fmt}'))
          for fmt in formats for cell in CELLS]
