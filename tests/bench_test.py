"""The benchmark: a tiny run through the command line, the report's fields, option errors."""

import fcntl
import json
import os
import statistics
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import pc_darts
from configs import pcp
from configs import train_cifar10
from pcp_jax import bench
from pcp_jax import genotypes
from pcp_jax import networks
from pcp_jax import supernet

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_bench(*args):
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1', PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, '-m', 'pcp_jax.bench', *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=1200, check=False)


def search_weight_count(config, switches):
  cfg = config.search
  model = supernet.SearchNetwork(
      channels=cfg.channels, layers=cfg.stages[0].layers, partial_k=cfg.partial_k,
      use_betas=cfg.use_betas, switches_normal=genotypes.switches_to_tuple(switches),
      switches_reduce=genotypes.switches_to_tuple(switches))
  shapes = jax.eval_shape(lambda k: supernet.init_variables(model, k, (32, 32, 3)),
                          jax.random.PRNGKey(0))
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes['params']))


def test_tiny_search_and_train_through_the_command_line(tmp_path):
  out = tmp_path / 'bench.json'
  proc = run_bench('--config=configs/pc_darts.py:tiny',
                   '--train_config=configs/train_cifar10.py:tiny', '--genotype=DARTS_V2',
                   '--what=search,train', '--batch_size=8', '--train_batch_size=8',
                   '--steps=2', '--warmup=0', '--steps_per_call=2', '--project', '--jobs=2',
                   f'--out={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'search stage 1' in proc.stdout and 'Projected search at batch 8' in proc.stdout
  report = json.loads(out.read_text())
  search_case, train_case = report['cases']  # in the order of the cases, not of finishing
  assert search_case['what'] == 'search' and train_case['what'] == 'train'
  first, second = sorted((c['timed_from'], c['timed_until']) for c in report['cases'])
  assert first[0] < first[1] <= second[0] < second[1]  # two processes, timed one at a time
  config = pc_darts.get_config('tiny')
  for case in (search_case, train_case):
    assert case['batch_size'] == 8 and case['steps_per_call'] == 2
    assert len(case['call_seconds']) == 2
    assert case['seconds_per_step'] == pytest.approx(statistics.median(case['call_seconds']) / 2)
    assert case['images_per_second'] == pytest.approx(8 / case['seconds_per_step'])
    assert case['compile_seconds'] >= case['lower_seconds'] > 0 and case['init_seconds'] > 0
    assert 100e6 < case['peak_rss_bytes'] < 100e9
    # XLA's buffers: at least the state the step takes and returns (float32 weights).
    assert case['xla_buffer_bytes'] > 4 * case['params']
    assert 0 < case['steps_peak_rss_bytes'] <= case['peak_rss_bytes']
    assert 0 < case['compile_peak_rss_bytes'] <= case['peak_rss_bytes']
    assert case['platform'] == 'cpu' and case['device_count'] >= 1
    assert case['jax_version'] == jax.__version__
    assert case['op_impl'] == 'cpu'  # 'auto' on a CPU backend
    assert case['x_vs_reference'] is None  # not the reference's network
    assert all(np.isfinite(v) for v in case['final_metrics'].values())

  switches = bench.stage_switches(config, 0)['normal']
  assert search_case['ops_per_edge'] == 4 and search_case['layers'] == 3
  assert search_case['params'] == search_weight_count(config, switches)
  assert search_case['arch_params'] == 2 * 14 * 4 + 2 * 14  # alphas and betas, both cells
  assert train_case['params'] == networks.count_params(
      genotypes.get('DARTS_V2'), channels=4, layers=3, auxiliary=True)

  projection, = report['projections']
  stage, = projection['stages']
  steps = 64 // 8  # 128 images split in half
  assert stage['steps_per_epoch'] == steps
  assert stage['seconds'] == pytest.approx(search_case['compile_seconds'] + steps * (
      search_case['seconds_per_step_frozen_arch'] + search_case['seconds_per_step']))
  assert projection['device_days'] == pytest.approx(stage['seconds'] / 86400)


def test_a_bad_option_fails_with_its_name():
  proc = run_bench('--what=search,eval')
  assert proc.returncode != 0
  assert "--what must be a comma list of ['search', 'train'], got 'search,eval'" in proc.stderr


@pytest.mark.parametrize('args, message', [
    (('--jobs=0',), '--jobs must be >= 1, got 0'),
    (('--jobs=2', '--noisolate'), '--jobs=2 needs --isolate'),
])
def test_bad_jobs_fail_with_the_option_named(args, message):
  proc = run_bench('--what=search', *args)
  assert proc.returncode != 0
  assert message in proc.stderr


def test_timing_lock_is_exclusive_across_open_files(tmp_path):
  path = str(tmp_path / 'timing.lock')
  with open(path, 'a') as other:
    with bench.timing_lock(path):
      with pytest.raises(BlockingIOError):  # held: another open file cannot take it
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released on leaving
    fcntl.flock(other, fcntl.LOCK_UN)
    with bench.timing_lock(path, exclusive=False):  # compiling: shared with other compiles,
      fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)
      fcntl.flock(other, fcntl.LOCK_UN)
      with pytest.raises(BlockingIOError):  # but no case times its steps meanwhile
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
  with bench.timing_lock(''):  # no lock file (one job): nothing to hold or create
    assert os.listdir(tmp_path) == ['timing.lock']


