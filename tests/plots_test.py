"""Tests of the run pictures (pcp_jax.plots) on a synthetic run folder."""

import collections
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from pcp_jax import curves
from pcp_jax import genotypes
from pcp_jax import plots
from pcp_jax import runs

STAGE_OPS = (8, 5, 3)
STAGE_LAYERS = (5, 11, 17)
STAGE_GENOTYPES = ('DARTS_V2', 'PC_DARTS_cifar', 'PDARTS')


def _write_rows(path, rows):
  with open(path, 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)


def synthetic_search(run_dir, epochs=5, warmup=2, betas=True, seed=0):
  """A 3-stage search folder (8 -> 5 -> 3 ops) in the drivers' file formats."""
  rng = np.random.default_rng(seed)
  os.makedirs(run_dir, exist_ok=True)
  logits = {c: rng.normal(0, 0.1, (genotypes.NUM_EDGES, genotypes.NUM_OPS)) for c in ('normal',
                                                                                         'reduce')}
  drift = {c: rng.normal(0, 0.25, logits[c].shape) for c in logits}
  beta_logits = {c: rng.normal(0, 0.1, genotypes.NUM_EDGES) for c in logits}
  switches = {c: genotypes.all_switches() for c in logits}  # the DARTS space
  metrics, history = [], []
  steps, step, elapsed = 40, 0, 0.0
  for s, (ops, layers) in enumerate(zip(STAGE_OPS, STAGE_LAYERS)):
    if s:  # Drop the weakest ops of each edge.
      for c in logits:
        for edge in range(genotypes.NUM_EDGES):
          on = np.flatnonzero(switches[c][edge])
          weakest = on[np.argsort(logits[c][edge, on])[:len(on) - ops]]
          switches[c][edge, weakest] = False
    for e in range(epochs):
      step += steps
      elapsed += 30.0 + s * 12
      frozen = e < warmup
      if not frozen:
        for c in logits:
          logits[c] += drift[c]
          beta_logits[c] += rng.normal(0, 0.3, genotypes.NUM_EDGES)
      g = (s * epochs + e + 1) / (3 * epochs)
      metrics.append({
          'stage': s + 1, 'epoch': e + 1, 'step': step,
          'train_loss': 2.2 - 1.2 * g + 0.05 * rng.normal(), 'train_acc': 0.2 + 0.5 * g,
          'valid_loss': 2.25 - 1.0 * g + 0.05 * rng.normal(), 'valid_acc': 0.18 + 0.45 * g,
          'lr': 0.0125 * (1 + np.cos(np.pi * e / epochs)), 'skip_dropout': 0.1 * (s + 1) * e / 4,
          'arch_frozen': frozen, 'arch_loss': 0.75 * (300 - 80 * g) + 0.25 * (2.3 - g),
          'arch_ce': 2.3 - g, 'arch_bt': 300 - 80 * g,
          'arch_ce_grad_norm': 0.01 * (1 + g), 'arch_bt_grad_norm': 5.0 / (1 + g),
          'arch_grad_cosine': 0.05 * rng.normal(), 'layers': layers, 'ops_per_edge': ops,
          'epoch_seconds': 30.0 + s * 12, 'elapsed_seconds': elapsed,
          'genotype': genotypes.to_dict(genotypes.REFERENCE_GENOTYPES[STAGE_GENOTYPES[s]])})
      row = {'stage': s + 1, 'epoch': e + 1, 'step': step,
             'primitives': list(genotypes.OPS)}
      for c in logits:
        weights = np.where(switches[c], np.exp(logits[c]), 0.0)
        row[f'alphas_{c}'] = (weights / weights.sum(1, keepdims=True)).round(6).tolist()
        row[f'betas_{c}'] = (genotypes.node_softmax(beta_logits[c]).round(6).tolist() if betas
                             else [1.0] * genotypes.NUM_EDGES)
        row[f'switches_{c}'] = switches[c].tolist()
      history.append(row)
  _write_rows(os.path.join(run_dir, runs.SEARCH_METRICS), metrics)
  _write_rows(os.path.join(run_dir, runs.ARCH_HISTORY), history)
  genotypes.save(genotypes.REFERENCE_GENOTYPES['PDARTS'], os.path.join(run_dir, 'genotype.json'))
  return run_dir


