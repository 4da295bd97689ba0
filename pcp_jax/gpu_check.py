"""The GPU check's cases, its one-case runner and its report: driven by `launch/gpu_check.sh`.

  launch/gpu_check.sh OUT_DIR            # on the GPU: under 10 minutes
  launch/gpu_check.sh OUT_DIR --tiny     # the CPU form (CI): tiny configs, about 2-3 minutes

Subcommands (the script calls them; each prints or writes what the next step reads):

  python -m pcp_jax.gpu_check cases [--tiny]        one line per case: NAME ARGS...
  python -m pcp_jax.gpu_check case BENCH_FLAGS --out=OUT_DIR/cases/NAME.json
  python -m pcp_jax.gpu_check determinism [--tiny]  the pcp_jax.main arguments of the two runs
  python -m pcp_jax.gpu_check device                platform, device kind, JAX version (JSON)
  python -m pcp_jax.gpu_check summarize OUT_DIR     OUT_DIR/gpu_check.json and gpu_check.md

A case is one search stage or the train step at one batch size and dtype, timed by
`pcp_jax.bench` in a process of its own (so that its peak memory is its own). `case` takes
`pcp_jax.bench`'s flags; unlike `pcp_jax.bench --project` it times a single stage with the
architecture frozen too and records that stage's share of the projected search, so that a stage
that fails (out of memory) or is cut by the time budget loses only its own row. An error in a
case is written to its JSON ('error') instead of stopping the script; `summarize` also records
cases whose process died (killed, timed out) or was skipped for the time budget.
"""

import copy
import json
import math
import os
import sys

from absl import app
from absl import logging
import jax
import numpy as np

from pcp_jax import bench
from pcp_jax import bench_report
from pcp_jax.cpu import host

# The published search costs set beside the projections: (GPU-days, source).
PAPER_PCP_GPU_DAYS = 0.163  # PCP-DARTS, the paper (Table I; V100)
PAPER_SS_PCP_GPU_DAYS = 0.199  # SS PCP-DARTS at ssf 0.75, the paper (configs/ss_pcp.py)
PC_DARTS_GPU_DAYS = 0.1  # PC-DARTS, as published
REFERENCES = {
    'pc_darts': [(PC_DARTS_GPU_DAYS, 'PC-DARTS (published)')],
    'pcp': [(PAPER_PCP_GPU_DAYS, 'PCP-DARTS (the paper)'),
            (PC_DARTS_GPU_DAYS, 'PC-DARTS (published)')],
    'ss_pcp': [(PAPER_PCP_GPU_DAYS, 'PCP-DARTS (the paper)'),
               (PAPER_SS_PCP_GPU_DAYS, 'SS PCP-DARTS ssf 0.75 (the paper, configs/ss_pcp.py)'),
               (PC_DARTS_GPU_DAYS, 'PC-DARTS (published)')],
}
DTYPES = ('float32', 'bfloat16')
POPULATIONS = (2, 4, 8)  # members of the population cases (1: the solo cases)
POPULATION_GOAL = (8, 4.0)  # 8 members at 4x the img/s of one search


def _case(config, what, batch, dtype, stage=None, arg='', population=0, op_impl=''):
  """One case: `config` a file stem under configs/, `stage` 1-based (search cases),
  `population` N > 0: N members of that search as one program (`pcp_jax.bench`), `op_impl`
  a kernel set other than the device's own."""
  name = (f'{config}_{"s%d_" % stage if stage else ""}b{batch}_{dtype}'
          + (f'_x{population}' if population else '') + (f'_{op_impl}' if op_impl else ''))
  path = f"configs/{config}.py{':' + arg if arg else ''}"
  flags = [f'--{"config" if what == "search" else "train_config"}={path}', f'--what={what}',
           f'--batch_size={batch}', f'--dtype={dtype}']
  if stage:
    flags.append(f'--stages={stage}')
  if population:
    flags.append(f'--population={population}')
  if op_impl:
    flags.append(f'--config.op_impl={op_impl}')
  return dict(name=name, config=config, what=what, stage=stage, batch_size=batch, dtype=dtype,
              population=population, flags=flags)


