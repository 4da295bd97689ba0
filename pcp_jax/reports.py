"""Reports over finished runs: the paper's results table (Table II) and the FGSM overlay
(Fig. 13). A table row shows every run of a method (all searches), its best of N searches
trained k times and its relative improvement over random cells (`protocols`).

  python -m pcp_jax.reports table RUN [RUN ...] --out DIR   # DIR/table2.md, DIR/table2.csv
  python -m pcp_jax.reports fgsm RUN [RUN ...] --out DIR    # DIR/fgsm_compare_*.png
"""

import argparse
import collections
import csv
import dataclasses
import json
import os
import sys
from typing import Optional, Sequence, Tuple

import numpy as np

from pcp_jax import data
from pcp_jax import genotypes
from pcp_jax import plots
from pcp_jax import protocols
from pcp_jax import runs

# Config leaves that never make runs different methods: seeds (the replicates of a group),
# names, paths and bookkeeping.
_NOT_SETTINGS = ('seed', 'method', 'genotype', 'modes', 'workdir', 'data_dir', 'download',
                 'log_every_steps', 'checkpoint', 'fgsm', 'eval_batch_size', 'max_test',
                 'compilation_cache', 'memory_check')


def _read_results(run_dir: str) -> dict:
  """A run folder's results.json, checked: a one-line error naming the file if it is
  missing, not JSON, lacks a key the table needs or holds an accuracy outside [0, 1]."""
  path = os.path.join(run_dir, runs.RESULTS)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'run folder {run_dir!r} has no {runs.RESULTS} (looked for '
                            f'{path}).')
  results = runs.load_json(path)
  missing = {'test_accuracy', 'params', 'dataset'} - set(results)
  if missing:
    raise ValueError(f'{path} is missing the keys {sorted(missing)}.')
  for key in ('test_accuracy', 'last_test_accuracy', 'test_top5_accuracy'):
    value = results.get(key)
    if (value is not None or key == 'test_accuracy') and not (
        isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1):
      raise ValueError(f'{path}: {key} must be a fraction in [0, 1], got {value!r}.')
  params = results['params']
  if isinstance(params, bool) or not isinstance(params, (int, float)) or params < 0:
    raise ValueError(f'{path}: params must be a number of parameters, got {params!r}.')
  if not isinstance(results['dataset'], str):
    raise ValueError(f'{path}: dataset must be a name, got {results["dataset"]!r}.')
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


def cost_unit(platform) -> str:
  """'GPU-days' for platform gpu, 'CPU-days' for cpu, ...; 'device-days' when unknown."""
  return f'{platform.upper()}-days' if platform else 'device-days'


def describe_run(run_dir: str, record: dict) -> dict:
  """What the tables need of a run: its method, ssf, search cost and settings.

  `record` is the run's results.json (or fgsm.json). The search cost is in device-days,
  search hours x devices / 24, from the search folder's search_summary.json (else
  results.json's `search_cost_days`, for one device of an unknown platform)."""
  source = record.get('genotype_source')
  folder = runs.search_folder(run_dir, source)
  summary = runs.load_json(os.path.join(folder, runs.SEARCH_SUMMARY)) if folder else {}
  search_config = runs.load_json(os.path.join(folder, runs.CONFIG)) if folder else {}
  train_config = runs.load_json(os.path.join(run_dir, runs.TRAIN_CONFIG))
  ssf = summary.get('ss_factor', search_config.get('search', {}).get('ss_factor'))
  bt_scale = summary.get('bt_scale', search_config.get('search', {}).get('bt_scale'))
  if summary.get('search_cost_hours') is not None:
    cost = summary['search_cost_hours'] * summary.get('device_count', 1) / 24
  elif summary.get('search_cost_days') is not None:
    cost = summary['search_cost_days'] * summary.get('device_count', 1)
  else:
    cost = record.get('search_cost_days')
  platform = summary.get('platform')
  if cost is None and source in genotypes.REFERENCE_METHODS:  # a published cell
    cost, platform = genotypes.REFERENCE_METHODS[source][1], 'gpu'
  settings = {f'search.{k}': v for k, v in _flatten(search_config).items()}
  settings.update({f'train.{k}': v for k, v in _flatten(train_config).items()})
  random = protocols.random_index(source) is not None
  return {
      'folder': run_dir,
      'search': protocols.search_key(run_dir, source),
      'random': random,
      'method': protocols.RANDOM_METHOD if random else (
          record.get('method') or summary.get('method')
          or os.path.basename(os.path.normpath(run_dir))),
      'dataset': record.get('dataset') or summary.get('dataset') or '-',
      'ssf': None if ssf is None else float(ssf),
      'bt_scale': bt_scale,
      'cost': cost,
      'cost_unit': cost_unit(platform) if cost is not None else None,
      'search_method': ('random sampling' if random else 'gradient-based, self-supervised'
                        if ssf and float(ssf) > 0 else 'gradient-based'),
      'settings': {k: v for k, v in settings.items() if _is_setting(k)},
  }