def synthetic_train(run_dir, epochs=30, fgsm=True, seed=0):
  rng = np.random.default_rng(seed)
  os.makedirs(run_dir, exist_ok=True)
  rows, best_acc = [], 0.0
  for e in range(1, epochs + 1):
    g = e / epochs
    valid_acc = 0.55 + 0.4 * (1 - np.exp(-4 * g)) - 0.1 * max(0, g - 0.8) + 0.01 * rng.normal()
    best = valid_acc > best_acc
    best_acc = max(best_acc, valid_acc)
    rows.append({'epoch': e, 'step': 100 * e, 'train_loss': 1.5 * np.exp(-3 * g),
                 'train_acc': 0.5 + 0.48 * g, 'valid_loss': 1.3 * np.exp(-2 * g) + 0.2,
                 'valid_acc': valid_acc, 'lr': 0.0125 * (1 + np.cos(np.pi * (e - 1) / epochs)),
                 'drop_path_rate': 0.2 * (e - 1) / epochs, 'epoch_seconds': 20.0,
                 'elapsed_seconds': 20.0 * e, 'best': bool(best)})
  _write_rows(os.path.join(run_dir, runs.TRAIN_METRICS), rows)
  genotypes.save(genotypes.REFERENCE_GENOTYPES['PDARTS'], os.path.join(run_dir, 'genotype.json'))
  if fgsm:
    eps = [0.0, 0.01, 0.02, 0.05, 0.1]
    with open(os.path.join(run_dir, runs.FGSM), 'w') as f:
      json.dump({'eps': eps, 'accuracy': [0.9 * np.exp(-20 * x) for x in eps],
                 'mean_true_prob': [0.85 * np.exp(-18 * x) for x in eps],
                 'examples': {str(i): [0.9 * np.exp(-(10 + 5 * i) * x) for x in eps]
                              for i in range(4)},
                 'method': 'SS PCP-DARTS'}, f)
  return run_dir, max(range(epochs), key=lambda i: (rows[i]['best'], i)) + 1


@pytest.fixture(scope='module')
def search_plots(tmp_path_factory):
  run_dir = synthetic_search(str(tmp_path_factory.mktemp('search')))
  return run_dir, plots.plot_run(run_dir)


def test_search_run_writes_every_picture(search_plots):
  run_dir, paths = search_plots
  out = os.path.join(run_dir, 'plots')
  names = sorted(os.path.relpath(p, out) for p in paths)
  assert names == sorted(
      ['search_curves.png', 'op_weights_normal.png', 'op_weights_reduce.png', 'betas.png',
       'arch_heatmap.png', 'stage_cells.png']
      + [f'cells/{prefix}_{cell}.png' for prefix in ('stage1', 'stage2', 'stage3', 'final')
         for cell in ('normal', 'reduce')])
  for path in paths:
    with Image.open(path) as image:
      assert image.format == 'PNG' and min(image.size) > 200
  # The stage grid: a row per stage (its last epoch's genotype) and the final genotype.json.
  cells = os.path.join(out, 'cells')
  fig = plots.stage_cells_figure(
      [(f'stage {s}', os.path.join(cells, f'stage{s}_normal.png'),
        os.path.join(cells, f'stage{s}_reduce.png')) for s in (1, 2, 3)])
  assert [ax.get_title(loc='left') for ax in fig.axes][:3] == [
      'stage 1: normal cell', 'stage 1: reduction cell', 'stage 2: normal cell']
  assert len(fig.axes) == 6


def test_op_weights_figure_has_14_panels_a_line_per_op_still_on(tmp_path):
  history = runs.Rows(os.path.join(synthetic_search(str(tmp_path)), runs.ARCH_HISTORY)).read()
  fig = curves.op_weights_figure(history, 'normal')
  panels = fig.axes
  assert len(panels) == genotypes.NUM_EDGES == 14
  assert [ax.get_title() for ax in panels] == curves.edge_names()
  assert panels[0].get_title() == 'c_{k-2} \u2192 node 0'
  assert panels[-1].get_title() == 'node 2 \u2192 node 3'
  # Each panel: a line per op ever on (one segment per stage, no line across a boundary: each
  # stage starts fresh weights); a dropped op's line stops at its last stage.
  for ax in panels:
    labelled = [line for line in ax.get_lines() if line.get_label() in genotypes.OPS]
    assert len(labelled) == len(genotypes.PRIMITIVES)
    points = collections.Counter()
    for line in ax.get_lines():
      if line.get_linestyle() != '--':
        xs = line.get_xdata()
        assert (min(xs) - 1) // 5 == (max(xs) - 1) // 5  # within one stage
        points[line.get_color()] += int(np.isfinite(line.get_ydata()).sum())
    assert sorted(points.values()) == [5] * 3 + [10] * 2 + [15] * 3  # 8, 5, 3 ops; 5 epochs
  # Two dashed stage boundaries per panel, at the global epochs 5.5 and 10.5.
  boundaries = [line.get_xdata()[0] for line in panels[0].get_lines()
                if line.get_linestyle() == '--']
  assert boundaries == [5.5, 10.5]
  # One shared legend naming the 8 ops that were on (not the S4 space's noise).
  assert len(fig.legends) == 1
  assert [t.get_text() for t in fig.legends[0].get_texts()] == list(genotypes.PRIMITIVES)


