"""Reports of finished runs: cell diagrams of genotypes, the paper's results table (Table II)
and the FGSM overlay (Fig. 13).

  python -m pcp_jax.reports table RUN [RUN ...] --out DIR   # DIR/table2.md, DIR/table2.csv
  python -m pcp_jax.reports fgsm RUN [RUN ...] --out DIR    # DIR/fgsm_compare_*.png
"""

import argparse
import collections
import csv
import json
import os
import sys
from typing import Dict, Optional, Sequence, Tuple

import matplotlib
import numpy as np
from matplotlib import patches
from matplotlib.figure import Figure
from matplotlib.textpath import TextPath

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


# ---------------------------------------------------------------------------
# The paper's Table II over groups of runs, and the Fig. 13 overlay: `python -m pcp_jax.reports`.

SEARCH_SUMMARY = 'search_summary.json'
SEARCH_CONFIG = 'config.json'
TRAIN_CONFIG = 'train_config.json'
# Config leaves that never make runs different methods: seeds (the replicates of a group),
# names, paths and bookkeeping.
_NOT_SETTINGS = ('seed', 'method', 'genotype', 'modes', 'workdir', 'data_dir', 'download',
                 'log_every_steps', 'checkpoint', 'fgsm', 'eval_batch_size', 'max_test',
                 'compilation_cache')


def _load_json(path: str) -> dict:
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON ({e.msg}, line {e.lineno}).') from None


def _read_results(run_dir: str) -> dict:
  """A run folder's results.json, checked: a one-line error naming the file if it is
  missing, not JSON, lacks a key the table needs or holds an accuracy outside [0, 1]."""
  path = os.path.join(run_dir, 'results.json')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'run folder {run_dir!r} has no results.json (looked for {path}).')
  results = _load_json(path)
  missing = {'test_accuracy', 'params', 'dataset'} - set(results)
  if missing:
    raise ValueError(f'{path} is missing the keys {sorted(missing)}.')
  for key in ('test_accuracy', 'last_test_accuracy', 'test_top5_accuracy'):
    value = results.get(key)
    if value is not None and not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
      raise ValueError(f'{path}: {key} must be a fraction in [0, 1], got {value}.')
  return results


def _flatten(tree, prefix='') -> dict:
  if not isinstance(tree, dict):
    return {prefix: json.dumps(tree, sort_keys=True)}
  flat = {}
  for key, value in tree.items():
    flat.update(_flatten(value, f'{prefix}.{key}' if prefix else str(key)))
  return flat


def _is_setting(key: str) -> bool:
  return not any(part in _NOT_SETTINGS or part.endswith(('_dir', '_path'))
                 for part in key.split('.'))


def search_folder(run_dir: str, source) -> str:
  """The search folder a trained genotype came from (holding search_summary.json), or ''.

  `source` is results.json's `genotype_source` (a search folder or a genotype.json path, as
  given to train; relative paths are tried from the working directory and from `run_dir`);
  a run folder that holds a search_summary.json itself is its own search folder."""
  candidates = []
  if source and source not in genotypes.REFERENCE_GENOTYPES:
    for path in (source, os.path.join(run_dir, source),
                 os.path.join(os.path.dirname(os.path.normpath(run_dir)), source)):
      candidates.append(path if os.path.isdir(path) else os.path.dirname(path))
  candidates.append(run_dir)
  for folder in candidates:
    if folder and os.path.isfile(os.path.join(folder, SEARCH_SUMMARY)):
      return folder
  return ''


def search_summary(source: str) -> dict:
  """The search_summary.json of the search a genotype came from (`config.genotype`: a search
  folder or its genotype.json); {} for a reference genotype or a file without one."""
  folder = search_folder('', source)
  return _load_json(os.path.join(folder, SEARCH_SUMMARY)) if folder else {}


def method_name(source: str, method: str = '') -> str:
  """A trained genotype's name in results: `method` (train.method) if given, else the
  reference name, the search's method, or the search folder's (or file's) name."""
  if method:
    return method
  if source in genotypes.REFERENCE_GENOTYPES:
    return source
  searched = search_summary(source).get('method')
  if searched:
    return searched
  if os.path.isdir(source):
    return os.path.basename(os.path.normpath(source))
  stem = os.path.splitext(os.path.basename(source))[0]
  return os.path.basename(os.path.dirname(os.path.abspath(source))) if stem == 'genotype' else stem


def cost_unit(platform) -> str:
  """'GPU-days' for platform gpu, 'CPU-days' for cpu, ...; 'device-days' when unknown."""
  return f'{platform.upper()}-days' if platform else 'device-days'


