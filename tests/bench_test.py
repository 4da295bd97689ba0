"""The benchmark: option errors name the flag, tiny cases run and report, compile-only sizes."""

import json
import math
import os
import subprocess
import sys

import pytest

from configs import pc_darts
from configs import pcp
from configs import train_cifar10
from pcp_jax import bench
from pcp_jax import bench_report
from pcp_jax import genotypes
from conftest import ROOT
from conftest import subprocess_env

# Batch 8 and these step counts everywhere: the compile-only test then finds the programs the
# timed test compiled in the persistent compilation cache.
TIMING = dict(steps=2, warmup=1)


def tiny_configs():
  return pc_darts.get_config('tiny'), train_cifar10.get_config('tiny')


@pytest.mark.parametrize('options, message', [
    (dict(what='search,eval'), "--what must be a comma list of ['search', 'train', 'curvature']"),
    (dict(what=''), '--what must be'),
    (dict(batch_size='0'), '--batch_size must be a comma list of positive integers'),
    (dict(batch_size='64,x'), '--batch_size must be a comma list of positive integers'),
    (dict(what='search', batch_size='1'), '--batch_size must be >= 2 for search'),
    (dict(steps=0), '--steps must be >= 1'),
    (dict(warmup=-1), '--warmup must be >= 0'),
    (dict(dtype='float16'), "--dtype must be one of ['float32', 'bfloat16']"),
    (dict(stages='4'), "--stages must be 'all' or 1-based stages of the search config (3"),
    (dict(stages='first'), '--stages must be a comma list of positive integers'),
    (dict(project=True), '--project needs every stage timed: add --stages=all'),
    (dict(project=True, stages='all', compile_only=True), '--project needs timed search'),
    (dict(project=True, what='train'), '--project needs timed search'),
    (dict(ss_factor=2.0), '--config: search.ss_factor must be in [0, 1], got 2.0'),
    (dict(genotype='NO_SUCH_GENOTYPE', what='train'), "--train_config: genotype 'NO_SUCH"),
    (dict(out='/no/such/folder/bench.json'), '--out must be a file in an existing writable'),
    (dict(population='0'), '--population must be a comma list of positive integers'),
])
def test_bad_options_fail_naming_the_flag(options, message, tmp_path):
  search_config, train_config = pcp.get_config(), train_cifar10.get_config()
  search_config.search.ss_factor = options.pop('ss_factor', 0.0)
  train_config.genotype = options.pop('genotype', 'PC_DARTS_cifar')
  with pytest.raises(ValueError) as error:
    bench.plan(search_config, train_config, **options)
  assert message in str(error.value)


