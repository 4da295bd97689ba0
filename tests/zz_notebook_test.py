"""Executes launch/colab.ipynb with its tiny settings, as a user would run it, so it cannot rot.

Named to run last: the notebook's tiny configs are the search and train tests' configs, so when
the test session shares a compilation cache (JAX_COMPILATION_CACHE_DIR) with the kernel, the
kernel reuses the programs those tests compiled.
"""

import json
import os
import shutil

import nbclient
import nbformat
import pytest

from pcp_jax import genotypes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, 'launch', 'colab.ipynb')
CELL_TIMEOUT_S = 1200  # a cold tiny search compiles for minutes on a busy 2-core CPU


def test_notebook_is_stored_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == 'code']
  assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_notebook_runs_the_tiny_pipeline(tmp_path, monkeypatch):
  # The kernel inherits this environment: it finds the checkout through PYTHONPATH, runs the
  # tiny configs and writes its runs to a temp dir.
  run_dir = tmp_path / 'runs'
  monkeypatch.setenv('PCP_JAX_NOTEBOOK_TINY', '1')
  monkeypatch.setenv('PCP_JAX_NOTEBOOK_RUN_DIR', str(run_dir))
  monkeypatch.setenv('PYTHONPATH', os.pathsep.join(
      p for p in (ROOT, os.environ.get('PYTHONPATH')) if p))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  client.execute()  # raises CellExecutionError, with the cell's traceback, if a cell fails

  outputs = [o for c in nb.cells if c.cell_type == 'code' for o in c.outputs]
  text = ''.join(o.get('text', '') for o in outputs if o.output_type == 'stream')
  assert f'pcp_jax from {ROOT}' in text
  # The search's curves and op weights (normal, reduce), normal.png, reduce.png, the training
  # curves, the FGSM plot and the per-example FGSM curves are shown.
  assert sum('image/png' in o.get('data', {}) for o in outputs) == 8

  genotype = genotypes.load(str(run_dir / 'search' / 'genotype.json'))  # validates it
  assert {op for op, _ in genotype.normal + genotype.reduce} <= {
      'max_pool_3x3', 'avg_pool_3x3', 'skip_connect'}  # the tiny search's candidate ops
  for name in ('normal.png', 'reduce.png'):
    assert (run_dir / 'search' / name).stat().st_size > 0
  with open(run_dir / 'train' / 'results.json') as f:
    results = json.load(f)
  assert results['genotype'] == genotypes.to_dict(genotype)
  assert 0.0 <= results['test_accuracy'] <= 1.0
  with open(run_dir / 'train' / 'fgsm.json') as f:
    fgsm = json.load(f)
  assert len(fgsm['accuracy']) == len(fgsm['eps']) > 1
  assert f"test accuracy {results['test_accuracy']:.3f}" in text


def _run_first_cell(tmp_path, monkeypatch, source):
  """Runs the notebook's first cell (finding or fetching pcp_jax) in a kernel that sees no
  checkout, with SOURCE set to `source`; returns what it printed."""
  monkeypatch.setenv('PCP_JAX_SOURCE', source)
  monkeypatch.delenv('PYTHONPATH', raising=False)
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nb.cells = [c for c in nb.cells if c.cell_type == 'code'][:1]
  work = tmp_path / 'work'
  work.mkdir()
  client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                                   resources={'metadata': {'path': str(work)}})
  client.execute()
  return work, ''.join(o.get('text', '') for o in nb.cells[0].outputs
                       if o.output_type == 'stream')


def _checkout_copy(folder):
  """What a checkout holds that the notebook needs, copied to `folder`."""
  for name in ('pcp_jax', 'configs'):
    shutil.copytree(os.path.join(ROOT, name), folder / name,
                    ignore=shutil.ignore_patterns('__pycache__'))
  shutil.copy(os.path.join(ROOT, 'requirements.txt'), folder)
  return folder


def _git_url(tmp_path):
  return 'file://' + ROOT  # git clones a local repository as it clones a remote one


def _folder(tmp_path):  # e.g. a checkout on Google Drive
  return str(_checkout_copy(tmp_path / 'drive' / 'pcp_jax'))


def _archive(tmp_path):  # as GitHub's "Download ZIP" makes it: one top folder
  _checkout_copy(tmp_path / 'zip' / 'pcp_jax-main')
  return shutil.make_archive(str(tmp_path / 'pcp_jax'), 'zip', tmp_path / 'zip', 'pcp_jax-main')


@pytest.mark.slow
@pytest.mark.parametrize('source', [_git_url, _folder, _archive])
def test_notebook_fetches_pcp_jax_from_its_source(source, tmp_path, monkeypatch):
  """The Colab path of the first cell: no checkout in sight, so it puts SOURCE (a git URL, a
  folder, an uploaded archive) in pcp_jax_repo/ and installs what is missing."""
  work, text = _run_first_cell(tmp_path, monkeypatch, source(tmp_path))
  clone = work / 'pcp_jax_repo'
  assert f'pcp_jax from {clone}' in text, text
  # Only what is missing is installed (here: nothing), so Colab's own packages stay.
  assert 'requirements: all installed already' in text, text
  assert (clone / 'pcp_jax' / 'main.py').is_file() and (clone / 'configs' / 'pcp.py').is_file()


@pytest.mark.slow
@pytest.mark.parametrize('source, message', [
    ('', 'No pcp_jax checkout here: set SOURCE in this cell to the git URL'),
    ('pcp_jax.zp', "SOURCE 'pcp_jax.zp' is neither a folder, an archive"),
])
def test_notebook_says_what_to_set_without_a_usable_source(source, message, tmp_path,
                                                            monkeypatch):
  with pytest.raises(nbclient.exceptions.CellExecutionError) as error:
    _run_first_cell(tmp_path, monkeypatch, source)
  assert message in str(error.value), str(error.value)