def _short(key: str, value: str) -> str:
  value = json.loads(value)
  return f'{key.split(".")[-1]} {value}'


def method_labels(described: Sequence[dict]) -> list:
  """A label per run: its method, with ssf (and a bt_scale other than 'none') when it
  self-supervises, and the config settings in which it differs from other runs of that method
  (seeds, paths and names aside)."""
  labels = []
  for run in described:
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
    peers = [described[i]['settings'] for i in by_label[(method, tuple(extras))]]
    # Settings all peers record (a run without config files is not told apart by them).
    keys = sorted(set.intersection(*(set(p) for p in peers)))
    differing = [key for key in keys if len({p[key] for p in peers}) > 1
                 and not key.endswith(('.ss_factor', '.bt_scale'))]
    extras = extras + [_short(key, described[k]['settings'][key]) for key in differing]
    named.append(f'{method} ({", ".join(extras)})' if extras else method)
  return named


def _check_distinct(run_dirs: Sequence[str]) -> None:
  seen = {}
  for run_dir in run_dirs:
    real = os.path.realpath(run_dir)
    if real in seen:
      raise ValueError(f'run folder {run_dir!r} is {seen[real]!r} again; give each run once.')
    seen[real] = run_dir


def _dataset_label(dataset: str, num_test, num_train=None) -> str:
  """The dataset, with the images counted when a run saw only part of its training or test
  split (a subset or a `tiny` run)."""
  info = data.DATASETS.get(dataset)
  if info is None:
    return dataset
  parts = [f'{n} of {full} {what} images' for n, full, what in (
      (num_train, info.train_size, 'training'), (num_test, info.test_size, 'test'))
           if n is not None and n < full]
  return f'{dataset} ({", ".join(parts)})' if parts else dataset


def _tested(results: dict) -> str:
  """The checkpoint a run's test error is of: 'best', or the latest where the run had no best
  checkpoint that restored (results.json's `checkpoint`)."""
  name = results.get('checkpoint') or runs.BEST
  return runs.BEST if name == runs.BEST else f'latest ({runs.BEST}/ unusable)'


# Published CIFAR-10 rows (the papers; the DARTS-family rows are their own, not the seed
# paper's reruns): (method, test error %, params M, search cost GPU-days).
PUBLISHED = (
    ('DARTS (2nd order), published', 2.76, 3.3, 1.0),
    ('P-DARTS, published', 2.50, 3.4, 0.3),
    ('PC-DARTS, published', 2.57, 3.6, 0.1),
    ('Vanilla PCP-DARTS, the paper', 3.12, 4.5, 0.163),
    ('SS PCP-DARTS (ssf 0.25), the paper', 3.91, 3.9, 0.220),
    ('SS PCP-DARTS (ssf 0.5), the paper', 3.57, 3.7, 0.154),
    ('SS PCP-DARTS (ssf 0.75), the paper', 2.99, 3.7, 0.199),
    ('SS PCP-DARTS (ssf 1), the paper', 3.28, 4.2, 0.195),
)


