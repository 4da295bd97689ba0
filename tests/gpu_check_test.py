"""The GPU check: its CPU form runs end to end (tiny), its report merges hand-written case files
(a failed, a killed and a skipped case among them), its case list is the issue's and valid."""

import importlib
import json
import math
import os
import subprocess

import numpy as np
import pytest

from conftest import ROOT
from conftest import subprocess_env
from pcp_jax import bench
from pcp_jax import gpu_check

SCRIPT = os.path.join(ROOT, 'launch', 'gpu_check.sh')
TIMEOUT = 1200


def _config(path):
  module, _, arg = path[len('configs/'):].partition(':')
  return importlib.import_module(f'configs.{module[:-3]}').get_config(arg or None)


@pytest.mark.parametrize('tiny', [False, True])
def test_the_cases_are_the_issues_and_pcp_jax_bench_accepts_each(tiny):
  cases = gpu_check.plan(tiny)
  names = [c['name'] for c in cases]
  assert len(set(names)) == len(names)
  for c in cases:  # each plans exactly one bench case
    flags = dict(f[2:].split('=', 1) for f in c['flags'])
    search = c['what'] == 'search'
    config = _config(flags['config' if search else 'train_config'])
    planned = bench.plan(config if search else None, None if search else config,
                         what=c['what'], batch_size=flags['batch_size'],
                         stages=flags.get('stages', '1'), dtype=flags['dtype'],
                         steps=int(flags['steps']), warmup=int(flags['warmup']),
                         population=flags.get('population', ''))
    # A population's flag plans the solo case too (the case runner keeps the population's).
    assert [(p['what'], p['batch_size'], p['population']) for p in planned][-1:] == [
        (c['what'], c['batch_size'], c['population'])]
  got = {(c['config'], c['stage'], c['batch_size'], c['dtype'], c['population']) for c in cases}
  if tiny:
    assert got == {('pc_darts', 1, 8, 'float32', 0), ('pc_darts', 1, 8, 'float32', 2)}
  else:
    assert got == {(config, stage, batch, dtype, 0) for dtype in ('float32', 'bfloat16')
                   for config, stage, batch in (
                       [('pc_darts', 1, 64), ('pc_darts', 1, 256), ('train_cifar10', None, 96)]
                       + [(c, s, 256) for c in ('pcp', 'ss_pcp') for s in (1, 2, 3)])} | {
                           ('pc_darts', 1, batch, 'float32', n) for n in (2, 4, 8)
                           for batch in (64, 256)}
    assert [c['dtype'] for c in cases] == sorted(c['dtype'] for c in cases)[::-1]  # f32 first


def _case_file(out, name, flags, **fields):
  report = dict(case=dict(name=name, **fields), platform='gpu', device_kind='NVIDIA H100',
                device_count=1, jax_version='0.0.test', compilation_cache_dir='')
  (out / 'cases' / f'{name}.json').write_text(json.dumps(report))
  return f"{name} {' '.join(flags)}"


def _timed(stage, seconds, batch=256, stages=1, method='PCP-DARTS'):
  return dict(what='search', stage=stage - 1, batch_size=batch, devices=1,
              case=f'search stage {stage}', method=method, images_per_second=100.0,
              seconds_per_step=batch / 100.0, seconds_per_step_frozen_arch=1.0,
              compile_seconds=30.0, init_seconds=2.0, finite_losses=True,
              memory_kind='device', peak_memory_bytes=3 * 2**30, xla_buffer_bytes=2**30,
              stages_in_search=stages, steps_per_epoch=97, projected_stage_seconds=seconds)


def _determinism(out, same=True):
  base = out / 'determinism'
  (base / 'args.txt').write_text('--config=configs/pc_darts.py:tiny\n')
  for run, scale in (('run_a', 1.0), ('run_b', 1.0 if same else 1.0 + 1e-7)):
    (base / run).mkdir()
    (base / f'{run}.rc').write_text('0\n')
    (base / run / 'genotype.json').write_text('{"normal": []}\n')
    np.savez(base / run / 'arch.npz', alphas_normal=np.full((14, 8), 0.125 * scale, np.float32),
             switches_normal=np.ones((14, 8), bool))


