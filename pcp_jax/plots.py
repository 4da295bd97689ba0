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
- `fgsm.json` -> `fgsm_accuracy.png`, `fgsm_true_prob.png`, `fgsm_examples.png`;
- a population's `members/<k>/` and `population.json` -> its members overlaid
  (`population_plots`: `population_curves.png`, `population_op_weights_normal.png`,
  `population_op_weights_reduce.png`, `population_agreement.png`).

`plot_run(run_dir)` does the same from Python and returns the paths written. The figures come
from `curves` (the line charts) and `diagrams` (the cells), built with matplotlib's Figure API
(no pyplot) and saved to PNG by the Agg renderer, so importing this module leaves the caller's
backend (a notebook's, say) as it is; the command line selects Agg.
"""

import argparse
import os
import sys
from typing import List, Mapping, Optional, Sequence

import matplotlib
import matplotlib.image
from matplotlib.figure import Figure

from pcp_jax import curves
from pcp_jax import diagrams
from pcp_jax import genotypes
from pcp_jax import population_plots
from pcp_jax import runs

INPUTS = (runs.SEARCH_METRICS, runs.ARCH_HISTORY, runs.TRAIN_METRICS, runs.FGSM, runs.GENOTYPE)
DPI = 110
FGSM_DPI = 120
FGSM_KEYS = ('eps', 'accuracy', 'mean_true_prob')  # what an FGSM figure needs of fgsm.json


def _save(fig, path, dpi=DPI) -> str:
  fig.savefig(path, dpi=dpi)
  return path


def _stage_genotypes(rows: list) -> list:
  """(stage, row, genotype) of the last row of each stage that records one."""
  last = {}
  for row in curves.search_order(rows):
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
# FGSM.

def load_fgsm(path: str) -> dict:
  """An fgsm.json, checked for the keys the figures need (a one-line error naming it)."""
  record = runs.load_json(path)
  missing = set(FGSM_KEYS) - set(record)
  if missing:
    raise ValueError(f'{path} is missing the keys {sorted(missing)}.')
  return record


def plot_fgsm(results_by_name: Mapping[str, dict], out_dir: str, prefix: str = 'fgsm') -> list:
  """Plots `analysis.fgsm_sweep` results, one line per architecture name; returns the paths.

  Writes `{prefix}_accuracy.png`, `{prefix}_true_prob.png` (mean true-class probability)
  and `{prefix}_examples.png` (one panel per recorded example) to `out_dir`.
  """
  if not results_by_name:
    raise ValueError('plot_fgsm needs at least one architecture\'s results.')
  # Keys become strings in JSON; accept results straight from fgsm_sweep or from disk.
  results_by_name = {
      name: dict(r, examples={str(i): p for i, p in r.get('examples', {}).items()})
      for name, r in results_by_name.items()}
  os.makedirs(out_dir, exist_ok=True)
  stem = os.path.join(out_dir, prefix)
  paths = [
      _save(curves.fgsm_figure(results_by_name, 'accuracy', 'accuracy', 'Accuracy under FGSM'),
            f'{stem}_accuracy.png', dpi=FGSM_DPI),
      _save(curves.fgsm_figure(results_by_name, 'mean_true_prob', 'mean true-class probability',
                               'True-class probability under FGSM'),
            f'{stem}_true_prob.png', dpi=FGSM_DPI)]
  indices = sorted({i for r in results_by_name.values() for i in r['examples']}, key=int)
  if not indices:
    raise ValueError('plot_fgsm: no results hold any per-example curves.')
  paths.append(_save(curves.fgsm_examples_figure(results_by_name, indices),
                     f'{stem}_examples.png', dpi=FGSM_DPI))
  return paths


# ---------------------------------------------------------------------------
# A run folder.

def plottable(run_dir: str) -> list:
  """The input files of `run_dir` that plot_run draws from."""
  return [name for name in INPUTS if os.path.isfile(os.path.join(run_dir, name))]


def _plot_cells(search_rows: list, genotype_path: str, out_dir: str) -> list:
  """A search's cells per stage and its final genotype, with their grid; a training run's
  cells. Returns the paths written."""
  cells_dir = os.path.join(out_dir, 'cells')
  written, panels = [], []
  for stage, row, genotype in _stage_genotypes(search_rows):
    paths = diagrams.plot_genotype(genotype, cells_dir, prefix=f'stage{stage}_')
    written += paths
    detail = (f' ({row["layers"]} cells, {row["ops_per_edge"]} ops/edge, epoch {row["epoch"]})'
              if row.get('layers') is not None else f' (epoch {row["epoch"]})')
    panels.append((f'stage {stage}{detail}', *paths))
  if os.path.isfile(genotype_path):
    genotype = genotypes.load(genotype_path)
    if panels:  # A search run: the final genotype (with the search's skip limit) last.
      paths = diagrams.plot_genotype(genotype, cells_dir, prefix='final_')
      written += paths
      panels.append((f'final {runs.GENOTYPE}', *paths))
    else:  # A training run: the cells it trains.
      written += diagrams.plot_genotype(genotype, out_dir, prefix='genotype_')
  if panels:
    written.append(_save(stage_cells_figure(panels), os.path.join(out_dir, 'stage_cells.png')))
  return written


def plot_run(run_dir: str, out_dir: Optional[str] = None) -> List[str]:
  """Draws every picture the files of `run_dir` allow into `out_dir` (`run_dir/plots`).

  Returns the paths written; raises FileNotFoundError (naming the folder) when the folder
  holds none of the files plotted."""
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f'{run_dir}: no such run folder.')
  population = population_plots.is_population(run_dir)
  if not plottable(run_dir) and not population:
    raise FileNotFoundError(f'{run_dir}: nothing to plot (none of {", ".join(INPUTS)}, nor '
                            f'a population\'s {runs.MEMBERS_DIR}/).')
  out_dir = out_dir or os.path.join(run_dir, runs.PLOTS_DIR)
  os.makedirs(out_dir, exist_ok=True)
  written = population_plots.plot_population(run_dir, out_dir, DPI) if population else []
  search_rows, history, train_rows = (
      runs.Rows(os.path.join(run_dir, name), write=False).read()
      for name in (runs.SEARCH_METRICS, runs.ARCH_HISTORY, runs.TRAIN_METRICS))

  if search_rows:
    written.append(_save(curves.search_curves_figure(search_rows),
                         os.path.join(out_dir, 'search_curves.png')))
  if history:
    ordered = curves.search_order(search_rows)
    frozen = ([bool(r.get('arch_frozen')) for r in ordered]
              if len(ordered) == len(curves.search_order(history)) else None)
    genotype_path = os.path.join(run_dir, runs.GENOTYPE)
    genotype = genotypes.load(genotype_path) if os.path.isfile(genotype_path) else None
    for cell in diagrams.CELLS:
      written.append(_save(curves.op_weights_figure(history, cell, frozen, genotype),
                           os.path.join(out_dir, f'op_weights_{cell}.png')))
    written.append(_save(curves.arch_heatmap_figure(history, genotype),
                         os.path.join(out_dir, 'arch_heatmap.png')))
    if curves.uses_betas(history):
      written.append(_save(curves.betas_figure(history, frozen),
                           os.path.join(out_dir, 'betas.png')))
  written += _plot_cells(search_rows, os.path.join(run_dir, runs.GENOTYPE), out_dir)
  if train_rows:
    written.append(_save(curves.train_curves_figure(train_rows),
                         os.path.join(out_dir, 'train_curves.png')))
  fgsm_path = os.path.join(run_dir, runs.FGSM)
  if os.path.isfile(fgsm_path):
    results = load_fgsm(fgsm_path)
    name = results.get('method') or os.path.basename(os.path.normpath(run_dir))
    written += plot_fgsm({name: results}, out_dir, prefix='fgsm')
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
    print(f'{run_dir}: wrote {len(paths)} files to {os.path.join(run_dir, runs.PLOTS_DIR)}')
  return status


if __name__ == '__main__':
  sys.exit(main())
