"""Pictures of a population of searches (`population`): its members overlaid.

`plot_population(RUN)` (through `plots.plot_run`) reads `RUN/members/<k>/`'s
search_metrics.jsonl and arch_history.jsonl and `RUN/population.json`, and writes:

- `population_curves.png`: each search metric, a thin curve per member and the members' mean
  ± std band, one colour per ss_factor (the band per ss_factor group);
- `population_op_weights_normal.png`, `population_op_weights_reduce.png`: per edge, each op's
  softmaxed weight as the members' mean ± std band (a line style per ss_factor group when
  the sweep has several), each panel on its own scale as in the solo op-weight figures. A
  member whose progressive stage switched an op off leaves that op's band: the band is over
  the members that have the op on;
- `population_agreement.png` (once population.json is written): per cell, an edge x op map
  of how many members' genotypes chose each op on each edge (the edge names its input).
"""

import dataclasses
import os
from typing import List, Optional

import matplotlib.lines
from matplotlib.figure import Figure
import numpy as np

from pcp_jax import curves
from pcp_jax import diagrams
from pcp_jax import genotypes
from pcp_jax import runs

# One colour per ss_factor group.
GROUP_COLORS = ('#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2',
                '#17becf')
GROUP_STYLES = ('-', '--', ':', '-.')
# (metric, panel title) of population_curves.png, drawn where some member records it.
CURVES = (('train_loss', 'Cross-entropy (train)'), ('valid_loss', 'Cross-entropy (valid)'),
          ('train_acc', 'Accuracy (train)'), ('valid_acc', 'Accuracy (valid)'),
          ('arch_loss', 'Architecture loss (total)'), ('arch_ce', 'Architecture loss: CE part'),
          ('arch_bt', 'Architecture loss: Barlow Twins part'),
          ('arch_grad_cosine', 'Cosine of the CE and BT gradients'),
          ('arch_ce_grad_norm', '|grad| of the CE part'),
          ('skip_normal', 'Skip connections in the normal cell'),
          ('entropy_normal', 'Op-weight entropy per edge, normal cell'),
          ('entropy_reduce', 'Op-weight entropy per edge, reduction cell'))


@dataclasses.dataclass
class Member:
  """One member's records: its search rows (by stage and epoch) and its genotype."""
  index: int
  seed: Optional[int]
  ss_factor: Optional[float]
  metrics: list
  history: list
  genotype: Optional[genotypes.Genotype] = None


def is_population(run_dir: str) -> bool:
  """Whether `run_dir` is a population's folder (population.json, or members/ while it runs)."""
  return (os.path.isfile(os.path.join(run_dir, runs.POPULATION))
          or os.path.isdir(os.path.join(run_dir, runs.MEMBERS_DIR)))


def _entries(run_dir: str) -> List[dict]:
  """population.json's members, or (before it is written) the member folders with their
  config.json's seed and ss_factor."""
  path = os.path.join(run_dir, runs.POPULATION)
  summary = runs.load_json(path)
  if summary:
    for i, entry in enumerate(summary.get('members', [])):
      missing = [key for key in ('member', 'folder') if key not in entry]
      if missing:
        raise ValueError(f'{path}: member {i} lacks {", ".join(map(repr, missing))}.')
    return summary.get('members', [])
  folder = os.path.join(run_dir, runs.MEMBERS_DIR)
  names = sorted((n for n in os.listdir(folder) if n.isdigit()), key=int)
  entries = []
  for name in names:
    config = runs.load_json(os.path.join(folder, name, runs.CONFIG))
    entries.append({'member': int(name), 'seed': config.get('seed'),
                    'ss_factor': config.get('search', {}).get('ss_factor'),
                    'folder': os.path.join(runs.MEMBERS_DIR, name)})
  return entries


def load_members(run_dir: str) -> List[Member]:
  """The members of the population folder `run_dir`, in member order."""
  members = []
  for entry in _entries(run_dir):
    folder = os.path.join(run_dir, entry['folder'])
    metrics, history = (curves.search_order(runs.Rows(os.path.join(folder, name),
                                                      write=False).read())
                        for name in (runs.SEARCH_METRICS, runs.ARCH_HISTORY))
    genotype = entry.get('genotype')
    members.append(Member(int(entry['member']), entry.get('seed'), entry.get('ss_factor'),
                          metrics, history,
                          genotypes.from_dict(genotype) if genotype else None))
  return members


def groups(members: List[Member]) -> dict:
  """{ss_factor: positions in `members`}, in the order the ss_factors first appear."""
  out = {}
  for position, member in enumerate(members):
    out.setdefault(member.ss_factor, []).append(position)
  return out


def epochs(row_lists) -> list:
  """The (stage, epoch) of every row of any member, in order."""
  return sorted({(int(r['stage']), int(r['epoch'])) for rows in row_lists for r in rows})


