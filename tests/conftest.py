"""Test-wide settings.

Tiny networks compile faster with XLA's optimisations mostly off and its CPU fusion emitters
off (`--xla_cpu_use_fusion_emitters=false`: the tiny search step compiles in 17 s instead of
30 s; the same function), and one persistent
compilation cache serves the whole session: a test (or a subprocess a test starts, which
inherits both settings through the environment) that compiles the same program as an earlier
test loads it instead of compiling it again.
"""

import os
import sys
import tempfile

import jax
import pytest

from pcp_jax import loop
from pcp_jax import parallel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

# Set before any test initialises a backend; subprocesses inherit it (see subprocess_env).
FAST_COMPILE_XLA_FLAGS = '--xla_cpu_use_fusion_emitters=false'
if FAST_COMPILE_XLA_FLAGS not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = ' '.join(
      f for f in (os.environ.get('XLA_FLAGS'), FAST_COMPILE_XLA_FLAGS) if f)


# PCP_JAX_TEST_XLA_CACHE keeps the cache across sessions (local reruns); CI starts empty.
# Chosen when pytest starts, before pytest-xdist starts its workers: they inherit it, so a
# program one worker compiled is loaded by the other.
if not os.environ.get('PCP_JAX_TEST_XLA_CACHE'):
  os.environ['PCP_JAX_TEST_XLA_CACHE'] = tempfile.mkdtemp(prefix='pcp_jax_test_xla_cache_')


# The full suite's longest files first (pytest --durations), so that pytest-xdist's workers,
# handed files in collection order (`--no-loadscope-reorder`), end together; the notebook
# after the search and train tests whose compiled programs it loads from the cache.
LONGEST_FILES = ('search_resume_test.py', 'population_test.py', 'collapse_test.py',
                 'supernet_test.py', 'search_step_test.py', 'gpu_check_test.py', 'train_test.py',
                 'bench_test.py', 'search_test.py', 'table2_test.py', 'ops_test.py',
                 'main_test.py', 'golden_test.py', 'readme_test.py', 'train_seeds_test.py',
                 'zz_notebook_test.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(os.path.basename(str(item.path)), len(rank)))


@pytest.fixture(scope='session', autouse=True)
def fast_compiles():
  cache = os.environ['PCP_JAX_TEST_XLA_CACHE']
  os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] = '1'
  # The data loader's record of verified archives: the tests' own, not the user's.
  os.environ['PCP_JAX_CACHE_DIR'] = tempfile.mkdtemp(prefix='pcp_jax_test_cache_')
  os.environ['JAX_COMPILATION_CACHE_DIR'] = cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  jax.config.update('jax_disable_most_optimizations', True)
  jax.config.update('jax_compilation_cache_dir', cache)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  yield


@pytest.fixture(scope='module', autouse=True)
def builds_of_this_file_only():
  """Stages built (`parallel.reused`) serve the tests of one file (a test wrapping chunk
  functions forgets them: `on_chunk`), never another file's."""
  parallel.forget_builds()
  yield
  parallel.forget_builds()


def subprocess_env(**extra):
  """The environment for a test's subprocess: the session's settings, the repo importable.

  An `XLA_FLAGS` in `extra` is added to the session's flags, not put in their place.
  """
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [ROOT] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  if 'XLA_FLAGS' in extra:
    extra['XLA_FLAGS'] = ' '.join(f for f in (env.get('XLA_FLAGS'), extra['XLA_FLAGS']) if f)
  env.update({k: str(v) for k, v in extra.items()})
  return env


class OnChunk:
  """Wraps a loop's chunk function (`loop.make_chunk_fn`): before its `call`-th run (1-based),
  `fault(state)` replaces the state it gets (a test's injected fault or signal)."""

  def __init__(self, chunk, call, fault):
    self.chunk, self.call, self.fault, self.calls = chunk, call, fault, 0

  @property
  def compiled(self):
    return self.chunk.compiled

  def __call__(self, state, *rest):
    self.calls += 1
    if self.calls == self.call:
      state = self.fault(state)
    return self.chunk(state, *rest)


def on_chunk(monkeypatch, call: int, fault) -> None:
  """Stages built from now on run `fault(state)` before their chunk function's `call`-th run
  (`OnChunk`); `monkeypatch.undo()` ends it (call `end_on_chunk`)."""
  make = loop.make_chunk_fn
  parallel.forget_builds()  # a stage built before this would run without the fault
  monkeypatch.setattr(loop, 'make_chunk_fn', lambda *a: OnChunk(make(*a), call, fault))


def end_on_chunk(monkeypatch) -> None:
  """Undoes `on_chunk` (and the test's other patches): stages are built plain again."""
  monkeypatch.undo()
  parallel.forget_builds()
