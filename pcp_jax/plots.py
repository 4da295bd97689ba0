"""Pictures of a run folder: search and training curves, op weights, betas, cells, FGSM.

  python -m pcp_jax.plots RUN_DIR [RUN_DIR ...]

writes PNGs into `RUN_DIR/plots/` from whichever of these files the folder holds:

- `search_metrics.jsonl` -> `search_curves.png` (losses, accuracies, the architecture loss and
  its CE and BT parts, their gradient norms and cosine, lr, skip dropout; x = global epoch,
  stages split by dashed lines, warm-up epochs with the architecture frozen shaded) and
  `stage_cells.png` (the genotype each stage ended with, and the final `genotype.json`; the
  single diagrams go to `plots/cells/`);
- `arch_history.jsonl` -> `op_weights_normal.png`, `op_weights_reduce.png` (softmaxed alphas of
  each of the 14 edges, one line per op; a line ends when its op is switched off) and
  `betas.png` (edge-normalised betas per node; only when the search uses betas);
- `train_metrics.jsonl` -> `train_curves.png` (best epoch marked);
- `genotype.json` of a training run (no search rows) -> `genotype_normal.png`,
  `genotype_reduce.png`;
- `fgsm.json` -> `fgsm_accuracy.png`, `fgsm_true_prob.png`, `fgsm_examples.png`.

`plot_run(run_dir)` does the same from Python and returns the paths written. Figures are
built with matplotlib's Figure API (no pyplot) and saved to PNG by the Agg renderer, so
importing this module leaves the caller's backend (a notebook's, say) as it is; the command
line selects Agg.
"""

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

import matplotlib
import matplotlib.image
import matplotlib.lines
from matplotlib import transforms
from matplotlib.figure import Figure
import numpy as np

from pcp_jax import genotypes
from pcp_jax import reports

SEARCH_METRICS = 'search_metrics.jsonl'
TRAIN_METRICS = 'train_metrics.jsonl'
ARCH_HISTORY = 'arch_history.jsonl'
FGSM = 'fgsm.json'
GENOTYPE = 'genotype.json'
INPUTS = (SEARCH_METRICS, ARCH_HISTORY, TRAIN_METRICS, FGSM, GENOTYPE)
PLOTS_DIR = 'plots'
DPI = 110

# One colour per op, the same in every figure (tab10 without its grey).
OP_COLORS = dict(zip(genotypes.PRIMITIVES, (
    '#7f7f7f', '#1f77b4', '#17becf', '#d62728', '#2ca02c', '#bcbd22', '#9467bd', '#ff7f0e')))
_SPLIT_COLORS = {'train': '#1f77b4', 'valid': '#d62728'}


def read_rows(path: str) -> list:
  """The rows of a JSON-lines file ([] when absent); a last line cut short is ignored."""
  if not os.path.isfile(path):
    return []
  with open(path) as f:
    lines = [line for line in f.read().split('\n') if line.strip()]
  rows = []
  for number, line in enumerate(lines, 1):
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      if number == len(lines):
        break  # An interrupted write.
      raise ValueError(f'{path}: line {number} is not valid JSON.') from None
  return rows


def _search_order(rows: list) -> list:
  """Rows sorted by (stage, epoch), the last one kept where an epoch repeats (a resume)."""
  by_epoch = {(int(r['stage']), int(r['epoch'])): r for r in rows}
  return [by_epoch[key] for key in sorted(by_epoch)]


def _values(rows, key) -> np.ndarray:
  return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])


def _has(rows, key) -> bool:
  return any(r.get(key) is not None for r in rows)


def _stage_spans(rows) -> list:
  """(stage, first x, last x) per stage; x is the global epoch (1-based)."""
  spans = []
  for x, row in enumerate(rows, 1):
    if spans and spans[-1][0] == row['stage']:
      spans[-1][2] = x
    else:
      spans.append([row['stage'], x, x])
  return [tuple(span) for span in spans]