def aligned(row_lists, key: str, keys: list) -> np.ndarray:
  """(members, epochs) values of `key` at the epochs `keys`; NaN where a member has no row or
  no value, and where an architecture metric is 0 in a frozen epoch (no architecture step)."""
  out = np.full((len(row_lists), len(keys)), np.nan)
  where = {k: i for i, k in enumerate(keys)}
  for m, rows in enumerate(row_lists):
    for r in rows:
      value = r.get(key)
      frozen_zero = key.startswith('arch_') and r.get('arch_frozen') and value == 0
      if value is not None and not frozen_zero:
        out[m, where[(int(r['stage']), int(r['epoch']))]] = float(value)
  return out


def band(values, axis: int = 0):
  """(mean, std, count) of the finite `values` along `axis` (std with ddof 0, as
  population_metrics.jsonl's); NaN where no value is finite."""
  values = np.asarray(values, float)
  finite = np.isfinite(values)
  count = finite.sum(axis)
  with np.errstate(invalid='ignore', divide='ignore'):
    mean = np.where(finite, values, 0.0).sum(axis) / count
    spread = np.where(finite, values - np.expand_dims(mean, axis), 0.0)
    std = np.sqrt((spread ** 2).sum(axis) / count)
  return mean, std, count


def op_weights(row_lists, cell: str, keys: list) -> np.ndarray:
  """(members, epochs, 14, NUM_OPS) softmaxed weights of `cell`, over `genotypes.OPS`; NaN
  where a member's op is off or it has no row."""
  out = np.full((len(row_lists), len(keys), genotypes.NUM_EDGES, genotypes.NUM_OPS), np.nan)
  where = {k: i for i, k in enumerate(keys)}
  for m, rows in enumerate(row_lists):
    for r in rows:
      names = r.get('primitives', list(genotypes.PRIMITIVES))
      alphas = np.asarray(r[f'alphas_{cell}'], float)
      on = np.asarray(r.get(f'switches_{cell}', np.ones(alphas.shape, bool)), bool)
      columns = [genotypes.OPS.index(name) for name in names]
      out[m, where[(int(r['stage']), int(r['epoch']))]][:, columns] = np.where(on, alphas,
                                                                               np.nan)
  return out


def choice_counts(genotype_list, cell: str) -> np.ndarray:
  """(14, NUM_OPS): how many of the genotypes chose each op on each edge of `cell`."""
  counts = np.zeros((genotypes.NUM_EDGES, genotypes.NUM_OPS), int)
  for genotype in genotype_list:
    for edge, op in curves.chosen_edges(genotype, cell).items():
      counts[edge, genotypes.OPS.index(op)] += 1
  return counts


# ---------------------------------------------------------------------------
# Figures.

def _group_label(ss_factor, size: int) -> str:
  name = 'ss_factor ?' if ss_factor is None else f'ss_factor {ss_factor:g}'
  return f'{name} ({size} member{"s" if size != 1 else ""})'


def _draw_band(ax, spans, mean, std, color, label=None, linestyle='-', dodge=0.0):
  """`mean` as a line and `mean` ± `std` as a shaded band, stage by stage (each stage starts
  fresh), over the epochs where the mean is finite; a stage of one epoch as an error bar,
  moved `dodge` epochs aside (so that several ops' bars stay apart)."""
  x = np.arange(1, len(mean) + 1)
  for i, (_, first, last) in enumerate(spans):
    xs, m, s = x[first - 1:last], mean[first - 1:last], std[first - 1:last]
    ok = np.isfinite(m)
    if not ok.any():
      continue
    if ok.sum() == 1:  # a band needs two epochs: an error bar
      ax.errorbar(xs[ok] + dodge, m[ok], yerr=s[ok], color=color, capsize=3, linewidth=1.2)
    ax.fill_between(xs[ok], (m - s)[ok], (m + s)[ok], color=color, alpha=0.18, linewidth=0)
    ax.plot(xs[ok], m[ok], color=color, linewidth=1.8, linestyle=linestyle,
            label=label if i == 0 else None, marker='o' if ok.sum() < 3 else None,
            markersize=3)


def _setup(keys: list, members: List[Member]):
  """The stage spans of the epochs `keys` and the frozen (warm-up) epochs of member 0."""
  spans = curves.stage_spans([{'stage': s} for s, _ in keys])
  where = {k: i for i, k in enumerate(keys)}
  frozen = [False] * len(keys)
  for r in members[0].metrics:
    key = (int(r['stage']), int(r['epoch']))
    if key in where:
      frozen[where[key]] = bool(r.get('arch_frozen'))
  return spans, frozen


