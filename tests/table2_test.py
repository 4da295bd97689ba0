"""Table II in one command (pcp_jax/table2.py): its plan, its bad flags, and its tiny form end
to end (one method as a population of two searches, each cell trained and tested, a random
cell, the table with both protocols), then rerun as a no-op."""

import csv
import json
import os

from absl import logging
import pytest

from pcp_jax import genotypes
from pcp_jax import population
from pcp_jax import reports
from pcp_jax import runs
from pcp_jax import table2


def test_the_plan_searches_each_method_then_trains_every_cell_and_random_cells(tmp_path):
  out = str(tmp_path)
  steps = table2.plan(out, seeds=2, ssf='0.5:1.0', train_seeds_=3, random=2, tiny=True)
  searches = [s for s in steps if 'search' in s.config.modes]
  assert [s.workdir for s in searches] == [os.path.join(out, 'search', m) for m in table2.METHODS]
  assert [population.size(s.config) for s in searches] == [2, 2, 2, 4]  # ss_pcp: 2 ssf x 2
  assert list(searches[-1].config.search.population.ss_factors) == [0.5, 1.0]
  assert searches[1].config.method == 'P-DARTS' and searches[0].config.search.channels == 8
  trainings = steps[len(searches):]
  members = [f for s in searches for f in population.run_folders(s.config, s.workdir)]
  assert [t.config.genotype for t in trainings] == members + ['random:0', 'random:1']
  assert all(t.config.train.seeds == 3 and t.config.modes == 'train,test' for t in trainings)
  assert [t.checked_first for t in trainings] == [False] * len(members) + [True, True]
  assert trainings[0].workdir == os.path.join(out, 'train', 'pc_darts', '0')
  assert trainings[-1].workdir == os.path.join(out, 'train', 'random', '1')


@pytest.mark.parametrize('kwargs, message', [
    (dict(methods=('darts',)), r"--methods must be a comma list of \['pc_darts'"),
    (dict(seeds=0), '--seeds must be a whole number >= 1, got 0'),
    (dict(train_seeds_=0), '--train_seeds must be a whole number >= 1, got 0'),
    (dict(random=-1), '--random must be a whole number >= 0, got -1'),
    (dict(dataset='mnist'), "--dataset must be one of"),
    (dict(ssf='0.5:2'), r'ss_factors must be numbers in \[0, 1\]'),
])
def test_bad_flags_answer_in_one_line(kwargs, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    steps = table2.plan(str(tmp_path), tiny=True, **kwargs)
    table2.run(steps, str(tmp_path))
  assert not os.listdir(tmp_path)


@pytest.mark.slow  # two searches, two trained cells and a random cell, each compiled
def test_a_tiny_table2_runs_end_to_end_and_a_rerun_changes_nothing(tmp_path, monkeypatch):
  out = str(tmp_path / 'table2')
  argv = [f'--out={out}', '--tiny', '--methods=pc_darts', '--seeds=2', '--train_seeds=1',
          '--random=1']
  monkeypatch.setattr(logging, 'set_verbosity', lambda _: None)  # the suite's log level
  table2.main(argv)
  with open(os.path.join(out, 'table2.csv')) as f:
    rows = {row['Method']: row for row in csv.DictReader(f)}
  assert set(rows) == {'PC-DARTS', 'Random cells (1 cells)'}, set(rows)
  pcp = rows['PC-DARTS']
  assert pcp[reports.SEARCHES] == '2'  # both protocols: all searches and the best of two
  assert pcp[reports.ALL_SEARCHES] != '-' and pcp[reports.BEST_OF_N] != '-'
  assert pcp[reports.RI_ALL] != '-'  # against the random cell's mean
  found = json.load(open(os.path.join(out, 'search', 'pc_darts', population.POPULATION)))
  for k, member in enumerate(found['members']):
    results = json.load(open(os.path.join(out, 'train', 'pc_darts', str(k), runs.RESULTS)))
    assert results['genotype'] == member['genotype']
    assert 0 <= results['test_accuracy'] <= 1
  random = json.load(open(os.path.join(out, 'train', 'random', '0', runs.RESULTS)))
  genotypes.from_dict(random['genotype'])
  md = open(os.path.join(out, 'table2.md')).read()

  before = _results(out)
  table2.main(argv)  # every step trained and tested: nothing runs again (plots are redrawn)
  assert _results(out) == before
  assert open(os.path.join(out, 'table2.md')).read() == md


def _results(folder):
  """Each results, metrics and architecture file under `folder` with its modification time."""
  return {os.path.join(d, f): os.path.getmtime(os.path.join(d, f))
          for d, _, names in os.walk(folder) for f in names
          if f.endswith(('.json', '.jsonl', '.npz')) and 'checkpoints' not in d}