def _mark_stages(ax, spans, frozen=None, label=False):
  """Dashed lines between stages, shaded frozen (warm-up) epochs, stage names on top."""
  if frozen is not None:
    for x, is_frozen in enumerate(frozen, 1):
      if is_frozen:
        ax.axvspan(x - 0.5, x + 0.5, color='0.9', zorder=0, linewidth=0)
  for _, _, last in spans[:-1]:
    ax.axvline(last + 0.5, color='0.35', linestyle='--', linewidth=0.9, zorder=1)
  if label and len(spans) > 1:
    blend = transforms.blended_transform_factory(ax.transData, ax.transAxes)
    for stage, first, last in spans:
      ax.text((first + last) / 2, 1.01, f'stage {stage}', transform=blend, ha='center',
              va='bottom', fontsize=8, color='0.3')


def _epoch_axis(ax, n):
  ax.set_xlim(0.5, n + 0.5)
  ax.grid(alpha=0.3)
  ax.xaxis.get_major_locator().set_params(integer=True)


def _save(fig, path) -> str:
  fig.savefig(path, dpi=DPI)
  return path


# ---------------------------------------------------------------------------
# Search.

def search_curves_figure(rows: list) -> Figure:
  """Losses, accuracies, architecture loss parts and gradients, lr and skip dropout."""
  rows = _search_order(rows)
  n = len(rows)
  x = np.arange(1, n + 1)
  spans = _stage_spans(rows)
  frozen = [bool(r.get('arch_frozen')) for r in rows]
  fig = Figure(figsize=(17, 7.5), layout='constrained')
  axes = fig.subplots(2, 4, sharex=True)

  def values(key):
    v = _values(rows, key)
    if key.startswith('arch_'):
      # A frozen epoch has no architecture step: its zeros are no measurement.
      v[np.asarray(frozen) & (v == 0)] = np.nan
    return v

  def lines(ax, keys, title, ylabel=None, log=False):
    drawn = False
    for key, label, color in keys:
      if _has(rows, key):
        v = values(key)
        for i, (_, first, last) in enumerate(spans):  # no line across a stage boundary
          ax.plot(x[first - 1:last], v[first - 1:last], marker='o', markersize=3,
                  label=label if i == 0 else None, color=color)
        drawn = True
    ax.set_title(title, fontsize=10, pad=14 if len(spans) > 1 else 6)
    if ylabel:
      ax.set_ylabel(ylabel)
    if log == 'auto' and drawn:
      found = np.concatenate([values(k) for k, _, _ in keys if _has(rows, k)])
      found = found[np.isfinite(found)]
      log = found.size > 0 and found.min() > 0 and found.max() / found.min() > 20
      if log:
        ax.set_title(f'{title} (log scale)', fontsize=10, pad=14 if len(spans) > 1 else 6)
    if log and drawn and np.nanmin([np.nanmin(values(k)) if _has(rows, k) else np.inf
                                    for k, _, _ in keys]) > 0:
      ax.set_yscale('log')
    if drawn and len(keys) > 1:
      ax.legend(fontsize=8)
    if not drawn:
      ax.text(0.5, 0.5, 'not recorded', transform=ax.transAxes, ha='center', color='0.5')

  lines(axes[0, 0], [('train_loss', 'train', _SPLIT_COLORS['train']),
                     ('valid_loss', 'valid', _SPLIT_COLORS['valid'])],
        'Cross-entropy (network weights)', 'loss')
  lines(axes[0, 1], [('train_acc', 'train', _SPLIT_COLORS['train']),
                     ('valid_acc', 'valid', _SPLIT_COLORS['valid'])], 'Accuracy', 'accuracy')
  lines(axes[0, 2], [('arch_loss', 'arch loss (total)', 'black'),
                     ('arch_ce', 'CE part', '#2ca02c')], 'Architecture loss and its CE part',
        'loss', log='auto')
  lines(axes[0, 3], [('arch_bt', 'BT part', '#9467bd')], 'Architecture loss: Barlow Twins part',
        'loss')
  lines(axes[1, 0], [('arch_ce_grad_norm', '|grad| of CE part', '#2ca02c'),
                     ('arch_bt_grad_norm', '|grad| of BT part', '#9467bd')],
        'Architecture gradient norms', 'norm', log=True)
  lines(axes[1, 1], [('arch_grad_cosine', 'cos(CE grad, BT grad)', 'black')],
        'Cosine of the CE and BT gradients', 'cosine')
  lines(axes[1, 2], [('lr', 'lr', 'black')], 'Learning rate (weights)', 'lr')
  lines(axes[1, 3], [('skip_dropout', 'skip dropout', 'black')], 'Skip-connect dropout',
        'rate')
  for ax in axes.flat:
    _epoch_axis(ax, n)
    _mark_stages(ax, spans, frozen, label=True)
  for ax in axes[1]:
    ax.set_xlabel('epoch (all stages)')
  title = 'Search'
  if _has(rows, 'layers'):
    title += ': ' + ', '.join(
        f'stage {s}: {rows[first - 1].get("layers")} cells, '
        f'{rows[first - 1].get("ops_per_edge")} ops/edge' for s, first, _ in spans)
  title += '   (shaded: architecture frozen)' if any(frozen) else ''
  fig.suptitle(title, fontsize=11)
  return fig