def describe_run(run_dir: str, record: dict) -> dict:
  """What the tables need of a run: its method, ssf, search cost and settings.

  `record` is the run's results.json (or fgsm.json). The search cost is in device-days,
  search hours x devices / 24, from the search folder's search_summary.json (else
  results.json's `search_cost_days`, for one device of an unknown platform)."""
  source = record.get('genotype_source')
  folder = search_folder(run_dir, source)
  summary = _load_json(os.path.join(folder, SEARCH_SUMMARY)) if folder else {}
  search_config = _load_json(os.path.join(folder, SEARCH_CONFIG)) if folder else {}
  train_config = _load_json(os.path.join(run_dir, TRAIN_CONFIG))
  ssf = summary.get('ss_factor', search_config.get('search', {}).get('ss_factor'))
  bt_scale = summary.get('bt_scale', search_config.get('search', {}).get('bt_scale'))
  if summary.get('search_cost_hours') is not None:
    cost = summary['search_cost_hours'] * summary.get('device_count', 1) / 24
  elif summary.get('search_cost_days') is not None:
    cost = summary['search_cost_days'] * summary.get('device_count', 1)
  else:
    cost = record.get('search_cost_days')
  settings = {f'search.{k}': v for k, v in _flatten(search_config).items()}
  settings.update({f'train.{k}': v for k, v in _flatten(train_config).items()})
  return {
      'folder': run_dir,
      'method': (record.get('method') or summary.get('method')
                 or os.path.basename(os.path.normpath(run_dir))),
      'dataset': record.get('dataset') or summary.get('dataset') or '-',
      'ssf': None if ssf is None else float(ssf),
      'bt_scale': bt_scale,
      'cost': cost,
      'cost_unit': cost_unit(summary.get('platform')) if cost is not None else None,
      'search_method': ('gradient-based, self-supervised' if ssf and float(ssf) > 0
                        else 'gradient-based'),
      'settings': {k: v for k, v in settings.items() if _is_setting(k)},
  }


def _short(key: str, value: str) -> str:
  value = json.loads(value)
  return f'{key.split(".")[-1]} {value}'


def method_labels(runs: Sequence[dict]) -> list:
  """A label per run: its method, with ssf (and a bt_scale other than 'none') when it
  self-supervises, and the config settings in which it differs from other runs of that method
  (seeds, paths and names aside)."""
  labels = []
  for run in runs:
    extras = []
    if run['ssf'] and 'ssf' not in run['method'].lower():
      extras.append(f'ssf {run["ssf"]:g}')
      if run['bt_scale'] not in (None, 'none'):
        extras.append(f'bt_scale {run["bt_scale"]}')
    labels.append((run['method'], extras))
  by_label = collections.defaultdict(list)
  for k, (method, extras) in enumerate(labels):
    by_label[(method, tuple(extras))].append(k)
  named = []
  for k, (method, extras) in enumerate(labels):
    peers = [runs[i]['settings'] for i in by_label[(method, tuple(extras))]]
    # Settings all peers record (a run without config files is not told apart by them).
    keys = sorted(set.intersection(*(set(p) for p in peers)))
    differing = [key for key in keys if len({p[key] for p in peers}) > 1
                 and not key.endswith(('.ss_factor', '.bt_scale'))]
    extras = extras + [_short(key, runs[k]['settings'][key]) for key in differing]
    named.append(f'{method} ({", ".join(extras)})' if extras else method)
  return named


def _mean_std(values, digits: int) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  if len(values) == 1:
    return f'{values[0]:.{digits}f}'
  return f'{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}'


def paper_table(run_dirs: Sequence[str]) -> Tuple[list, list]:
  """The paper's Table II over run folders (each with results.json): (columns, rows).

  Runs of the same method label (`method_labels`), dataset and search-cost unit make one row,
  rows sorted by label: mean ± sample standard deviation over its n runs. 'Test error' is the
  best checkpoint's (selected on the validation split, the test set itself unless
  train.val_split is a fraction), 'Last-epoch error' the final epoch's (`last_test_accuracy`).
  Search cost in device-days (hours x devices / 24), labelled with the platform
  (`GPU-days`, `CPU-days`); a top-5 column when some results.json has `test_top5_accuracy`."""
  if isinstance(run_dirs, str):
    run_dirs = [run_dirs]
  if not run_dirs:
    raise ValueError('the table needs at least one run folder.')
  results = [_read_results(run_dir) for run_dir in run_dirs]
  runs = [describe_run(run_dir, r) for run_dir, r in zip(run_dirs, results)]
  groups = collections.defaultdict(list)
  for label, run, result in zip(method_labels(runs), runs, results):
    groups[(label, run['dataset'], run['cost_unit'])].append((run, result))
  units = {unit for _, _, unit in groups if unit}
  cost_column = f'Search cost ({units.pop()})' if len(units) == 1 else 'Search cost'
  top5 = any(r.get('test_top5_accuracy') is not None for r in results)
  columns = (['Method', 'Test error (%)'] + (['Top-5 accuracy (%)'] if top5 else [])
             + ['Last-epoch error (%)', 'Params (M)', cost_column, 'Search method', 'n',
                'Dataset'])
  rows = []
  for (label, dataset, unit), members in sorted(groups.items(),
                                                key=lambda g: (g[0][0], g[0][1], g[0][2] or '')):
    cost = _mean_std([run['cost'] for run, _ in members], 3)
    row = {
        'Method': label,
        'Test error (%)': _mean_std([100 * (1 - r['test_accuracy']) for _, r in members], 2),
        'Last-epoch error (%)': _mean_std(
            [None if r.get('last_test_accuracy') is None else 100 * (1 - r['last_test_accuracy'])
             for _, r in members], 2),
        'Params (M)': _mean_std([r['params'] / 1e6 for _, r in members], 2),
        cost_column: f'{cost} {unit}' if cost != '-' and cost_column == 'Search cost' else cost,
        'Search method': members[0][0]['search_method'],
        'n': str(len(members)),
        'Dataset': dataset,
    }
    if top5:
      row['Top-5 accuracy (%)'] = _mean_std(
          [None if r.get('test_top5_accuracy') is None else 100 * r['test_top5_accuracy']
           for _, r in members], 2)
    rows.append(row)
  return columns, rows