def test_search_curves_mark_stages_and_plot_every_epoch(tmp_path):
  rows = runs.Rows(os.path.join(synthetic_search(str(tmp_path)), runs.SEARCH_METRICS)).read()
  fig = curves.search_curves_figure(rows[::-1])  # Any order: sorted by (stage, epoch).
  titles = [ax.get_title() for ax in fig.axes]
  assert 'Architecture loss: Barlow Twins part' in titles and 'Skip-connect dropout' in titles
  ce = fig.axes[0]
  color = [line for line in ce.get_lines() if line.get_label() == 'valid'][0].get_color()
  segments = [line for line in ce.get_lines() if line.get_color() == color]
  assert [list(line.get_xdata()) for line in segments] == [  # one segment per stage
      list(range(1, 6)), list(range(6, 11)), list(range(11, 16))]
  assert np.allclose(np.concatenate([line.get_ydata() for line in segments]),
                     [r['valid_loss'] for r in rows])
  assert sorted(t.get_text() for t in ce.texts) == ['stage 1', 'stage 2', 'stage 3']
  assert '5 cells, 8 ops/edge' in fig._suptitle.get_text()  # pylint: disable=protected-access


def test_betas_skipped_without_edge_normalisation(tmp_path):
  run_dir = synthetic_search(str(tmp_path / 'p_darts'), betas=False)
  names = [os.path.basename(p) for p in plots.plot_run(run_dir)]
  assert 'betas.png' not in names and 'op_weights_reduce.png' in names


def test_training_run_marks_the_best_epoch_and_plots_fgsm(tmp_path):
  run_dir, best_epoch = synthetic_train(str(tmp_path / 'train'))
  paths = plots.plot_run(run_dir)
  assert sorted(os.path.basename(p) for p in paths) == [
      'fgsm_accuracy.png', 'fgsm_examples.png', 'fgsm_true_prob.png', 'genotype_normal.png',
      'genotype_reduce.png', 'train_curves.png']
  rows = runs.Rows(os.path.join(run_dir, runs.TRAIN_METRICS)).read()
  fig = curves.train_curves_figure(rows)
  marked = {line.get_xdata()[0] for ax in fig.axes for line in ax.get_lines()
            if line.get_label().startswith('best checkpoint')}
  assert marked == {best_epoch}
  assert f'at epoch {best_epoch} of 30' in fig._suptitle.get_text()  # pylint: disable=protected-access


def test_a_run_with_a_row_cut_short_is_still_drawn(tmp_path):
  run_dir, _ = synthetic_train(str(tmp_path / 'train'), fgsm=False)
  with open(os.path.join(run_dir, runs.TRAIN_METRICS), 'a') as f:
    f.write('{"epoch": 31, "trai')  # a row being written
  assert 'train_curves.png' in [os.path.basename(p) for p in plots.plot_run(run_dir)]


def fake_fgsm(seed, eps=(0.0, 0.01, 0.05)):
  rng = np.random.default_rng(seed)
  decay = np.exp(-np.array(eps) * rng.uniform(5, 20))
  return {'eps': list(eps), 'accuracy': list(0.9 * decay),
          'mean_true_prob': list(0.8 * decay),
          'examples': {str(i): list(rng.uniform() * decay) for i in (0, 4, 7)}}


def test_plot_fgsm_draws_a_line_per_architecture(tmp_path, monkeypatch):
  # One set of results as if loaded from JSON (string keys), one straight from code.
  from_disk, from_code = fake_fgsm(0), fake_fgsm(1)
  from_code['examples'] = {int(k): v for k, v in from_code['examples'].items()}
  figures = []
  for name in ('fgsm_figure', 'fgsm_examples_figure'):
    build = getattr(curves, name)
    monkeypatch.setattr(curves, name,
                        lambda *args, build=build: figures.append(build(*args)) or figures[-1])
  paths = plots.plot_fgsm({'PC-DARTS': from_disk, 'SS PCP ssf=1': from_code},
                          str(tmp_path / 'plots'))
  assert [os.path.basename(p) for p in paths] == [
      'fgsm_accuracy.png', 'fgsm_true_prob.png', 'fgsm_examples.png']
  accuracy, true_prob, examples = figures
  for fig, key in ((accuracy, 'accuracy'), (true_prob, 'mean_true_prob')):
    lines = fig.axes[0].get_lines()
    assert [line.get_label() for line in lines] == ['PC-DARTS', 'SS PCP ssf=1']
    assert np.allclose(lines[1].get_ydata(), from_code[key])
  # A row per recorded example (its image, its curve), whichever the key type.
  panels = examples.axes[1::2]
  assert len(panels) == 3
  assert np.allclose(panels[2].get_lines()[1].get_ydata(), from_code['examples'][7])
  # eps in x/255, as the paper's Fig. 13.
  assert np.allclose(accuracy.axes[0].get_lines()[0].get_xdata(), [0, 2.55, 12.75])


