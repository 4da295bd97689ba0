"""Table II in one command (pcp_jax/table2.py): its plan and its bad flags. Its tiny run end to
end (`python -m pcp_jax.table2 --out=OUT --tiny --methods=pcp --seeds=2 --train_seeds=1
--random=1`, about two minutes here) is not in the suite yet: CI's 15 minutes are spent."""

import os

import pytest

from pcp_jax import population
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