def curves_figure(members: List[Member]) -> Figure:
  """Each search metric: a thin curve per member, the mean ± std band per ss_factor group."""
  row_lists = [m.metrics for m in members]
  keys = epochs(row_lists)
  panels = [(key, title) for key, title in CURVES
            if any(r.get(key) is not None for rows in row_lists for r in rows)]
  if not keys or not panels:
    raise ValueError('the members have no search metrics rows to plot.')
  spans, frozen = _setup(keys, members)
  cols = min(4, len(panels))
  rows = -(-len(panels) // cols)
  fig = Figure(figsize=(4.3 * cols, 3.2 * rows + 0.8), layout='constrained')
  grid = fig.subplots(rows, cols, sharex=True, squeeze=False)
  x = np.arange(1, len(keys) + 1)
  by_group = groups(members)
  for ax, (key, title) in zip(grid.flat, panels):
    values = aligned(row_lists, key, keys)
    for g, (factor, positions) in enumerate(by_group.items()):
      color = GROUP_COLORS[g % len(GROUP_COLORS)]
      for p in positions:
        for _, first, last in spans:
          xs, vs = x[first - 1:last], values[p, first - 1:last]
          ok = np.isfinite(vs)
          ax.plot(xs[ok], vs[ok], color=color, linewidth=0.7, alpha=0.55,
                  marker='.' if ok.sum() < 3 else None, markersize=4)
      mean, std, _ = band(values[positions])
      _draw_band(ax, spans, mean, std, color, _group_label(factor, len(positions)))
    ax.set_title(title, fontsize=10, pad=14 if len(spans) > 1 else 6)
    curves.mark_stages(ax, spans, frozen, label=True)
    curves.epoch_axis(ax, len(keys))
    ax.tick_params(labelbottom=True)
  for ax in grid.flat[len(panels):]:
    ax.remove()
  for ax in grid[-1]:
    ax.set_xlabel('epoch (all stages)')
  handles = [matplotlib.lines.Line2D([], [], color=GROUP_COLORS[g % len(GROUP_COLORS)],
                                     linewidth=2, label=_group_label(f, len(p)))
             for g, (f, p) in enumerate(by_group.items())]
  fig.legend(handles=handles, loc='outside lower center', ncol=len(handles), fontsize=9,
             frameon=False)
  shaded = '; shaded: architecture frozen' if frozen and any(frozen) else ''
  fig.suptitle(f'Population of {len(members)} searches: a thin line per member, the mean '
               f'± std band over the members{shaded}', fontsize=11)
  return fig


def _edge_title(edge: int, counts, size: int) -> str:
  """The edge's name and the op most members chose on it (with how many)."""
  name = genotypes.edge_name(edge)
  if counts is None or not counts[edge].any():
    return name
  op = int(np.argmax(counts[edge]))
  return f'{name}: {genotypes.OPS[op]} {counts[edge, op]}/{size}'


def op_weights_figure(members: List[Member], cell: str) -> Figure:
  """The solo op-weight figure's 14 panels for the population: per edge and op, the members'
  mean ± std band (a line style per ss_factor group), each panel on its own scale."""
  row_lists = [m.history for m in members]
  keys = epochs(row_lists)
  if not keys:
    raise ValueError('the members have no architecture history rows to plot.')
  weights = op_weights(row_lists, cell, keys)  # (members, epochs, 14, ops)
  spans, frozen = _setup(keys, members)
  by_group = groups(members)
  bands = {f: band(weights[p]) for f, p in by_group.items()}  # each (epochs, 14, ops)
  chosen = [m.genotype for m in members if m.genotype is not None]
  counts = choice_counts(chosen, cell) if chosen else None
  rows, cols = genotypes.STEPS, genotypes.STEPS + 1
  fig = Figure(figsize=(3.0 * cols, 2.25 * rows + 1.1), layout='constrained')
  grid = fig.subplots(rows, cols, sharex=True, squeeze=False)
  ever_on = [k for k in range(genotypes.NUM_OPS) if np.isfinite(weights[..., k]).any()]
  for edge, (i, node) in enumerate(genotypes.EDGES):
    ax = grid[node, i]
    for g, (mean, std, _) in enumerate(bands.values()):
      for j, k in enumerate(ever_on):
        spot = g * len(ever_on) + j - (len(bands) * len(ever_on) - 1) / 2
        _draw_band(ax, spans, mean[:, edge, k], std[:, edge, k],
                   curves.OP_COLORS.get(genotypes.OPS[k]),
                   linestyle=GROUP_STYLES[g % len(GROUP_STYLES)],
                   dodge=0.4 * spot / max(len(bands) * len(ever_on), 1))
    low = np.concatenate([(m - s)[:, edge].ravel() for m, s, _ in bands.values()])
    high = np.concatenate([(m + s)[:, edge].ravel() for m, s, _ in bands.values()])
    if np.isfinite(low).any():
      lo, hi = np.nanmin(low), np.nanmax(high)
      pad = max(0.08 * (hi - lo), 1e-4)
      ax.set_ylim(lo - pad, hi + pad)
    curves.mark_stages(ax, spans, frozen)
    curves.epoch_axis(ax, len(keys))
    ax.set_title(_edge_title(edge, counts, len(chosen)), fontsize=9)
    ax.tick_params(labelsize=8, labelbottom=True, labelleft=True)
  for (node, i), ax in np.ndenumerate(grid):
    if i >= node + 2:  # no such edge
      ax.remove()
  for node in range(rows):
    grid[node, 0].set_ylabel('softmax weight', fontsize=8)
  handles = [matplotlib.lines.Line2D([], [], color=curves.OP_COLORS.get(genotypes.OPS[k]),
                                     linewidth=2, label=genotypes.OPS[k]) for k in ever_on]
  if len(by_group) > 1:
    handles += [matplotlib.lines.Line2D([], [], color='black', linewidth=1.5,
                                        linestyle=GROUP_STYLES[g % len(GROUP_STYLES)],
                                        label=_group_label(f, len(p)))
                for g, (f, p) in enumerate(by_group.items())]
  fig.legend(handles=handles, loc='outside lower center', ncol=min(len(handles), 9),
             fontsize=9, frameon=False)
  chose = '; title: the op most members chose' if counts is not None else ''
  fig.suptitle(f'Op weights of the {"normal" if cell == "normal" else "reduction"} cell over '
               f'{len(members)} members: mean ± std band over the members that have the op '
               f'on, each panel on its own scale{chose}', fontsize=11)
  return fig


def agreement_figure(members: List[Member]) -> Figure:
  """Per cell, an edge x op map of how many members' genotypes chose each; a row of maps per
  ss_factor group below the population's when the sweep has several."""
  chosen = [m for m in members if m.genotype is not None]
  if not chosen:
    raise ValueError('no member has a genotype yet (population.json).')
  by_group = groups(chosen)
  sets = [(f'all {len(chosen)} members', chosen)]
  if len(by_group) > 1:
    sets += [(_group_label(f, len(p)), [chosen[i] for i in p]) for f, p in by_group.items()]
  columns = [k for k in range(genotypes.NUM_OPS)
             if any(choice_counts([m.genotype for m in chosen], c)[:, k].any()
                    for c in genotypes.CELLS)]
  fig = Figure(figsize=(2.0 + 1.0 * len(columns) * 2, 4.6 * len(sets) + 0.6),
               layout='constrained')
  grid = fig.subplots(len(sets), 2, squeeze=False)
  for (label, group), axes in zip(sets, grid):
    for ax, cell in zip(axes, diagrams.CELLS):
      counts = choice_counts([m.genotype for m in group], cell)[:, columns]
      image = ax.imshow(counts, cmap='Blues', aspect='auto', vmin=0, vmax=len(group))
      for (e, c), n in np.ndenumerate(counts):
        if n:
          ax.text(c, e, str(n), ha='center', va='center', fontsize=8,
                  color='white' if n > 0.6 * len(group) else 'black')
      for node in genotypes.NODE_EDGES[:-1]:
        ax.axhline(node.stop - 0.5, color='0.6', linewidth=0.8)
      ax.set_xticks(range(len(columns)), [genotypes.OPS[k] for k in columns], rotation=40,
                    ha='right', fontsize=8)
      ax.set_yticks(range(genotypes.NUM_EDGES), curves.edge_names(), fontsize=8)
      ax.set_title(f'{"normal" if cell == "normal" else "reduction"} cell, {label}',
                   fontsize=10)
    fig.colorbar(image, ax=axes.tolist(), shrink=0.8, label='members',
                 ticks=range(len(group) + 1))
  fig.suptitle('How many members chose each op on each edge (input \u2192 node); each node '
               'keeps two edges', fontsize=11)
  return fig


def figures(run_dir: str) -> list:
  """(file name, Figure) of each population picture the files of `run_dir` allow."""
  members = load_members(run_dir)
  if not members:
    raise FileNotFoundError(f'{run_dir}: a population folder without members.')
  out = []
  if any(m.metrics for m in members):
    out.append(('population_curves.png', curves_figure(members)))
  if any(m.history for m in members):
    out += [(f'population_op_weights_{cell}.png', op_weights_figure(members, cell))
            for cell in diagrams.CELLS]
  if any(m.genotype is not None for m in members):
    out.append(('population_agreement.png', agreement_figure(members)))
  return out


def plot_population(run_dir: str, out_dir: str, dpi: int = 110) -> List[str]:
  """Draws the population pictures of `run_dir` into `out_dir`; returns the paths written."""
  written = []
  for name, fig in figures(run_dir):
    written.append(os.path.join(out_dir, name))
    fig.savefig(written[-1], dpi=dpi)
  return written
