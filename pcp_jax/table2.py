"""The paper's Table II in one command: the searches, each found cell trained over seeds, random
cells trained alike, and the table with both protocols.

  pcp-jax-table2 --out=runs/table2                    # the paper's configs (days on a GPU)
  pcp-jax-table2 --out=runs/table2_tiny --tiny        # the tiny configs: minutes on a CPU

Every step is an ordinary run folder under OUT, run by `main.run` as `pcp-jax` runs it, so the
command resumes at every step: rerun it after a stop (Ctrl-C, SIGTERM, a crash) and finished
steps are rerun as no-ops, a stopped one resumes from its checkpoint.

1. Searches, `OUT/search/<method>`: the baselines PC-DARTS and P-DARTS, PCP-DARTS, and SS
   PCP-DARTS's ss_factor sweep (`--ssf`), each a population of `--seeds` searches
   (pcp_jax/population.py; one search with `--seeds=1`).
2. Trainings, `OUT/train/<method>/<k>`: the cell of each search (member k) trained from scratch
   over `--train_seeds` seeds in one program (pcp_jax/train_seeds.py), then tested.
3. Random cells, `OUT/train/random/<i>`: `--random` cells of the search space (`random:i`,
   Yang et al.'s baseline), trained alike.
4. `OUT/table2.md` and `.csv` (pcp_jax/reports.py): per method, all searches and the best of N
   searches trained k times, the random cells' row and each method's relative improvement.
"""

import argparse
import dataclasses
import os
import sys
from typing import Any, List

from absl import logging

from pcp_jax import config_files
from pcp_jax import loop
from pcp_jax import main as pcp_main
from pcp_jax import population
from pcp_jax import reports
from pcp_jax import runs
from pcp_jax import train_seeds

METHODS = ('pc_darts', 'p_darts', 'pcp', 'ss_pcp')  # config names; ss_pcp: the ssf sweep
TRAIN_CONFIGS = {'cifar10': 'train_cifar10', 'cifar100': 'train_cifar100'}


@dataclasses.dataclass
class Step:
  name: str  # in progress lines
  config: Any
  workdir: str
  checked_first: bool = True  # False: its genotype is a search's, checked when that has run


def plan(out: str, methods=METHODS, seeds: int = 4, ssf: str = '0.25:0.5:0.75:1.0',
         train_seeds_: int = 3, random: int = 8, dataset: str = 'cifar10',
         tiny: bool = False) -> List[Step]:
  """The steps in the order they run: every search, then the trainings of their cells and of
  the random cells."""
  unknown = sorted(set(methods) - set(METHODS))
  if unknown or not methods:
    raise ValueError(f'--methods must be a comma list of {list(METHODS)}, got {list(methods)}.')
  if dataset not in TRAIN_CONFIGS:
    raise ValueError(f'--dataset must be one of {list(TRAIN_CONFIGS)}, got {dataset!r}.')
  for flag, value in (('seeds', seeds), ('train_seeds', train_seeds_)):
    if value < 1:
      raise ValueError(f'--{flag} must be a whole number >= 1, got {value}.')
  if random < 0:
    raise ValueError(f'--random must be a whole number >= 0, got {random}.')
  extra = (',tiny' if tiny else '')
  searches, trainings = [], []
  for method in methods:
    args = f'seeds={seeds},dataset={dataset}' + (f',ssf={ssf}' if method == 'ss_pcp' else '')
    config = config_files.load(f'{method}:{args}{extra}')
    workdir = os.path.join(out, 'search', method)
    searches.append(Step(f'search {method}', config, workdir))
    for k, folder in enumerate(population.run_folders(config, workdir)):
      trainings.append(dataclasses.replace(
          _training(f'train {method} {k}', folder, os.path.join(out, 'train', method, str(k)),
                    train_seeds_, dataset, extra), checked_first=False))
  trainings += [_training(f'train random cell {i}', f'random:{i}',
                          os.path.join(out, 'train', 'random', str(i)), train_seeds_, dataset,
                          extra) for i in range(random)]
  return searches + trainings


def _training(name, genotype, workdir, seeds, dataset, extra) -> Step:
  config = config_files.load(f'{TRAIN_CONFIGS[dataset]}:seeds={seeds}{extra}')
  config.genotype, config.modes = genotype, 'train,test'
  return Step(name, config, workdir)


def run(steps: List[Step], out: str, published: bool = False) -> list:
  """Runs (or resumes) every step, then writes the table; returns its paths. The configs are
  checked before the first step runs (a search's cell when the search has run)."""
  for step in steps:
    if step.checked_first:
      pcp_main.check(step.config)
  for i, step in enumerate(steps):
    if _tested(step):  # a finished search reruns as a no-op, a test would run again
      logging.info('Table II, step %d of %d: %s in %s is trained and tested.', i + 1,
                   len(steps), step.name, step.workdir)
      continue
    logging.info('Table II, step %d of %d: %s in %s', i + 1, len(steps), step.name,
                 step.workdir)
    pcp_main.run(step.config, step.workdir)
  folders = [f for step in steps if 'train' in step.config.modes.split(',')
             for f in train_seeds.run_folders(step.config, step.workdir)]
  paths = reports.write_paper_table(folders, out, published=published)
  logging.info('Table II: %s', ', '.join(paths))
  return paths


def _tested(step: Step) -> bool:
  """Whether a training step's runs all have their results (its test ran)."""
  return 'test' in step.config.modes.split(',') and all(
      os.path.isfile(os.path.join(folder, runs.RESULTS))
      for folder in [step.workdir] + train_seeds.run_folders(step.config, step.workdir))


def parse_args(argv):
  """The command's flags (argparse: `pcp_jax.main`'s absl flags, required there, stay unset)."""
  parser = argparse.ArgumentParser(prog='pcp-jax-table2', description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='The folder of every run and of table2.md.')
  parser.add_argument('--methods', default=','.join(METHODS),
                      help='The searches: a comma list of these configs.')
  parser.add_argument('--seeds', type=int, default=4, help='Searches per method (a population).')
  parser.add_argument('--ssf', default='0.25:0.5:0.75:1.0', help="SS PCP-DARTS's ssf sweep.")
  parser.add_argument('--train_seeds', type=int, default=3,
                      help='Trainings of each cell (seeds, one program).')
  parser.add_argument('--random', type=int, default=8,
                      help='Random cells trained as the baseline (0: none).')
  parser.add_argument('--dataset', default='cifar10', help='The dataset searched and trained on.')
  parser.add_argument('--tiny', action='store_true', help='The tiny configs (a CPU, CI).')
  parser.add_argument('--published', action='store_true', help='The published rows too.')
  parser.add_argument('-v', '--verbose', action='store_true', help='Tracebacks of errors.')
  return parser.parse_args(argv)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  logging.set_verbosity(logging.INFO)
  pcp_main.use_compilation_cache()
  try:
    steps = plan(args.out, tuple(m for m in args.methods.split(',') if m), args.seeds, args.ssf,
                 args.train_seeds, args.random, args.dataset, args.tiny)
    run(steps, args.out, args.published)
  except loop.Interrupted as e:
    logging.warning('%s Rerun the same command to resume Table II.', e)
    sys.exit(128 + e.signum)
  except Exception as e:  # pylint: disable=broad-except
    if args.verbose or not (isinstance(e, pcp_main.USER_ERRORS) or runs.disk_full(e)):
      raise
    sys.exit(f'error: {pcp_main.user_message(e, args.out)}')


def cli():
  """The `pcp-jax-table2` command (`python -m pcp_jax.table2`)."""
  main()


if __name__ == '__main__':
  cli()