def edge_names() -> list:
  """'c_{k-2} -> 0', ... per edge, in the genotypes' edge order."""
  names = []
  for node in range(genotypes.STEPS):
    for j in range(node + 2):
      source = ('c_{k-2}', 'c_{k-1}')[j] if j < 2 else f'node {j - 2}'
      names.append(f'{source} \u2192 node {node}')
  return names


def _edge_grid():
  """(row, column) of each edge: a row per node, a column per input."""
  return [(node, j) for node in range(genotypes.STEPS) for j in range(node + 2)]


def op_weights_figure(history: list, cell: str) -> Figure:
  """The DARTS papers' op-weight figure: 14 panels (a row per node, a column per input), one
  line per op (softmaxed alphas), ending where the op is switched off."""
  history = _search_order(history)
  n = len(history)
  x = np.arange(1, n + 1)
  spans = _stage_spans(history)
  primitives = history[0].get('primitives', list(genotypes.PRIMITIVES))
  alphas = np.array([r[f'alphas_{cell}'] for r in history], dtype=float)  # (n, 14, ops)
  switches = np.array([r.get(f'switches_{cell}', np.ones(alphas.shape[1:], bool))
                       for r in history], dtype=bool)
  alphas = np.where(switches, alphas, np.nan)
  rows, cols = genotypes.STEPS, genotypes.STEPS + 1
  fig = Figure(figsize=(3.0 * cols, 2.25 * rows + 0.9), layout='constrained')
  grid = fig.subplots(rows, cols, sharex=True, sharey=True, squeeze=False)
  names = edge_names()
  top = np.nanmax(alphas) if np.isfinite(alphas).any() else 1.0
  used = set()
  for edge, (node, j) in enumerate(_edge_grid()):
    ax = grid[node, j]
    used.add((node, j))
    for op_index, op in enumerate(primitives):
      series = alphas[:, edge, op_index]
      if np.isfinite(series).any():
        # Each stage starts fresh architecture weights: no line across a stage boundary.
        for i, (_, first, last) in enumerate(spans):
          ax.plot(x[first - 1:last], series[first - 1:last], color=OP_COLORS.get(op),
                  linewidth=1.4, label=op if i == 0 else None,
                  marker='o' if last - first < 3 else None, markersize=3)
    _mark_stages(ax, spans)
    _epoch_axis(ax, n)
    ax.set_ylim(0, min(1.0, top * 1.08))
    ax.set_title(names[edge], fontsize=9)
    ax.tick_params(labelsize=8, labelbottom=True, labelleft=True)
  for ax in grid.flat:
    if tuple(np.argwhere(grid == ax)[0]) not in used:
      ax.remove()
  for node in range(rows):
    grid[node, 0].set_ylabel('softmax weight', fontsize=8)
  for j in range(cols):
    grid[min(rows - 1, max(0, j - 1)), j].set_xlabel('epoch (all stages)', fontsize=8)
  handles = [matplotlib.lines.Line2D([], [], color=OP_COLORS.get(op), linewidth=2, label=op)
             for op in primitives]
  fig.legend(handles=handles, loc='outside lower center', ncol=len(primitives), fontsize=9,
             frameon=False)
  stages = f', {len(spans)} stages split by dashed lines' if len(spans) > 1 else ''
  fig.suptitle(f'Op weights of the {"normal" if cell == "normal" else "reduction"} cell '
               f'(softmax over the ops still on{stages})', fontsize=11)
  return fig