def published_rows(columns: Sequence[str]) -> list:
  """`PUBLISHED` as rows of a `paper_table` with `columns` (n: 'published')."""
  cost = next(c for c in columns if c.startswith('Search cost'))
  error = next(c for c in columns if c.startswith('Test error'))
  return [dict({c: '-' for c in columns}, **{
      'Method': method, error: f'{error_pct:.2f}', 'Params (M)': f'{params:.1f}',
      cost: f'{gpu_days:.3g}' + ('' if cost.endswith('(GPU-days)') else ' GPU-days'),
      'Search method': 'gradient-based', 'n': 'published', 'Dataset': 'cifar10'})
          for method, error_pct, params, gpu_days in PUBLISHED]


# The protocols' columns (`protocols`): 'Test error (%)' is every run's when no row has
# searches to choose from; otherwise both protocols are columns.
ERROR, ALL_SEARCHES = 'Test error (%)', 'Test error, all searches (%)'
BEST_OF_N, SEARCHES, BEST_RUNS = ('Test error, best of N searches (%)', 'Searches (N)',
                                  'Runs of the best (k)')
RI_ALL, RI_BEST = 'RI over random, all searches (%)', 'RI over random, best of N (%)'
NOTES = {
    'base': 'Mean ± sample standard deviation over the n runs of a row. Search cost: search '
            'hours x devices / 24.',
    'best': 'All searches: every run of the row. Best of N searches, trained k times: of the '
            "row's N searches, the one whose runs have the best mean validation accuracy "
            "(train_metrics.jsonl's valid_acc at the tested checkpoint's epoch), its k runs.",
    'test': 'Runs trained with train.val_split=test validate on the test set (as DARTS does): '
            'their best-of-N selection has seen the test set; train.val_split=0.1 keeps it out.',
    'ri': 'RI: relative improvement in test accuracy over the mean of every random-cell run '
          'on the same dataset, 100 x (acc - acc_random) / acc_random (Yang et al., ICLR 2020).',
}


@dataclasses.dataclass
class Table:
  columns: list
  rows: list
  notes: list


def _errors(members) -> list:
  return [100 * (1 - r['test_accuracy']) for _, r in members]


def _group(run_dirs, results) -> dict:
  """(random, label, dataset, cost unit, tested checkpoint) -> the row's (run, results)."""
  described = [describe_run(run_dir, r) for run_dir, r in zip(run_dirs, results)]
  groups = collections.defaultdict(list)
  for label, run, result in zip(method_labels(described), described, results):
    # Runs tested on different numbers of test images are different rows.
    dataset = _dataset_label(run['dataset'], result.get('num_test_examples'),
                             result.get('num_train_examples'))
    groups[(run['random'], label, dataset, run['cost_unit'], _tested(result))].append(
        (run, result))
  named = {}
  for (random, label, *rest), members in groups.items():
    if random:  # 'Random cells (epochs 50)' -> 'Random cells (3 cells, epochs 50)'
      cells = f'{protocols.random_cell_count(members)} cells'
      extras = label[len(protocols.RANDOM_METHOD):].strip()[1:-1]
      label = f'{protocols.RANDOM_METHOD} ({", ".join(filter(None, (cells, extras)))})'
    named[(random, label, *rest)] = members
  return named


def _row(key, members, cost_column, tested, top5) -> dict:
  """A row's all-runs columns (mean ± std over its n runs)."""
  _, label, dataset, unit, checkpoint = key
  cost = protocols.mean_std([run['cost'] for run, _ in members], 3)
  row = {
      'Method': label,
      ERROR: protocols.mean_std(_errors(members), 2),
      'Last-epoch error (%)': protocols.mean_std(
          [None if r.get('last_test_accuracy') is None else 100 * (1 - r['last_test_accuracy'])
           for _, r in members], 2),
      'Params (M)': protocols.mean_std([r['params'] / 1e6 for _, r in members], 2),
      cost_column: f'{cost} {unit}' if cost != '-' and cost_column == 'Search cost' else cost,
      'Search method': members[0][0]['search_method'],
      'n': str(len(members)),
      'Dataset': dataset,
  }
  if tested:
    row['Tested checkpoint'] = checkpoint
  if top5:
    row['Top-5 accuracy (%)'] = protocols.mean_std(
        [None if r.get('test_top5_accuracy') is None else 100 * r['test_top5_accuracy']
         for _, r in members], 2)
  return row