@pytest.mark.parametrize('options, message', [
    (dict(batch_size='0'), '--batch_size must be a comma list of positive integers'),
    (dict(batch_size='64,x'), '--batch_size must be a comma list of positive integers'),
    (dict(train_batch_size='-1'), '--train_batch_size must be a comma list'),
    (dict(what=''), '--what must be'),
    (dict(steps=0), '--steps must be >= 1'),
    (dict(warmup=-1), '--warmup must be >= 0'),
    (dict(steps_per_call=0), '--steps_per_call must be >= 1'),
    (dict(dtype='float16'), '--dtype must be one of'),
    (dict(devices=-1), '--devices must be >= 0'),
    (dict(devices=3, batch_size='64'), '--batch_size (64) must be divisible by the number'),
    (dict(stages='4'), 'the search config has 3 stage(s)'),
    (dict(project=True), '--project needs every stage'),
    (dict(project=True, stages='all', compile_only=True), '--project needs timed steps'),
    (dict(what='train', genotype='NO_SUCH_GENOTYPE'), 'NO_SUCH_GENOTYPE'),
    (dict(what='train', train_op_impl='fast'), "op_impl must be one of"),
    (dict(what='search', search_op_impl='fast'), "op_impl must be one of"),
])
def test_bad_options_raise_clear_errors(options, message):
  options = dict(options)
  search_config, train_config = pcp.get_config(), train_cifar10.get_config()
  search_config.op_impl = options.pop('search_op_impl', 'auto')
  train_config.op_impl = options.pop('train_op_impl', 'auto')
  with pytest.raises(ValueError) as error:
    bench.make_cases(search_config, train_config, **options)
  assert message in str(error.value)


def test_cases_cover_every_stage_and_batch_size():
  cases = bench.make_cases(pcp.get_config(), train_cifar10.get_config(), stages='all',
                           batch_size='64,256', project=True)
  search_cases = [(c['stage'], c['batch_size']) for c in cases if c['what'] == 'search']
  assert sorted(search_cases) == [(s, b) for s in range(3) for b in (64, 256)]
  train_case, = [c for c in cases if c['what'] == 'train']
  assert train_case['batch_size'] == 96  # the train config's


def test_later_stages_keep_the_number_of_ops_the_stage_before_keeps():
  config = pcp.get_config()
  counts = [bench.stage_switches(config, s)['normal'].sum(axis=1) for s in range(3)]
  assert [set(c.tolist()) for c in counts] == [{8}, {5}, {3}]
  last = bench.stage_switches(config, 2)['reduce'][0]
  assert [p for p, on in zip(genotypes.PRIMITIVES, last) if on] == [
      'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5']


def test_steps_per_epoch_is_the_paper_split_of_cifar10():
  assert bench.search_steps_per_epoch(pc_darts.get_config(), 64) == 25_000 // 64
  assert bench.search_steps_per_epoch(pc_darts.get_config(), 256) == 25_000 // 256


def test_reference_ratio_only_for_the_reference_network_on_cpu():
  result = dict(what='search', channels=16, layers=8, partial_k=4, ops_per_edge=8,
                platform='cpu', ss_factor=0.0, dtype='float32', batch_size=256,
                seconds_per_step=12.8)
  # 9.6 s per 64 images vs 12.8 s per 256 images: 3x the reference throughput.
  assert bench.reference_ratio(result) == pytest.approx(3.0)
  assert bench.reference_ratio(dict(result, platform='gpu')) is None
  assert bench.reference_ratio(dict(result, layers=17)) is None
  assert bench.reference_ratio(dict(result, ss_factor=0.75)) is None


def test_a_compile_only_case_shows_its_buffers_and_no_timing():
  result = dict(what='search', stage=2, batch_size=256, dtype='float32', layers=17,
                ops_per_edge=3, op_impl='cpu', init_seconds=80.0, compile_seconds=170.0,
                peak_rss_bytes=6 * 2**30, xla_buffer_bytes=20 * 2**30, params=1_000_000,
                compile_only=True)
  row = bench.format_table([result]).splitlines()[2].split()
  assert row[:4] == ['search', 'stage', '3', '17'] and row[10:12] == ['-', '-']
  assert '20.00' in row and 'GiB' in row


def test_a_failed_case_shows_in_the_table_with_its_error():
  failed = dict(what='search', stage=0, batch_size=64, dtype='float32',
                error='the case process exited with code -9')
  table = bench.format_table([failed])
  assert 'failed' in table and 'search stage 1, batch 64: the case process exited' in table
