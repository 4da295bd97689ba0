"""The line charts of a run's records, as matplotlib Figures (`plots` writes them to files).

Search rows (search_metrics.jsonl, arch_history.jsonl) are drawn over the global epoch, the
stages split by dashed lines; training rows (train_metrics.jsonl) over the epoch; FGSM
results (fgsm.json) over eps. Built with matplotlib's Figure API (no pyplot), so drawing
leaves the caller's backend as it is.
"""


import matplotlib.lines
import matplotlib.patches
from matplotlib import transforms
from matplotlib.figure import Figure
import numpy as np

from pcp_jax import diagrams
from pcp_jax import genotypes

# One colour per op, the same in every figure (tab10 without its grey).
OP_COLORS = dict(zip(genotypes.OPS, (
    '#7f7f7f', '#1f77b4', '#17becf', '#d62728', '#2ca02c', '#bcbd22', '#9467bd', '#ff7f0e',
    '#e377c2')))
_SPLIT_COLORS = {'train': '#1f77b4', 'valid': '#d62728'}


def search_order(rows: list) -> list:
  """Rows sorted by (stage, epoch), the last one kept where an epoch repeats (a resume)."""
  by_epoch = {(int(r['stage']), int(r['epoch'])): r for r in rows}
  return [by_epoch[key] for key in sorted(by_epoch)]


def _values(rows, key) -> np.ndarray:
  return np.array([np.nan if r.get(key) is None else float(r[key]) for r in rows])


def _has(rows, key) -> bool:
  return any(r.get(key) is not None for r in rows)


def stage_spans(rows) -> list:
  """(stage, first x, last x) per stage; x is the global epoch (1-based)."""
  spans = []
  for x, row in enumerate(rows, 1):
    if spans and spans[-1][0] == row['stage']:
      spans[-1][2] = x
    else:
      spans.append([row['stage'], x, x])
  return [tuple(span) for span in spans]


def mark_stages(ax, spans, frozen=None, label=False):
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


def epoch_axis(ax, n):
  ax.set_xlim(0.5, n + 0.5)
  ax.grid(alpha=0.3)
  ax.xaxis.get_major_locator().set_params(integer=True)


# ---------------------------------------------------------------------------
# Search.

def _collapse_panels(lines, axes) -> None:
  """The collapse indicators (`collapse`): curvature, its convergence, skips, entropy."""
  lines(axes[0], [('curvature', 'largest eigenvalue', '#d62728')],
        'Curvature: largest eigenvalue of the arch Hessian', 'eigenvalue')
  lines(axes[1], [('skip_normal', 'skip connections', '#d62728')],
        'Skip connections in the normal cell', 'count')
  lines(axes[2], [('entropy_normal', 'normal cell', '#1f77b4'),
                  ('entropy_reduce', 'reduction cell', '#ff7f0e')],
        'Mean entropy of the op weights per edge', 'nats')
  lines(axes[3], [('curvature_change', 'relative change, last 5 products', 'black')],
        'Curvature estimate: Lanczos convergence', 'relative change', log=True)