def _hand_written(tmp_path, same=True):
  out = tmp_path / 'out'
  (out / 'cases').mkdir(parents=True)
  (out / 'determinism').mkdir()
  pcp = ['--config=configs/pcp.py', '--what=search', '--batch_size=256', '--dtype=float32']
  lines = [_case_file(out, f'pcp_s{s}_b256_float32', pcp + [f'--stages={s}'],
                      **_timed(s, 3600.0 * s, stages=3)) for s in (1, 2, 3)]
  lines.append(_case_file(out, 'pc_darts_s1_b256_float32',
                          ['--config=configs/pc_darts.py', '--what=search', '--batch_size=256',
                           '--dtype=float32', '--stages=1'],
                          **_timed(1, 8640.0, method='PC-DARTS')))
  # Out of memory: the runner wrote its JSON with the error.
  lines.append(_case_file(out, 'ss_pcp_s3_b256_float32',
                          ['--config=configs/ss_pcp.py', '--what=search', '--batch_size=256',
                           '--dtype=float32', '--stages=3'],
                          what='search', stage=2, batch_size=256, method='SS PCP-DARTS',
                          error='XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory'))
  # Killed by the time limit: no JSON, an exit status and a log.
  lines.append('train_cifar10_b96_bfloat16 --train_config=configs/train_cifar10.py '
               '--what=train --batch_size=96 --dtype=bfloat16')
  (out / 'cases' / 'train_cifar10_b96_bfloat16.rc').write_text('124\n')
  (out / 'cases' / 'train_cifar10_b96_bfloat16.log').write_text('I compiling\nstill compiling\n')
  # Cut by the time budget.
  lines.append('pcp_s1_b256_bfloat16 ' + ' '.join(pcp[:-1] + ['--dtype=bfloat16', '--stages=1']))
  (out / 'cases' / 'pcp_s1_b256_bfloat16.skipped').write_text('skipped: time budget (570 s)\n')
  (out / 'cases.txt').write_text('\n'.join(lines) + '\n')
  _determinism(out, same)
  return out


def test_summarize_merges_cases_failures_projections_and_determinism(tmp_path):
  out = _hand_written(tmp_path)
  report = gpu_check.summarize(str(out))
  assert report == json.loads((out / 'gpu_check.json').read_text())
  rows = {r['name']: r for r in report['cases']}
  assert list(rows) == ['pcp_s1_b256_float32', 'pcp_s2_b256_float32', 'pcp_s3_b256_float32',
                        'pc_darts_s1_b256_float32', 'ss_pcp_s3_b256_float32',
                        'train_cifar10_b96_bfloat16', 'pcp_s1_b256_bfloat16']
  assert [rows[f'pcp_s{s}_b256_float32']['stage'] for s in (1, 2, 3)] == [1, 2, 3]
  assert rows['pcp_s2_b256_float32']['ok']
  assert 'RESOURCE_EXHAUSTED' in rows['ss_pcp_s3_b256_float32']['error']
  killed = rows['train_cifar10_b96_bfloat16']
  assert not killed['ok'] and killed['error'].startswith('timed out or killed (exit 124)')
  assert 'still compiling' in killed['error']
  assert (killed['config'], killed['batch_size'], killed['dtype']) == (
      'train_cifar10', 96, 'bfloat16')
  assert rows['pcp_s1_b256_bfloat16']['error'] == 'skipped: time budget (570 s)'
  assert not report['ok'] and report['determinism']['same']
  assert report['device_kind'] == 'NVIDIA H100' and report['jax_version'] == '0.0.test'

  projections = {(p['config'], p['dtype']): p for p in report['projections']}
  pcp = projections['pcp', 'float32']
  assert pcp['stages_timed'] == 3 and pcp['hours'] == pytest.approx(6.0)
  assert pcp['device_days'] == pytest.approx(0.25)
  assert [r['gpu_days'] for r in pcp['references']] == [0.163, 0.1]
  pc_darts = projections['pc_darts', 'float32']
  assert pc_darts['device_days'] == pytest.approx(0.1)
  assert [r['gpu_days'] for r in pc_darts['references']] == [0.1]
  ss_pcp = projections['ss_pcp', 'float32']
  assert ss_pcp['stages_timed'] == 0 and ss_pcp['device_days'] is None
  assert 0.163 in [r['gpu_days'] for r in ss_pcp['references']]
  assert projections['pcp', 'bfloat16']['device_days'] is None

  md = (out / 'gpu_check.md').read_text()
  assert 'Device: NVIDIA H100 (gpu, 1 device(s)); JAX 0.0.test' in md
  assert ('| search stage 2 | PCP-DARTS | 2 | 256 | float32 | 100.0 | 2.56 | 1 | 30.0 | '
          '3.00 GiB | 1.00 GiB | ok |') in md
  assert '| SS PCP-DARTS | 3 | 256 | float32 | - | - | - | - | - | - | XlaRuntimeError: ' in md
  assert '| skipped: time budget (570 s) |' in md
  assert ('| PCP-DARTS | 256 | float32 | 3 of 3 | 6.000 | 0.2500 | 0.163 GPU-days, PCP-DARTS '
          '(the paper); 0.1 GPU-days, PC-DARTS (published) |') in md
  assert '| PC-DARTS | 256 | float32 | 1 of 1 | 2.400 | 0.1000 | 0.1 GPU-days' in md
  assert '**same**: same genotype and architecture weights, bit for bit' in md
  assert 'All cases ran and the runs agree: **no**.' in md
  assert '| search | batch | dtype | stages timed | hours | GPU-days | published |' in md