def write_paper_table(run_dirs: Sequence[str], out_dir: str, name: str = 'table2') -> list:
  """Writes `paper_table` as `{out_dir}/{name}.md` and `.csv`; returns the paths."""
  columns, rows = paper_table(run_dirs)
  os.makedirs(out_dir, exist_ok=True)
  md_path, csv_path = (os.path.join(out_dir, f'{name}.{ext}') for ext in ('md', 'csv'))
  left = {'Method', 'Search method', 'Dataset'}
  lines = ['| ' + ' | '.join(columns) + ' |',
           '|' + '|'.join(':---' if c in left else '---:' for c in columns) + '|']
  lines += ['| ' + ' | '.join(row[c].replace('|', r'\|') for c in columns) + ' |'
            for row in rows]
  lines += ['', 'Mean ± sample standard deviation over the n runs of a row. Search cost: '
            'search hours x devices / 24.']
  with open(md_path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(csv_path, 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
  return [md_path, csv_path]


def fgsm_overlay(run_dirs: Sequence[str], out_dir: str, prefix: str = 'fgsm_compare') -> list:
  """Overlays the fgsm.json of several runs (the paper's Fig. 13), one line per run, named
  by its method label (`method_labels`; the folder added where labels repeat)."""
  if not run_dirs:
    raise ValueError('the FGSM overlay needs at least one run folder.')
  records, runs = [], []
  for run_dir in run_dirs:
    path = os.path.join(run_dir, 'fgsm.json')
    if not os.path.isdir(run_dir):
      raise FileNotFoundError(f'{run_dir}: no such run folder.')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'run folder {run_dir!r} has no fgsm.json (run the fgsm mode '
                              'there first).')
    record = _load_json(path)
    missing = {'eps', 'accuracy', 'mean_true_prob'} - set(record)
    if missing:
      raise ValueError(f'{path} is missing the keys {sorted(missing)}.')
    records.append(record)
    results = _load_json(os.path.join(run_dir, 'results.json'))
    runs.append(describe_run(run_dir, dict(record, **{k: v for k, v in results.items()
                                                       if v is not None})))
  labels = method_labels(runs)
  counts = collections.Counter(labels)
  results_by_name = {}
  for label, run_dir, record in zip(labels, run_dirs, records):
    if counts[label] > 1:
      label = f'{label} [{os.path.basename(os.path.normpath(run_dir))}]'
    results_by_name[label] = record
  from pcp_jax import analysis  # pylint: disable=g-import-not-at-top  (imports JAX)
  return analysis.plot_fgsm(results_by_name, out_dir, prefix=prefix)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m pcp_jax.reports',
      description='Reports over finished runs: the paper\'s Table II and the FGSM overlay.')
  commands = parser.add_subparsers(dest='command', required=True)
  table = commands.add_parser(
      'table', help='Table II (markdown + csv) over run folders holding results.json; runs '
      'of the same method and settings are one row, mean ± std over n.')
  table.add_argument('runs', nargs='+', metavar='RUN')
  table.add_argument('--out', required=True, help='folder for table2.md and table2.csv')
  table.add_argument('--name', default='table2', help='file name stem (default table2)')
  fgsm = commands.add_parser(
      'fgsm', help='Overlay the fgsm.json of several runs (Fig. 13).')
  fgsm.add_argument('runs', nargs='+', metavar='RUN')
  fgsm.add_argument('--out', required=True, help='folder for the PNGs')
  fgsm.add_argument('--prefix', default='fgsm_compare', help='file name prefix')
  args = parser.parse_args(argv)
  try:
    if args.command == 'table':
      paths = write_paper_table(args.runs, args.out, args.name)
    else:
      paths = fgsm_overlay(args.runs, args.out, args.prefix)
  except (OSError, ValueError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print('\n'.join(paths))
  return 0


if __name__ == '__main__':
  sys.exit(main())