def uses_betas(history: list) -> bool:
  """False when every recorded beta is 1.0 (a search without edge normalisation)."""
  return any(not np.allclose(r.get(f'betas_{cell}', 1.0), 1.0)
             for r in history for cell in reports.CELLS)


def betas_figure(history: list) -> Figure:
  """Edge-normalised betas over epochs: a panel per (cell, node), a line per incoming edge."""
  history = _search_order(history)
  n = len(history)
  x = np.arange(1, n + 1)
  spans = _stage_spans(history)
  fig = Figure(figsize=(15, 6.5), layout='constrained')
  grid = fig.subplots(2, genotypes.STEPS, sharex=True, sharey='row', squeeze=False)
  colors = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd')
  sources = ('c_{k-2}', 'c_{k-1}') + tuple(f'node {i}' for i in range(genotypes.STEPS))
  for row, cell in enumerate(reports.CELLS):
    betas = np.array([r[f'betas_{cell}'] for r in history], dtype=float)  # (n, 14)
    edge = 0
    for node in range(genotypes.STEPS):
      ax = grid[row, node]
      for j in range(node + 2):
        for i, (_, first, last) in enumerate(spans):  # each stage starts fresh betas
          ax.plot(x[first - 1:last], betas[first - 1:last, edge], color=colors[j],
                  linewidth=1.5, label=f'from {sources[j]}' if i == 0 else None,
                  marker='o' if last - first < 3 else None, markersize=3)
        edge += 1
      _mark_stages(ax, spans)
      _epoch_axis(ax, n)
      ax.set_ylim(0, 1)
      ax.set_title(f'{"normal" if cell == "normal" else "reduction"} cell, node {node}',
                   fontsize=10)
      ax.legend(fontsize=7.5, loc='upper left')
      ax.tick_params(labelleft=True)
    grid[row, 0].set_ylabel('beta (softmax over inputs)')
  for ax in grid[-1]:
    ax.set_xlabel('epoch (all stages)')
  fig.suptitle('Edge-normalisation weights (betas) of each node\'s incoming edges; the two '
               'largest alpha x beta pick the node\'s inputs', fontsize=11)
  return fig


def _stage_genotypes(rows: list) -> list:
  """(stage, row, genotype) of the last row of each stage that records one."""
  last = {}
  for row in _search_order(rows):
    if row.get('genotype'):
      last[int(row['stage'])] = row
  return [(s, r, genotypes.from_dict(r['genotype'])) for s, r in sorted(last.items())]