def test_summarize_reports_differing_arch_weights_and_a_failed_run(tmp_path):
  out = _hand_written(tmp_path, same=False)
  det = gpu_check.summarize(str(out))['determinism']
  assert not det['same'] and det['same_genotype'] and not det['same_arch_weights']
  assert det['differing_arrays'] == ['alphas_normal'] and 0 < det['max_abs_difference'] < 1e-6
  assert '**DIFFERENT**: arch arrays' in (out / 'gpu_check.md').read_text()
  (out / 'determinism' / 'run_b.rc').write_text('1\n')
  (out / 'determinism' / 'run_b.log').write_text('ValueError: no data\n')
  det = gpu_check.summarize(str(out))['determinism']
  assert not det['same'] and det['error'] == 'run_b: exit 1; last log line: ValueError: no data'


@pytest.mark.slow
def test_the_cpu_form_runs_every_case_and_the_determinism_check(tmp_path):
  out = tmp_path / 'gpu check'  # a space in the path
  proc = subprocess.run(['bash', SCRIPT, str(out), '--tiny'], cwd=tmp_path, env=subprocess_env(),
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads((out / 'gpu_check.json').read_text())
  md = (out / 'gpu_check.md').read_text()
  assert report['ok'] and report['tiny'] and report['platform'] == 'cpu'
  planned = [c['name'] for c in gpu_check.plan(tiny=True)]
  assert [r['name'] for r in report['cases']] == planned
  for r in report['cases']:
    assert r['ok'] and 'error' not in r, r
    assert math.isfinite(r['images_per_second']) and r['images_per_second'] > 0
    assert r['compile_seconds'] > 0 and r['peak_memory_bytes'] > 0
    assert f"| {r['batch_size']} | {r['dtype']} | {r['images_per_second']:.1f} |" in md
  solo, pair = report['cases']  # the tiny search alone and as 2 members in one program
  assert (solo['population'], pair['population']) == (0, 2)
  gain, = report['population_gains']
  assert (gain['members'], gain['batch_size']) == (2, 8)
  assert gain['ratio'] == pytest.approx(pair['images_per_second'] / solo['images_per_second'])
  assert f"| {gain['ratio']:.2f}x |" in md
  assert 'Goal, 8 members at 4x one search: not measured' in md
  projections = {(p['config'], p['batch_size'], p['dtype']): p for p in report['projections']}
  p = projections['pc_darts', 8, 'float32']
  assert p['device_days'] > 0 and p['references'][0]['gpu_days'] == 0.1
  assert '0.1 GPU-days, PC-DARTS' in md
  det = report['determinism']
  assert det['same'] and det['same_genotype'] and det['same_arch_weights'] and det['arrays'] > 2
  assert 'All cases ran and the runs agree: **yes**.' in md
  assert 'All cases ran and the runs agree: **yes**.' in proc.stdout