def test_fgsm_examples_show_the_image_the_true_class_and_each_prediction(tmp_path):
  eps = [0.0, 1 / 255, 8 / 255]
  image = np.zeros((32, 32, 3), np.uint8).tolist()
  results = dict(fake_fgsm(0, eps), num_examples=32, class_names=['airplane', 'cat'] + ['x'] * 8,
                 example_details={str(i): {'label': 1, 'predictions': [1, 1, 0], 'image': image}
                                  for i in (0, 4, 7)})
  accuracy = curves.fgsm_figure({'PC-DARTS': results}, 'accuracy', 'accuracy', 'Accuracy')
  assert accuracy.axes[0].get_title() == 'Accuracy (n = 32 test images)'
  assert [t.get_text() for t in accuracy.axes[0].get_xticklabels()] == ['0', '1', '8']
  fig = curves.fgsm_examples_figure({'PC-DARTS': results}, ['0', '4', '7'])
  image_ax, curve_ax = fig.axes[:2]
  assert len(image_ax.get_images()) == 1 and image_ax.get_title() == '#0: cat'
  assert [t.get_text() for t in curve_ax.texts] == ['cat', 'cat', 'airplane']


def test_plot_fgsm_without_results_or_examples_says_so(tmp_path):
  with pytest.raises(ValueError, match='at least one'):
    plots.plot_fgsm({}, str(tmp_path))
  with pytest.raises(ValueError, match='per-example'):
    plots.plot_fgsm({'a': dict(fake_fgsm(0), examples={})}, str(tmp_path))


def test_plot_run_names_an_empty_folder(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='empty: nothing to plot'):
    plots.plot_run(str(tmp_path / 'empty'))


@pytest.mark.slow
def test_cli_one_line_error_for_a_folder_with_nothing_to_plot(tmp_path):
  (tmp_path / 'empty_run').mkdir()
  run_dir, _ = synthetic_train(str(tmp_path / 'train'), fgsm=False)
  result = subprocess.run(
      [sys.executable, '-m', 'pcp_jax.plots', str(tmp_path / 'empty_run'), run_dir],
      capture_output=True, text=True, check=False, timeout=120)
  assert result.returncode == 1
  errors = result.stderr.strip().splitlines()
  assert len(errors) == 1 and 'empty_run' in errors[0] and 'nothing to plot' in errors[0]
  # The other folder is still drawn.
  assert 'train: wrote 3 files' in result.stdout
  assert os.path.isfile(os.path.join(run_dir, 'plots', 'train_curves.png'))


def test_op_weights_show_small_moves_the_warm_up_and_the_chosen_ops(tmp_path):
  run_dir = synthetic_search(str(tmp_path))
  history = runs.Rows(os.path.join(run_dir, runs.ARCH_HISTORY)).read()
  rows = runs.Rows(os.path.join(run_dir, runs.SEARCH_METRICS)).read()
  # Moves of 1e-3 around 1/8: each panel's scale is its own, not 0..1.
  for h in history:
    h['alphas_normal'] = (np.asarray(genotypes.all_switches(), float) / 8 + 1e-3 * np.random.
                          default_rng(h['step']).uniform(size=(14, 9))).tolist()
  genotype = genotypes.load(os.path.join(run_dir, runs.GENOTYPE))
  frozen = [r['arch_frozen'] for r in rows]
  fig = curves.op_weights_figure(history, 'normal', frozen, genotype)
  low, high = fig.axes[0].get_ylim()
  assert high - low < 0.01
  chosen = curves.chosen_edges(genotype, 'normal')
  assert len(chosen) == 8
  for edge, ax in enumerate(fig.axes):
    stars = [line for line in ax.get_lines() if line.get_marker() == '*']
    assert len(stars) == (edge in chosen)
    assert (ax.title.get_fontweight() == 'bold') == (edge in chosen)
    assert len(ax.patches) == sum(frozen)  # a shaded span per frozen epoch
  heat = curves.arch_heatmap_figure(history, genotype)
  boxes = [p for ax in heat.axes[:2] for p in ax.patches]
  assert len(boxes) == 16  # 8 choices per cell