def stage_cells_figure(panels: list) -> Figure:
  """A grid of cell diagrams: `panels` lists (title, normal PNG, reduction PNG) per row."""
  images = [(title, matplotlib.image.imread(a), matplotlib.image.imread(b))
            for title, a, b in panels]
  col_w = [max(a.shape[1] for _, a, _ in images), max(b.shape[1] for _, _, b in images)]
  row_h = [max(a.shape[0], b.shape[0]) for _, a, b in images]
  scale = 1 / 150  # plot_cell renders at 150 dpi.
  fig = Figure(figsize=(sum(col_w) * scale + 0.4, sum(row_h) * scale + 0.45 * len(images) + 0.4),
               layout='constrained')
  grid = fig.subplots(len(images), 2, squeeze=False,
                      gridspec_kw={'width_ratios': col_w, 'height_ratios': row_h})
  for (title, normal, reduce_), axes in zip(images, grid):
    for ax, image, cell in zip(axes, (normal, reduce_), ('normal cell', 'reduction cell')):
      ax.imshow(image, interpolation='antialiased')
      ax.set_title(f'{title}: {cell}', fontsize=16, loc='left')
      ax.axis('off')
  return fig


# ---------------------------------------------------------------------------
# Training.

def train_curves_figure(rows: list) -> Figure:
  """Loss and accuracy (train/valid), lr and drop-path rate; the best epoch marked."""
  by_epoch = {int(r['epoch']): r for r in rows}
  rows = [by_epoch[e] for e in sorted(by_epoch)]
  x = np.array([r['epoch'] for r in rows])
  best = [r for r in rows if r.get('best')]
  best = best[-1] if best else None
  fig = Figure(figsize=(13, 7), layout='constrained')
  axes = fig.subplots(2, 2, sharex=True)
  panels = ((axes[0, 0], 'loss', 'Cross-entropy'), (axes[0, 1], 'acc', 'Accuracy'))
  for ax, key, title in panels:
    for split in ('train', 'valid'):
      if _has(rows, f'{split}_{key}'):
        ax.plot(x, _values(rows, f'{split}_{key}'), color=_SPLIT_COLORS[split], label=split,
                marker='o' if len(rows) <= 30 else None, markersize=3)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel('loss' if key == 'loss' else 'accuracy')
  for ax, key, title in ((axes[1, 0], 'lr', 'Learning rate'),
                         (axes[1, 1], 'drop_path_rate', 'Drop-path rate')):
    if _has(rows, key):
      ax.plot(x, _values(rows, key), color='black')
    ax.set_title(title, fontsize=10)
    ax.set_xlabel('epoch')
  for ax in axes.flat:
    ax.grid(alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
    if best is not None:
      ax.axvline(best['epoch'], color='#2ca02c', linestyle=':', linewidth=1.5,
                 label=f'best checkpoint (epoch {best["epoch"]})')
  if best is not None:
    for ax, key in ((axes[0, 0], 'valid_loss'), (axes[0, 1], 'valid_acc')):
      if best.get(key) is not None:
        ax.plot([best['epoch']], [best[key]], marker='*', markersize=14, color='#2ca02c',
                zorder=5)
        right = best['epoch'] > x[0] + 0.8 * (x[-1] - x[0])  # Near the right edge: write left.
        ax.annotate(f'{best[key]:.4f}', (best['epoch'], best[key]), textcoords='offset points',
                    xytext=(-10 if right else 10, 10 if key == 'valid_acc' else -16),
                    ha='right' if right else 'left', fontsize=9, color='#2ca02c',
                    bbox=dict(boxstyle='round,pad=0.15', facecolor='white', edgecolor='none',
                              alpha=0.8))
  for ax in axes[0]:
    ax.legend(fontsize=8)
  title = 'Training'
  if best is not None and best.get('valid_acc') is not None:
    title += (f': best valid accuracy {best["valid_acc"]:.4f} at epoch {best["epoch"]} '
              f'of {int(x[-1])}')
  fig.suptitle(title, fontsize=11)
  return fig


# ---------------------------------------------------------------------------

def plottable(run_dir: str) -> list:
  """The input files of `run_dir` that plot_run draws from."""
  return [name for name in INPUTS if os.path.isfile(os.path.join(run_dir, name))]


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> List[str]:
  """Draws every picture the files of `run_dir` allow into `out_dir` (`run_dir/plots`).

  Returns the paths written; raises FileNotFoundError (naming the folder) when the folder
  holds none of the files plotted."""
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f'{run_dir}: no such run folder.')
  if not plottable(run_dir):
    raise FileNotFoundError(f'{run_dir}: nothing to plot (none of {", ".join(INPUTS)}).')
  out_dir = out_dir or os.path.join(run_dir, PLOTS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  search_rows = read_rows(os.path.join(run_dir, SEARCH_METRICS))
  history = read_rows(os.path.join(run_dir, ARCH_HISTORY))
  train_rows = read_rows(os.path.join(run_dir, TRAIN_METRICS))
  genotype_path = os.path.join(run_dir, GENOTYPE)

  if search_rows:
    written.append(_save(search_curves_figure(search_rows),
                         os.path.join(out_dir, 'search_curves.png')))
  if history:
    for cell in reports.CELLS:
      written.append(_save(op_weights_figure(history, cell),
                           os.path.join(out_dir, f'op_weights_{cell}.png')))
    if uses_betas(history):
      written.append(_save(betas_figure(history), os.path.join(out_dir, 'betas.png')))

  cells_dir = os.path.join(out_dir, 'cells')
  panels = []
  for stage, row, genotype in _stage_genotypes(search_rows):
    paths = reports.plot_genotype(genotype, cells_dir, prefix=f'stage{stage}_')
    written += paths
    detail = (f' ({row["layers"]} cells, {row["ops_per_edge"]} ops/edge, epoch {row["epoch"]})'
              if row.get('layers') is not None else f' (epoch {row["epoch"]})')
    panels.append((f'stage {stage}{detail}', *paths))
  if os.path.isfile(genotype_path):
    genotype = genotypes.load(genotype_path)
    if panels:  # A search run: the final genotype (with the search's skip limit) last.
      paths = reports.plot_genotype(genotype, cells_dir, prefix='final_')
      written += paths
      panels.append(('final genotype.json', *paths))
    else:  # A training run: the cells it trains.
      written += reports.plot_genotype(genotype, out_dir, prefix='genotype_')
  if panels:
    written.append(_save(stage_cells_figure(panels), os.path.join(out_dir, 'stage_cells.png')))

  if train_rows:
    written.append(_save(train_curves_figure(train_rows),
                         os.path.join(out_dir, 'train_curves.png')))
  fgsm_path = os.path.join(run_dir, FGSM)
  if os.path.isfile(fgsm_path):
    from pcp_jax import analysis  # pylint: disable=g-import-not-at-top  (imports JAX)
    with open(fgsm_path) as f:
      results = json.load(f)
    missing = {'eps', 'accuracy', 'mean_true_prob'} - set(results)
    if missing:
      raise ValueError(f'{fgsm_path} is missing the keys {sorted(missing)}.')
    name = results.get('method') or os.path.basename(os.path.normpath(run_dir))
    written += analysis.plot_fgsm({name: results}, out_dir, prefix='fgsm')
  return written


def main(argv: Optional[Sequence[str]] = None) -> int:
  matplotlib.use('Agg')
  parser = argparse.ArgumentParser(
      prog='python -m pcp_jax.plots',
      description='Draws the pictures of run folders into RUN_DIR/plots/.')
  parser.add_argument('run_dirs', nargs='+', metavar='RUN_DIR')
  args = parser.parse_args(argv)
  status = 0
  for run_dir in args.run_dirs:
    try:
      paths = plot_run(run_dir)
    except (OSError, ValueError, KeyError) as e:
      message = str(e) if not isinstance(e, KeyError) else f'{run_dir}: a row lacks the key {e}'
      print(f'error: {message}', file=sys.stderr)
      status = 1
      continue
    print(f'{run_dir}: wrote {len(paths)} files to {os.path.join(run_dir, PLOTS_DIR)}')
  return status


if __name__ == '__main__':
  sys.exit(main())