def plan(tiny=False):
  """The cases in the order they run: float32 first, then bfloat16, so that a time budget that
  runs out cuts bfloat16 cases first.

  Full (a GPU): PC-DARTS at batch 64 and 256, the train step at 96 (the paper's recipe), each
  stage of PCP-DARTS and SS PCP-DARTS at the paper's 256; float32 and bfloat16; populations of
  2, 4 and 8 PC-DARTS searches at batch 64 and 256 in float32 (the goal: 8 members at 4x the
  img/s of one search, i.e. of 8 searches one after another), after the float32 cases, and 8
  members with the matrix-product kernels (`op_impl=cpu`): vmapped, XLA's 1x1 convolutions
  become grouped convolutions, the kernels' matrix products batched ones.
  Tiny (a CPU, CI): PC-DARTS's `:tiny` form at batch 8 alone and as a population of 2 (float32),
  the script's machinery (bench_test times the train step in bfloat16, and the progressive
  stages' projection is summarize's, tested on written case files).
  """
  cases = []
  if tiny:
    steps = ['--steps=2', '--warmup=1']
    cases = [_case('pc_darts', 'search', 8, 'float32', 1, 'tiny', population=n) for n in (0, 2)]
  else:
    steps = ['--steps=5', '--warmup=2']
    for dtype in DTYPES:
      cases += [_case('pc_darts', 'search', 256, dtype, 1),
                _case('pc_darts', 'search', 64, dtype, 1),
                _case('train_cifar10', 'train', 96, dtype)]
      cases += [_case(c, 'search', 256, dtype, s) for c in ('pcp', 'ss_pcp') for s in (1, 2, 3)]
      if dtype == 'float32':
        cases += [_case('pc_darts', 'search', b, dtype, 1, population=n)
                  for n in POPULATIONS for b in (64, 256)]
        cases.append(_case('pc_darts', 'search', 256, dtype, 1, population=8, op_impl='cpu'))
  for c in cases:
    c['flags'] += steps
  return cases


def determinism_args(tiny=False):
  """pcp_jax.main's arguments (less --workdir) of each determinism run: a short PC-DARTS search
  (one epoch, the architecture trained from the first step) on the shipped CIFAR-10 subset, so
  that no dataset download is needed. The full form searches 5 cells at batch 64 on 1024 images
  (8 steps), all 8 ops."""
  stage = '--config.search.stages[0]'
  if tiny:
    return ['--config=configs/pc_darts.py:tiny', f'{stage}.epochs=1', f'{stage}.warmup_epochs=0']
  return ['--config=configs/pc_darts.py', '--config.data.source=subset',
          '--config.data.max_train=1024', '--config.search.batch_size=64',
          '--config.search.eval_batch_size=256', f'{stage}.layers=5', f'{stage}.epochs=1',
          f'{stage}.warmup_epochs=0']


# ---------------------------------------------------------------------------
# One case (a process of its own).


