"""How a results table's row summarises its runs: two protocols and the random baseline.

- All searches: mean ± sample std of the test error over every trained run of the row.
- Best of N searches, trained k times (the DARTS family's and the paper's protocol): the row's
  runs are grouped by the search their genotype came from (results.json `genotype_source`: a
  search folder such as `POP/members/3`, its genotype.json, a reference name or `random:I`);
  the search whose runs have the best mean *validation* accuracy is chosen and its k runs'
  test error is reported. The validation figure is train_metrics.jsonl's `valid_acc` at the
  tested checkpoint's epoch (results.json `checkpoint_epoch`): the accuracy on
  `train.val_split` of the very weights that were tested. Runs with `train.val_split='test'`
  (the default, as DARTS does) validate on the test set, so their selection has seen it; the
  table says so.
- Random baseline: runs of `random:I` cells (`random_cells`) form one row, and each method
  gets Yang et al.'s relative improvement over it (ICLR 2020, "NAS evaluation is frustratingly
  hard"): RI = 100 * (acc_method - acc_random) / acc_random, acc_random the mean test accuracy
  over every random-cell run on the same dataset.

A run trained over several seeds has `seed_runs` in its results.json (folders relative to it,
each an ordinary run folder); a table counts each seed folder as a run.
"""

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from pcp_jax import random_cells
from pcp_jax import runs

SEED_RUNS = 'seed_runs'
RANDOM_METHOD = 'Random cells'


def expand_seed_runs(run_dirs: Sequence[str]) -> list:
  """The run folders, each trained over seeds replaced by its seed folders (`seed_runs`)."""
  expanded = []
  for run_dir in run_dirs:
    path = os.path.join(run_dir, runs.RESULTS)
    seeds = runs.load_json(path).get(SEED_RUNS) if os.path.isfile(path) else None
    if seeds is None:
      expanded.append(run_dir)
      continue
    if not isinstance(seeds, list) or not seeds or not all(
        isinstance(s, str) and s.strip() for s in seeds):
      raise ValueError(f'{path}: {SEED_RUNS} must be a non-empty list of seed folders relative '
                       f'to {run_dir}, got {seeds!r}.')
    for seed in seeds:
      folder = os.path.join(run_dir, seed)
      if not os.path.isdir(folder):
        raise FileNotFoundError(f'{path} lists the seed run {seed!r}, but {folder} is not a '
                                'folder.')
      expanded.append(folder)
  return expanded


def random_index(source) -> Optional[int]:
  """I of a `random:I` genotype source; None for any other source."""
  try:
    return random_cells.index(source)
  except ValueError:
    return None


def search_key(run_dir: str, source) -> str:
  """What identifies the search a run's genotype came from: the search folder (real path),
  else the genotype source itself (a reference name, a file, `random:I`), else the run."""
  folder = runs.search_folder(run_dir, source)
  if folder:
    return os.path.realpath(folder)
  return source if isinstance(source, str) and source else os.path.realpath(run_dir)


def validation_accuracy(run_dir: str, results: dict) -> Optional[float]:
  """The tested checkpoint's validation accuracy: train_metrics.jsonl's `valid_acc` in the row
  of epoch `checkpoint_epoch`; None when the run has no such row (imported weights)."""
  epoch = results.get('checkpoint_epoch')
  if epoch is None:
    return None
  rows = runs.Rows(os.path.join(run_dir, runs.TRAIN_METRICS), write=False).read()
  values = [r['valid_acc'] for r in rows if r.get('epoch') == epoch
            and isinstance(r.get('valid_acc'), (int, float))]
  return float(values[-1]) if values else None


def mean_std(values, digits: int) -> str:
  """'mean ± sample std' of the values that are not None; one value alone; '-' for none."""
  values = [v for v in values if v is not None]
  if not values:
    return '-'
  if len(values) == 1:
    return f'{values[0]:.{digits}f}'
  return f'{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}'


@dataclasses.dataclass
class Best:
  """A row's best search: its runs ((run, results) pairs), the row's number of searches and
  whether the selection saw the test set (a run validated on it)."""
  members: list
  searches: int
  on_test_set: bool


def best_search(members: Sequence) -> Optional[Best]:
  """The search of a row's (run, results) pairs whose runs have the best mean validation
  accuracy (ties: the first search in order of its key); None when no run has one."""
  by_search = {}
  for run, result in members:
    by_search.setdefault(run['search'], []).append((run, result))
  scores = {}
  for key, pairs in by_search.items():
    values = [validation_accuracy(run['folder'], result) for run, result in pairs]
    values = [v for v in values if v is not None]
    if values:
      scores[key] = float(np.mean(values))
  if not scores:
    return None
  best = max(sorted(scores), key=lambda key: scores[key])
  on_test = any(str(r.get('val_split', 'test')).strip().lower() == 'test'
                for pairs in by_search.values() for _, r in pairs)
  return Best(by_search[best], len(by_search), on_test)


def random_cell_count(members: Sequence) -> int:
  return len({random_index(result.get('genotype_source')) for _, result in members})


def relative_improvement(accuracies, random_accuracy: Optional[float]) -> str:
  """Yang et al.'s RI (%) of the mean of `accuracies` over `random_accuracy`, signed."""
  if random_accuracy is None or not accuracies or random_accuracy <= 0:
    return '-'
  return f'{100 * (np.mean(accuracies) - random_accuracy) / random_accuracy:+.2f}'