def _protocol_cells(row, members, best, random_accuracy, show_best, show_ri) -> dict:
  """`row` with the best-of-N columns (when `show_best`) and the RI columns (`show_ri`)."""
  accuracies = [r['test_accuracy'] for _, r in members]
  best_accuracies = [r['test_accuracy'] for _, r in best.members] if best else []
  if show_best:
    row[ALL_SEARCHES] = row.pop(ERROR)
    row[BEST_OF_N] = protocols.mean_std(_errors(best.members), 2) if best else '-'
    row[SEARCHES] = str(len({run['search'] for run, _ in members}))
    row[BEST_RUNS] = str(len(best.members)) if best else '-'
  if show_ri:
    reference = None if members[0][0]['random'] else random_accuracy
    row[RI_ALL] = protocols.relative_improvement(accuracies, reference)
    if show_best:
      row[RI_BEST] = protocols.relative_improvement(best_accuracies, reference)
  return row


def build_table(run_dirs: Sequence[str]) -> Table:
  """The paper's Table II over run folders (each with results.json, or `seed_runs` of seed
  folders that have one): its columns, rows and the notes below it.

  Runs of the same method label (`method_labels`), dataset (and number of test images, shown
  when a run tested on part of the test split) and search-cost unit make one row,
  rows sorted by label, the random-cell row last: mean ± sample standard deviation over its n
  runs and, when some row has searches to choose from, its best of N searches trained k times
  (`protocols`), plus the relative improvement over random cells when some are given.
  'Test error' is the best checkpoint's (selected on the validation split, the test set itself
  unless train.val_split is a fraction; runs tested on their latest checkpoint because their
  best one did not restore are rows of their own, and a 'Tested checkpoint' column says so),
  'Last-epoch error' the final epoch's (`last_test_accuracy`).
  Search cost in device-days (hours x devices / 24), labelled with the platform
  (`GPU-days`, `CPU-days`); a top-5 column when some results.json has `test_top5_accuracy`."""
  if isinstance(run_dirs, str):
    run_dirs = [run_dirs]
  if not run_dirs:
    raise ValueError('the table needs at least one run folder.')
  run_dirs = protocols.expand_seed_runs(run_dirs)
  _check_distinct(run_dirs)
  results = [_read_results(run_dir) for run_dir in run_dirs]
  groups = _group(run_dirs, results)
  units = {key[3] for key in groups if key[3]}
  cost_column = f'Search cost ({units.pop()})' if len(units) == 1 else 'Search cost'
  top5 = any(r.get('test_top5_accuracy') is not None for r in results)
  tested = any(key[4] != runs.BEST for key in groups)
  bests = {key: protocols.best_search(members) for key, members in groups.items()}
  show_best = any(b is not None and b.searches > 1 for b in bests.values())
  random_runs = collections.defaultdict(list)
  for key, members in groups.items():
    random_runs[key[2]] += [r['test_accuracy'] for _, r in members] if key[0] else []
  random_accuracy = {dataset: np.mean(acc) for dataset, acc in random_runs.items() if acc}
  show_ri = bool(random_accuracy)
  columns = (['Method'] + ([ALL_SEARCHES, BEST_OF_N, SEARCHES, BEST_RUNS] if show_best else [ERROR])
             + ([RI_ALL] + ([RI_BEST] if show_best else []) if show_ri else [])
             + (['Tested checkpoint'] if tested else [])
             + (['Top-5 accuracy (%)'] if top5 else [])
             + ['Last-epoch error (%)', 'Params (M)', cost_column, 'Search method', 'n',
                'Dataset'])
  rows = [_protocol_cells(_row(key, members, cost_column, tested, top5), members, bests[key],
                          random_accuracy.get(key[2]), show_best, show_ri)
          for key, members in sorted(groups.items(), key=lambda g: (
              g[0][0], g[0][1], g[0][2], g[0][3] or '', g[0][4]))]
  on_test = show_best and any(b is not None and b.on_test_set for b in bests.values())
  notes = [NOTES[name] for name, shown in (('base', True), ('best', show_best),
                                           ('test', on_test), ('ri', show_ri)) if shown]
  return Table(columns, rows, notes)