def search_curves_figure(rows: list) -> Figure:
  """Losses, accuracies, architecture loss parts and gradients, lr and skip dropout; the
  collapse indicators (curvature, skip connections, alpha entropy) in the last row."""
  rows = search_order(rows)
  n = len(rows)
  x = np.arange(1, n + 1)
  spans = stage_spans(rows)
  frozen = [bool(r.get('arch_frozen')) for r in rows]
  fig = Figure(figsize=(17, 11), layout='constrained')
  axes = fig.subplots(3, 4, sharex=True)

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
          xs, vs = x[first - 1:last], v[first - 1:last]
          measured = np.isfinite(vs)  # a value every few epochs (the curvature) is one line
          ax.plot(xs[measured], vs[measured], marker='o', markersize=3,
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
  _collapse_panels(lines, axes[2])
  for ax in axes.flat:
    epoch_axis(ax, n)
    mark_stages(ax, spans, frozen, label=True)
  for ax in axes[2]:
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
  """`genotypes.edge_name` of each edge, in the genotypes' edge order."""
  return [genotypes.edge_name(e) for e in range(genotypes.NUM_EDGES)]


def chosen_edges(genotype, cell: str) -> dict:
  """{edge index: op} of the edges the `cell` of `genotype` keeps."""
  return {genotypes.NODE_EDGES[k // 2].start + j: op
          for k, (op, j) in enumerate(getattr(genotype, cell))}


def op_weights_figure(history: list, cell: str, frozen=None, genotype=None) -> Figure:
  """The DARTS papers' op-weight figure: 14 panels (a row per node, a column per input), one
  line per op (softmaxed alphas), ending where the op is switched off. Each panel has its own
  scale, so that small moves show; `frozen` (a bool per row) shades the warm-up epochs and
  `genotype` marks each kept edge's op with a star and its panel's title."""
  history = search_order(history)
  n = len(history)
  x = np.arange(1, n + 1)
  spans = stage_spans(history)
  primitives = history[0].get('primitives', list(genotypes.PRIMITIVES))
  alphas = np.array([r[f'alphas_{cell}'] for r in history], dtype=float)  # (n, 14, ops)
  switches = np.array([r.get(f'switches_{cell}', np.ones(alphas.shape[1:], bool))
                       for r in history], dtype=bool)
  alphas = np.where(switches, alphas, np.nan)
  rows, cols = genotypes.STEPS, genotypes.STEPS + 1
  fig = Figure(figsize=(3.0 * cols, 2.25 * rows + 0.9), layout='constrained')
  grid = fig.subplots(rows, cols, sharex=True, squeeze=False)
  names = edge_names()
  chosen = {} if genotype is None else chosen_edges(genotype, cell)
  for edge, (i, node) in enumerate(genotypes.EDGES):  # a row per node, a column per input
    ax = grid[node, i]
    for op_index, op in enumerate(primitives):
      series = alphas[:, edge, op_index]
      if np.isfinite(series).any():
        # Each stage starts fresh architecture weights: no line across a stage boundary.
        for i, (_, first, last) in enumerate(spans):
          ax.plot(x[first - 1:last], series[first - 1:last], color=OP_COLORS.get(op),
                  linewidth=1.4, label=op if i == 0 else None,
                  marker='o' if last - first < 3 else None, markersize=3)
    mark_stages(ax, spans, frozen)
    epoch_axis(ax, n)
    found = alphas[:, edge][np.isfinite(alphas[:, edge])]
    if found.size:
      pad = max(0.08 * (found.max() - found.min()), 1e-4)
      ax.set_ylim(found.min() - pad, found.max() + pad)
    title = names[edge]
    if edge in chosen and chosen[edge] in primitives:
      op = chosen[edge]
      series = alphas[:, edge, primitives.index(op)]
      last = np.flatnonzero(np.isfinite(series))
      if last.size:
        ax.plot(x[last[-1]], series[last[-1]], marker='*', markersize=12, zorder=5,
                color=OP_COLORS.get(op), markeredgecolor='black')
      title = f'{title}: {op}'
    ax.set_title(title, fontsize=9, fontweight='bold' if edge in chosen else 'normal')
    ax.tick_params(labelsize=8, labelbottom=True, labelleft=True)
  for (node, i), ax in np.ndenumerate(grid):
    if i >= node + 2:  # no such edge
      ax.remove()
  for node in range(rows):
    grid[node, 0].set_ylabel('softmax weight', fontsize=8)
  for j in range(cols):
    grid[min(rows - 1, max(0, j - 1)), j].set_xlabel('epoch (all stages)', fontsize=8)
  ever_on = [op for k, op in enumerate(primitives) if switches[..., k].any()]
  handles = [matplotlib.lines.Line2D([], [], color=OP_COLORS.get(op), linewidth=2, label=op)
             for op in ever_on]
  fig.legend(handles=handles, loc='outside lower center', ncol=len(ever_on), fontsize=9,
             frameon=False)
  stages = f', {len(spans)} stages split by dashed lines' if len(spans) > 1 else ''
  marks = ('; shaded: architecture frozen' if frozen is not None and any(frozen) else '') + (
      '; \u2605 and bold: the genotype\'s choice' if chosen else '')
  fig.suptitle(f'Op weights of the {"normal" if cell == "normal" else "reduction"} cell '
               f'(softmax over the ops still on, each panel on its own scale{stages}{marks})',
               fontsize=11)
  return fig


def arch_heatmap_figure(history: list, genotype=None) -> Figure:
  """The final op weights (the last row's softmaxed alphas) as an edge x op map per cell,
  over the ops ever on; `genotype`'s choices boxed."""
  last = search_order(history)[-1]
  primitives = last.get('primitives', list(genotypes.PRIMITIVES))
  fig = Figure(figsize=(13, 6.5), layout='constrained')
  for ax, cell in zip(fig.subplots(1, 2, squeeze=False)[0], diagrams.CELLS):
    probs = np.asarray(last[f'alphas_{cell}'], float)
    on = np.asarray(last.get(f'switches_{cell}', np.ones(probs.shape, bool)), bool)
    cols = [k for k in range(len(primitives)) if on[:, k].any()]
    data = np.where(on, probs, np.nan)[:, cols]
    image = ax.imshow(data, cmap='viridis', aspect='auto', vmin=0, vmax=np.nanmax(data))
    ax.set_xticks(range(len(cols)), [primitives[k] for k in cols], rotation=40, ha='right',
                  fontsize=8)
    ax.set_yticks(range(genotypes.NUM_EDGES), edge_names(), fontsize=8)
    for (e, c), value in np.ndenumerate(data):
      if np.isfinite(value):
        ax.text(c, e, f'{value:.2f}', ha='center', va='center', fontsize=7,
                color='white' if value < 0.6 * np.nanmax(data) else 'black')
    for e, op in ({} if genotype is None else chosen_edges(genotype, cell)).items():
      if op in primitives and primitives.index(op) in cols:
        ax.add_patch(matplotlib.patches.Rectangle(
            (cols.index(primitives.index(op)) - 0.5, e - 0.5), 1, 1, fill=False,
            edgecolor='#d62728', linewidth=2.2))
    ax.set_title(f'{"normal" if cell == "normal" else "reduction"} cell', fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.8, label='softmax weight')
  boxed = '; boxed: the genotype\'s choices' if genotype is not None else ''
  fig.suptitle(f'Final op weights, stage {last["stage"]} epoch {last["epoch"]} (blank: ops '
               f'off){boxed}', fontsize=11)
  return fig


def uses_betas(history: list) -> bool:
  """False when every recorded beta is 1.0 (a search without edge normalisation)."""
  return any(not np.allclose(r.get(f'betas_{cell}', 1.0), 1.0)
             for r in history for cell in diagrams.CELLS)


def betas_figure(history: list, frozen=None) -> Figure:
  """Edge-normalised betas over epochs: a panel per (cell, node), a line per incoming edge;
  `frozen` (a bool per row) shades the warm-up epochs."""
  history = search_order(history)
  n = len(history)
  x = np.arange(1, n + 1)
  spans = stage_spans(history)
  fig = Figure(figsize=(15, 6.5), layout='constrained')
  grid = fig.subplots(2, genotypes.STEPS, sharex=True, sharey='row', squeeze=False)
  colors = ('#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd')
  for row, cell in enumerate(diagrams.CELLS):
    betas = np.array([r[f'betas_{cell}'] for r in history], dtype=float)  # (n, 14)
    for edge, (i, node) in enumerate(genotypes.EDGES):  # a panel per node, a line per input
      for k, (_, first, last) in enumerate(spans):  # each stage starts fresh betas
        grid[row, node].plot(
            x[first - 1:last], betas[first - 1:last, edge], color=colors[i], linewidth=1.5,
            label=f'from {genotypes.state_name(i)}' if k == 0 else None,
            marker='o' if last - first < 3 else None, markersize=3)
    for node, ax in enumerate(grid[row]):
      mark_stages(ax, spans, frozen)
      epoch_axis(ax, n)
      ax.set_ylim(0, 1)
      ax.set_title(f'{"normal" if cell == "normal" else "reduction"} cell, node {node}',
                   fontsize=10)
      ax.tick_params(labelleft=True)
    grid[row, 0].set_ylabel('beta (softmax over inputs)')
  for ax in grid[-1]:
    ax.set_xlabel('epoch (all stages)')
  handles = [matplotlib.lines.Line2D([], [], color=colors[i], linewidth=2,
                                     label=f'from {genotypes.state_name(i)}')
             for i in range(genotypes.STEPS + 1)]
  fig.legend(handles=handles, loc='outside lower center', ncol=len(handles), fontsize=9,
             frameon=False)
  shaded = '; shaded: architecture frozen' if frozen is not None and any(frozen) else ''
  fig.suptitle('Edge-normalisation weights (betas) of each node\'s incoming edges; the two '
               f'largest alpha x beta pick the node\'s inputs{shaded}', fontsize=11)
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
# FGSM.

def _eps_axis(ax, results_by_name: dict) -> None:
  """The eps axis in the paper's units: k/255 of the pixel range, ticks at the eps run."""
  eps = sorted({round(255 * e, 6) for r in results_by_name.values() for e in r['eps']})
  ax.set_xticks(eps, [f'{e:g}' for e in eps])
  ax.set_xlabel('FGSM eps (x/255 of the pixel range)')


def _sample_size(results_by_name: dict) -> str:
  sizes = {r.get('num_examples') for r in results_by_name.values()} - {None}
  return f' (n = {sizes.pop()} test images)' if len(sizes) == 1 else ''


def fgsm_figure(results_by_name: dict, key: str, ylabel: str, title: str) -> Figure:
  """`key` of `analysis.fgsm_sweep` results over eps (in x/255), one line per architecture
  name; the number of attacked images in the title."""
  fig = Figure(figsize=(6, 4.5), layout='constrained')
  ax = fig.add_subplot()
  for name, results in results_by_name.items():
    ax.plot([255 * e for e in results['eps']], results[key], marker='o', markersize=3,
            label=name)
  _eps_axis(ax, results_by_name)
  ax.set_ylabel(ylabel)
  ax.set_title(title + _sample_size(results_by_name))
  ax.set_ylim(-0.02, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  return fig


def fgsm_examples_figure(results_by_name: dict, indices: list) -> Figure:
  """A row per recorded example (`indices`, string keys of `examples`): the image with its
  true class, and its true-class probability over eps, one line per architecture name, each
  point labelled with the predicted class where a single architecture is drawn."""
  fig = Figure(figsize=(7.5, 2.6 * len(indices)), layout='constrained')
  axes = fig.subplots(len(indices), 2, squeeze=False, width_ratios=(1, 2.6))
  names = next((r.get('class_names') for r in results_by_name.values()
                if r.get('class_names')), None)

  def label(k):
    return names[k] if names and 0 <= k < len(names) else f'class {k}'

  for (image_ax, ax), index in zip(axes, indices):
    details = next((r.get('example_details', {}).get(index) for r in results_by_name.values()
                    if index in r.get('example_details', {})), None)

    image_ax.axis('off')
    if details is not None:
      pixels = np.asarray(details['image'], np.uint8)
      image_ax.imshow(pixels[..., 0] if pixels.shape[-1] == 1 else pixels,
                      cmap='gray' if pixels.shape[-1] == 1 else None, interpolation='nearest')
      image_ax.set_title(f'#{index}: {label(details["label"])}', fontsize=9)
    for name, results in results_by_name.items():
      if index in results['examples']:
        x = [255 * e for e in results['eps']]
        ax.plot(x, results['examples'][index], marker='o', markersize=3, label=name)
        shown = results.get('example_details', {}).get(index)
        if len(results_by_name) == 1 and shown:
          for xi, p, k in zip(x, results['examples'][index], shown['predictions']):
            ax.annotate(label(k), (xi, p), textcoords='offset points', xytext=(0, 5),
                        ha='center', fontsize=7,
                        color='#2ca02c' if k == shown['label'] else '#d62728')
    _eps_axis(ax, results_by_name)
    ax.set_ylabel('true-class probability', fontsize=8)
    ax.set_ylim(-0.02, 1.12)
    ax.grid(alpha=0.3)
  axes[0, 1].legend(fontsize='small')
  fig.suptitle('FGSM, example by example: predicted class at each eps (green: correct)'
               + _sample_size(results_by_name), fontsize=10)
  return fig