def run_case(argv):
  """`case`: times the one case pcp_jax.bench's flags name and writes its JSON to --out."""
  FLAGS = bench.FLAGS
  if len(argv) > 1:
    raise SystemExit(f'Error: unexpected arguments {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  timing = dict(steps=FLAGS.steps, warmup=FLAGS.warmup, dtype=FLAGS.dtype)
  try:
    cases = bench.plan(FLAGS.config, FLAGS.train_config, what=FLAGS.what, out=FLAGS.out,
                       batch_size=FLAGS.batch_size, stages=FLAGS.stages,
                       population=FLAGS.population, **timing)
    # A population's flag plans the solo case too: the case is the population's.
    cases = [c for c in cases if bool(c.get('population')) == bool(FLAGS.population)]
    bench._check(len(cases) == 1 and FLAGS.out, 'a GPU check case is one stage or the train '
                 'step at one batch size, written to --out.')
  except ValueError as e:
    raise SystemExit(f'Error: {e}') from None
  case, = cases
  search = case['what'] == 'search'
  config = FLAGS.config if search else FLAGS.train_config
  record = dict(case, name=os.path.splitext(os.path.basename(FLAGS.out))[0], dtype=FLAGS.dtype,
                method=config.get('method', 'PC-DARTS') if search else
                f'train {config.genotype}')
  try:
    result = bench.run_case(case, config, project=search, **timing)
    record.update(result)
    if search and not case.get('population'):
      # bench's projection formula on this stage alone: the stages' shares add up to
      # bench_report.project_search over all of them.
      one = copy.deepcopy(config)
      one.search.stages = [config.search.stages[case['stage']]]
      projection, = bench_report.project_search(one, [dict(result, stage=0)])
      record.update(stages_in_search=len(config.search.stages),
                    steps_per_epoch=projection['steps_per_epoch'],
                    projected_stage_seconds=projection['hours'] * 3600)
  except Exception as e:  # pylint: disable=broad-except; out of memory and the like
    message = str(e).strip().splitlines()
    record['error'] = f'{type(e).__name__}: {message[0] if message else ""}'[:300]
    logging.exception('Case %s failed.', record['name'])
  device = jax.local_devices()[0]
  report = dict(case=record, argv=sys.argv[1:], platform=device.platform,
                device_kind=device.device_kind, device_count=jax.device_count(),
                jax_version=jax.__version__,
                compilation_cache_dir=jax.config.jax_compilation_cache_dir or '')
  with open(FLAGS.out, 'w') as f:
    json.dump(report, f, indent=1, default=str)
  print(f'Wrote {FLAGS.out}' + (f" ({record['error']})" if 'error' in record else ''))
  if 'error' in record:
    raise SystemExit(1)


def device_info():
  device = jax.local_devices()[0]
  return dict(platform=device.platform, device_kind=device.device_kind,
              device_count=jax.device_count(), jax_version=jax.__version__,
              compilation_cache_dir=jax.config.jax_compilation_cache_dir or '')


# ---------------------------------------------------------------------------
# The report.


def _read(path, default=None):
  try:
    with open(path) as f:
      return f.read()
  except OSError:
    return default


def _last_line(path):
  lines = [line.strip() for line in (_read(path, '') or '').splitlines() if line.strip()]
  return lines[-1][:300] if lines else ''


def _outcome(cases_dir, name):
  """A case's record: its JSON, or why there is none (skipped, killed, timed out, not run)."""
  text = _read(os.path.join(cases_dir, f'{name}.json'))
  if text is not None:
    try:
      report = json.loads(text)
      return report['case'], report
    except (ValueError, KeyError):
      return dict(error=f'unreadable {name}.json'), None
  skipped = _read(os.path.join(cases_dir, f'{name}.skipped'))
  if skipped is not None:
    return dict(error=skipped.strip() or 'skipped', skipped=True), None
  rc = (_read(os.path.join(cases_dir, f'{name}.rc')) or '').strip()
  log = os.path.join(cases_dir, f'{name}.log')
  if rc in ('124', '137'):
    return dict(error=f'timed out or killed (exit {rc}); last log line: {_last_line(log)}'), None
  if rc:
    return dict(error=f'exit {rc}; last log line: {_last_line(log)}'), None
  return dict(error='not run'), None


def _plan_from_file(out_dir):
  """The planned cases, as `cases` wrote them to OUT_DIR/cases.txt."""
  text = _read(os.path.join(out_dir, 'cases.txt'), '') or ''
  return [line.split()[0] for line in text.splitlines() if line.strip()]


def _parse_flags(flags):
  values = dict(f[2:].split('=', 1) for f in flags if f.startswith('--') and '=' in f)
  path = values.get('config') or values.get('train_config', '')
  config = os.path.basename(path.split(':')[0])[:-3] if path else ''
  return dict(config=config, what=values.get('what', ''),
              stage=int(values['stages']) if values.get('stages', '').isdigit() else None,
              batch_size=int(values.get('batch_size', '0') or 0),
              dtype=values.get('dtype', 'float32'),
              population=int(values['population']) if values.get('population', '').isdigit()
              else 0)


def determinism(out_dir):
  """Compares the two determinism runs: genotype.json byte for byte, every array of arch.npz
  bit for bit (the zip file itself holds timestamps)."""
  base = os.path.join(out_dir, 'determinism')
  runs = [os.path.join(base, r) for r in ('run_a', 'run_b')]
  result = dict(xla_flags='--xla_gpu_deterministic_ops=true', same=False,
                args=(_read(os.path.join(base, 'args.txt'), '') or '').split())
  for run in runs:
    rc = (_read(run + '.rc') or '').strip()
    if rc != '0':
      result['error'] = (f'{os.path.basename(run)}: ' + (
          f'exit {rc}; last log line: {_last_line(run + ".log")}' if rc else 'not run'))
      return result
  genotypes = [_read(os.path.join(r, 'genotype.json')) for r in runs]
  if None in genotypes:
    result['error'] = 'a run wrote no genotype.json'
    return result
  result['same_genotype'] = genotypes[0] == genotypes[1]
  result['genotype'] = json.loads(genotypes[0])
  try:
    arrays = [dict(np.load(os.path.join(r, 'arch.npz'))) for r in runs]
  except (OSError, ValueError) as e:
    result['error'] = f'arch.npz: {e}'
    return result
  differ = sorted(k for k in set(arrays[0]) | set(arrays[1])
                  if k not in arrays[0] or k not in arrays[1]
                  or arrays[0][k].dtype != arrays[1][k].dtype
                  or arrays[0][k].shape != arrays[1][k].shape
                  or arrays[0][k].tobytes() != arrays[1][k].tobytes())
  result.update(arrays=len(arrays[0]), differing_arrays=differ,
                same_arch_weights=not differ)
  if differ:
    result['max_abs_difference'] = max(
        (float(np.max(np.abs(arrays[0][k].astype(np.float64) - arrays[1][k])))
         for k in differ if k in arrays[0] and k in arrays[1]
         and arrays[0][k].shape == arrays[1][k].shape), default=None)
  result['same'] = result['same_genotype'] and result['same_arch_weights']
  return result


def projections(rows):
  """Per search config, batch and dtype: the full search's projected hours and device-days
  (the sum of its stages' shares), when every stage was timed; the published costs beside."""
  groups = {}
  for r in rows:
    if r.get('what') == 'search' and not r.get('population'):
      groups.setdefault((r['config'], r['batch_size'], r['dtype']), []).append(r)
  out = []
  for (config, batch, dtype), members in groups.items():
    timed = {r['stage']: r for r in members if 'projected_stage_seconds' in r}
    n = max([r.get('stages_in_search', 0) for r in members] or [0])
    p = dict(config=config, method=members[0].get('method', config), batch_size=batch,
             dtype=dtype, stages_timed=len(timed), stages=n or None, hours=None,
             device_days=None, references=[dict(gpu_days=d, source=s)
                                           for d, s in REFERENCES.get(config, [])])
    if n and len(timed) == n:
      seconds = sum(r['projected_stage_seconds'] for r in timed.values())
      devices = next(iter(timed.values())).get('devices', 1)
      p.update(hours=seconds / 3600, device_days=seconds * devices / 86400,
               steps_per_epoch=next(iter(timed.values()))['steps_per_epoch'])
    out.append(p)
  return out


def summarize(out_dir):
  """Merges the cases' JSONs and the determinism runs into gpu_check.json and gpu_check.md;
  returns the report (report['ok']: every case ran and the runs agree)."""
  cases_dir = os.path.join(out_dir, 'cases')
  info = {}
  text = _read(os.path.join(out_dir, 'device.json'))
  if text:
    try:
      info = json.loads(text)
    except ValueError:
      pass
  planned = _read(os.path.join(out_dir, 'cases.txt'), '') or ''
  rows = []
  for line in planned.splitlines():
    if not line.strip():
      continue
    name, *flags = line.split()
    record, report = _outcome(cases_dir, name)
    # The planned config, stage (1-based; bench counts from 0), batch and dtype.
    row = dict(record, **_parse_flags(flags), name=name)
    row['ok'] = 'error' not in row and math.isfinite(row.get('images_per_second', math.nan)) \
        and row.get('finite_losses', False)
    rows.append(row)
    if report:
      for key in ('platform', 'device_kind', 'device_count', 'jax_version',
                  'compilation_cache_dir'):
        info.setdefault(key, report.get(key))
  det = determinism(out_dir)
  report = dict(cases=rows, projections=projections(rows), determinism=det,
                population_gains=bench_report.population_gains(rows),
                ok=bool(rows) and all(r['ok'] for r in rows) and det['same'],
                tiny=(_read(os.path.join(out_dir, 'mode.txt'), '') or '').strip() == 'tiny',
                budget=(_read(os.path.join(out_dir, 'budget.txt'), '') or '').strip(), **info)
  with open(os.path.join(out_dir, 'gpu_check.json'), 'w') as f:
    json.dump(report, f, indent=1, default=str)
  with open(os.path.join(out_dir, 'gpu_check.md'), 'w') as f:
    f.write(markdown(report))
  return report


def _size(n):
  if n is None:
    return '-'
  return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def _num(x, spec):
  return '-' if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown(report):
  kind = next((r['memory_kind'] for r in report['cases'] if 'memory_kind' in r),
              'RSS' if report.get('platform') == 'cpu' else 'device')
  lines = [f"# GPU check{' (tiny CPU form)' if report.get('tiny') else ''}", '',
           f"Device: {report.get('device_kind', 'unknown')} ({report.get('platform', '?')}, "
           f"{report.get('device_count', '?')} device(s)); JAX {report.get('jax_version', '?')}"
           f"; compilation cache: {report.get('compilation_cache_dir') or 'off'}"
           + (f"; time budget: {report['budget']}" if report.get('budget') else '') + '.', '',
           '| case | config | stage | batch | dtype | img/s | s/step | s/step frozen arch | '
           f'compile s | peak {kind} | XLA buffers | status |',
           '| --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |']
  for r in report['cases']:
    status = 'ok' if r['ok'] else ('non-finite loss' if 'error' not in r and 'finite_losses' in r
                                   else r.get('error', 'failed')).replace('|', '/')
    lines.append('| ' + ' | '.join(str(c) for c in (
        r.get('case', r['name']), r.get('method', r.get('config', '')),
        r.get('stage') or '-', r.get('batch_size', '-'), r.get('dtype', '-'),
        _num(r.get('images_per_second'), '.1f'), _num(r.get('seconds_per_step'), '.4g'),
        _num(r.get('seconds_per_step_frozen_arch'), '.4g'),
        _num(r.get('compile_seconds'), '.1f'), _size(r.get('peak_memory_bytes')),
        _size(r.get('xla_buffer_bytes')), status)) + ' |')
  platform = report.get('platform') or ''
  unit = {'gpu': 'GPU', '': 'device'}.get(platform, platform.upper())
  lines += ['', '## Projected search cost', '',
            'Steps and compiling of every stage, as `pcp_jax.bench --project` counts them (no '
            'evaluation, data loading or checkpoints); later stages timed with the costliest '
            'ops they could keep.', '',
            f'| search | batch | dtype | stages timed | hours | {unit}-days | published |',
            '| --- | ---: | --- | ---: | ---: | ---: | --- |']
  for p in report['projections']:
    published = '; '.join(f"{r['gpu_days']} GPU-days, {r['source']}" for r in p['references'])
    lines.append(f"| {p['method']} | {p['batch_size']} | {p['dtype']} | {p['stages_timed']} of "
                 f"{p['stages'] or '?'} | {_num(p['hours'], '.3f')} | "
                 f"{_num(p['device_days'], '.4f')} | {published or '-'} |")
  lines += bench_report.population_lines(report.get('population_gains', []), *POPULATION_GOAL)
  det = report['determinism']
  verdict = ('same genotype and architecture weights, bit for bit' if det['same'] else
             det.get('error') or ', '.join(
                 f'{what} differ' for what, same in (
                     ('genotypes', det.get('same_genotype')),
                     (f"arch arrays {det.get('differing_arrays')} (max |diff| "
                      f"{det.get('max_abs_difference')})", det.get('same_arch_weights')))
                 if not same))
  lines += ['', '## Determinism', '',
            f"Two short searches with `XLA_FLAGS={det['xla_flags']}` "
            f"(`python -m pcp_jax.main {' '.join(det.get('args', []))}`): "
            f"**{'same' if det['same'] else 'DIFFERENT'}**: {verdict}.", '',
            f"All cases ran and the runs agree: **{'yes' if report['ok'] else 'no'}**.", '']
  return '\n'.join(lines)


def main(argv):
  usage = ('usage: python -m pcp_jax.gpu_check cases|determinism [--tiny] | device | '
           'summarize OUT_DIR | case BENCH_FLAGS --out=FILE')
  if len(argv) < 2:
    raise SystemExit(usage)
  command, rest = argv[1], argv[2:]
  if command in ('cases', 'determinism') and set(rest) <= {'--tiny'}:
    if command == 'cases':
      for c in plan('--tiny' in rest):
        print(c['name'], *c['flags'])
    else:
      print(*determinism_args('--tiny' in rest))
  elif command == 'device' and not rest:
    print(json.dumps(device_info()))
  elif command == 'summarize' and len(rest) == 1:
    report = summarize(rest[0])
    print(markdown(report))
    print(f"Wrote {os.path.join(rest[0], 'gpu_check.json')} and gpu_check.md")
    return 0 if report['ok'] else 1
  else:
    raise SystemExit(usage)
  return 0


if __name__ == '__main__':
  if len(sys.argv) > 1 and sys.argv[1] == 'case':
    host.reexec()  # as pcp_jax.bench: glibc reads its huge-page tunable only at start-up
    bench.define_flags()
    sys.argv.pop(1)
    app.run(run_case)
  else:
    sys.exit(main(sys.argv))