def paper_table(run_dirs: Sequence[str]) -> Tuple[list, list]:
  """`build_table`'s (columns, rows)."""
  table = build_table(run_dirs)
  return table.columns, table.rows


def write_paper_table(run_dirs: Sequence[str], out_dir: str, name: str = 'table2',
                      published: bool = False) -> list:
  """Writes `build_table` as `{out_dir}/{name}.md` (with its notes) and `.csv` (with
  `published`, the `PUBLISHED` rows below the runs'); returns the paths."""
  table = build_table(run_dirs)
  columns, rows = table.columns, table.rows + (published_rows(table.columns) if published else [])
  os.makedirs(out_dir, exist_ok=True)
  md_path, csv_path = (os.path.join(out_dir, f'{name}.{ext}') for ext in ('md', 'csv'))
  left = {'Method', 'Search method', 'Dataset'}
  lines = ['| ' + ' | '.join(columns) + ' |',
           '|' + '|'.join(':---' if c in left else '---:' for c in columns) + '|']
  lines += ['| ' + ' | '.join(row[c].replace('|', r'\|') for c in columns) + ' |'
            for row in rows]
  for note in table.notes:
    lines += ['', note]
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
  records, described = [], []
  for run_dir in run_dirs:
    path = os.path.join(run_dir, runs.FGSM)
    if not os.path.isdir(run_dir):
      raise FileNotFoundError(f'{run_dir}: no such run folder.')
    if not os.path.isfile(path):
      raise FileNotFoundError(f'run folder {run_dir!r} has no {runs.FGSM} (run the fgsm mode '
                              'there first).')
    record = plots.load_fgsm(path)
    records.append(record)
    results = runs.load_json(os.path.join(run_dir, runs.RESULTS))
    described.append(describe_run(run_dir, dict(record, **{k: v for k, v in results.items()
                                                             if v is not None})))
  labels = method_labels(described)
  counts = collections.Counter(labels)
  results_by_name = {}
  for label, run_dir, record in zip(labels, run_dirs, records):
    if counts[label] > 1:
      label = f'{label} [{os.path.basename(os.path.normpath(run_dir))}]'
    results_by_name[label] = record
  return plots.plot_fgsm(results_by_name, out_dir, prefix=prefix)


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m pcp_jax.reports',
      description='Reports over finished runs: the paper\'s Table II and the FGSM overlay.')
  commands = parser.add_subparsers(dest='command', required=True)
  table = commands.add_parser(
      'table', help='Table II (markdown + csv) over run folders holding results.json (a run '
      'trained over seeds counts as its seed runs); runs of the same method and settings are '
      'one row: mean ± std over all of them, over the runs of the best of its N searches by '
      'validation accuracy, and the relative improvement over random cells (random:I).')
  table.add_argument('runs', nargs='+', metavar='RUN')
  table.add_argument('--out', required=True, help='folder for table2.md and table2.csv')
  table.add_argument('--name', default='table2', help='file name stem (default table2)')
  table.add_argument('--published', action='store_true',
                     help='add the published rows (DARTS, P-DARTS, PC-DARTS, the paper)')
  fgsm = commands.add_parser(
      'fgsm', help='Overlay the fgsm.json of several runs (Fig. 13).')
  fgsm.add_argument('runs', nargs='+', metavar='RUN')
  fgsm.add_argument('--out', required=True, help='folder for the PNGs')
  fgsm.add_argument('--prefix', default='fgsm_compare', help='file name prefix')
  args = parser.parse_args(argv)
  try:
    runs.check_folder(args.out, '--out')
    if args.command == 'table':
      paths = write_paper_table(args.runs, args.out, args.name, args.published)
    else:
      paths = fgsm_overlay(args.runs, args.out, args.prefix)
  except (OSError, ValueError, KeyError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  print('\n'.join(paths))
  return 0


if __name__ == '__main__':
  sys.exit(main())