@pytest.mark.slow
@pytest.mark.parametrize('args, message', [
    (['--what=search,eval'], "Error: --what must be a comma list of ['search', 'train', "
                             "'curvature'], got 'search,eval'."),
    (['--out={tmp}/missing/bench.json'], 'Error: --out must be a file in an existing writable '
                                         'folder'),
])
def test_the_command_fails_in_one_line_before_any_case_runs(args, message, tmp_path):
  args = [a.format(tmp=tmp_path) for a in args]
  proc = subprocess.run([sys.executable, '-m', 'pcp_jax.bench', *args], cwd=ROOT,
                        env=subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith(message), proc.stderr[-2000:]
  assert 'compiled in' not in proc.stderr and not os.listdir(tmp_path)


@pytest.mark.slow  # compiles; the quick suite keeps the option checks
def test_a_tiny_search_train_and_curvature_case_run_and_report(tmp_path, capsys):
  search_config, train_config = tiny_configs()
  search_config.search.curvature_steps = 4
  search_config.search.curvature_batch = 8  # the meter's batch, whatever --batch_size says
  # In bfloat16 (the GPU check's CPU form times float32 and a population of 2).
  timing = dict(TIMING, dtype='bfloat16')
  cases = bench.plan(search_config, train_config, what='search,train,curvature',
                     batch_size='8', project=True, **timing)
  assert [(c['what'], c['stage'], c['batch_size'], c['population']) for c in cases] == [
      ('search', 0, 8, 0), ('curvature', 0, 8, 0), ('train', None, 8, 0)]
  out = tmp_path / 'bench.json'
  bench.benchmark(search_config, train_config, cases, out=str(out), project=True, **timing)
  printed = capsys.readouterr().out
  report = json.loads(out.read_text())
  search_case, curvature_case, train_case = report['cases']
  assert {c['dtype'] for c in report['cases']} == {'bfloat16'}
  assert search_case['case'] == 'search stage 1 (3 cells, 4 ops)'
  assert train_case['case'] == 'train (3 cells, PC_DARTS_cifar)'
  for case in (search_case, train_case):
    assert math.isfinite(case['images_per_second']) and case['images_per_second'] > 0
    assert case['images_per_second'] == pytest.approx(8 / case['seconds_per_step'])
    assert case['finite_losses'] and case['init_seconds'] > 0 and case['compile_seconds'] > 0
    assert case['xla_buffer_bytes'] > 0 and case['peak_memory_bytes'] > 100e6
    assert case['memory_kind'] == 'RSS'  # a CPU
    assert f"| {case['case']} | 8 | {case['images_per_second']:.1f} |" in printed
  assert printed.index('| case | batch | img/s | s/step | init s | compile s | peak RSS |') < (
      printed.index('| search stage 1'))
  assert 'seconds_per_step_frozen_arch' not in train_case
  projection, = report['projections']
  steps = 64 // 8  # 128 images split in half
  stage, = search_config.search.stages
  assert projection['steps_per_epoch'] == steps
  assert projection['hours'] * 3600 == pytest.approx(search_case['compile_seconds'] + steps * (
      stage.warmup_epochs * search_case['seconds_per_step_frozen_arch']
      + (stage.epochs - stage.warmup_epochs) * search_case['seconds_per_step']))
  assert projection['device_days'] == pytest.approx(projection['hours'] / 24)
  assert 'Projected search at batch 8:' in printed and f'Wrote {out}' in printed
  # The meter: one estimate per timed step, its cost against the search step of its batch.
  assert curvature_case['case'] == 'curvature, stage 1 (3 cells, 4 ops), 4 products'
  assert len(curvature_case['curvature_history']) == 4 and curvature_case['finite_losses']
  cost, = report['curvature_costs']
  assert cost['estimate_in_steps'] == pytest.approx(
      curvature_case['seconds_per_step'] / search_case['seconds_per_step'])
  assert cost['share'] == pytest.approx(cost['estimate_in_steps'] / (2 * steps))
  assert 1 <= cost['products_to_1e3'] <= 4 and cost['meter_batch'] == 8
  assert f"{curvature_case['case']} on 8 images: one estimate (" in printed


def test_a_case_that_fails_is_a_row_and_the_others_still_run(monkeypatch, capsys):
  search_config, train_config = tiny_configs()
  cases = [dict(what='search', stage=0, batch_size=8, devices=1)] * 2

  def run_case(case, config, **timing):
    if len(calls) == 0:
      calls.append(case)
      raise MemoryError('Out of memory allocating 33226921000 bytes.')
    calls.append(case)
    return dict(case, case='ok', seconds_per_step=1.0, images_per_second=8.0, init_seconds=1.0,
                compile_seconds=1.0, peak_memory_bytes=1, xla_buffer_bytes=1, memory_kind='RSS')

  calls = []
  monkeypatch.setattr(bench, 'run_case', run_case)
  report = bench.benchmark(search_config, train_config, cases, **TIMING)
  failed, ran = report['cases']
  assert 'Out of memory' in failed['error'] and ran['case'] == 'ok' and len(calls) == 2
  assert '| search (failed) | 8 | Out of memory allocating 33226921000 bytes. |' in (
      capsys.readouterr().out)


@pytest.mark.slow  # compiles; the quick suite keeps the option checks
def test_compile_only_reports_xla_buffer_bytes_without_running(capsys):
  search_config, train_config = tiny_configs()
  cases = bench.plan(search_config, train_config, what='search', batch_size='8',
                     compile_only=True, **TIMING)
  report = bench.benchmark(search_config, train_config, cases, compile_only=True, **TIMING)
  case, = report['cases']
  assert case['xla_buffer_bytes'] > 0 and 'seconds_per_step' not in case
  assert f"| {case['case']} | 8 | - | - |" in capsys.readouterr().out


def test_later_stages_keep_the_costliest_ops_the_stage_before_keeps():
  config = pcp.get_config()
  counts = [bench.stage_switches(config, s)['normal'].sum(axis=1) for s in range(3)]
  assert [set(c.tolist()) for c in counts] == [{8}, {5}, {3}]
  last = bench.stage_switches(config, 2)['reduce'][0]
  assert [p for p, on in zip(genotypes.PRIMITIVES, last) if on] == [
      'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5']


def test_steps_per_epoch_is_the_paper_split_of_cifar10():
  assert bench_report.search_steps_per_epoch(pc_darts.get_config(), 64) == 25_000 // 64
  assert bench_report.search_steps_per_epoch(pc_darts.get_config(), 256) == 25_000 // 256


def test_population_gains_pair_each_population_with_its_solo_case():
  def timed(population, ips, dtype='float32', batch=64):
    return dict(what='search', stage=1, batch_size=batch, population=population, dtype=dtype,
                config='pc_darts', case=f'x{population} {dtype}', seconds_per_step=1.0,
                images_per_second=ips, xla_buffer_bytes=2**30 * max(population, 1))
  results = [timed(0, 100.0), timed(0, 150.0, 'bfloat16'), timed(8, 450.0),
             timed(8, 900.0, 'bfloat16'), timed(4, 300.0, batch=256)]  # no solo at 256
  gains = bench_report.population_gains(results)
  assert [(g['case'], g['ratio']) for g in gains] == [('x8 float32', 4.5),
                                                       ('x8 bfloat16', 6.0)]
  lines = '\n'.join(bench_report.population_lines(gains, 8, 4.0))
  assert '| x8 float32 | 64 | 8 | 450.0 | 100.0 | 4.50x | 8.00 GiB | 1.00 GiB |' in lines
  assert '**met** (6.00x at best)' in lines
  assert '**not met** (4.50x at best)' in '\n'.join(bench_report.population_lines(gains[:1], 8, 5))
  assert bench_report.population_lines([], 8, 4.0) == []
