"""Times the search step and the train step on this machine: `python -m pcp_jax.bench`.

  python -m pcp_jax.bench                    # PC-DARTS stage 1 and the train step
  python -m pcp_jax.bench --config=configs/ss_pcp.py --what=search --stages=all --project
  python -m pcp_jax.bench --what=train --batch_size=96,192 --dtype=bfloat16
  python -m pcp_jax.bench --config=configs/ss_pcp.py --stages=all --compile_only
  python -m pcp_jax.bench --what=search,curvature --batch_size=64,256
  python -m pcp_jax.bench --what=search --batch_size=64 --population=2,4

A pre-flight check before a long run (on its GPU): does the batch fit, how long compiling takes,
how many images per second does a step run. Per case (a search stage or the train step at a
batch size) it times building the state (`init s`), compiling the step as the loops do
(`compile s`), then, after `--warmup` steps, `--steps` steps ending in one `block_until_ready`:
the search step (architecture + weight step) in one call of `search.build_stage`'s on-device
loop, as the search runs an epoch; `train.make_train_step` as queued calls; `curvature`: one
estimate of the collapse meter (`collapse`, `search.curvature_steps` Hessian-vector products on
`search.curvature_batch` images, whatever `--batch_size` says) per step, with its cost as a
share of the search at each timed batch of the same stage when the meter runs every
`search.curvature_every` epochs (RobustDARTS's 2 when 0), and the estimate after each product.
`--population=N,...`: each search case also as a population of N members (`population`: one
vmapped step), beside the solo case: img/s summed over the members, and the ratio to N solo
runs one after another (which sum to the solo case's img/s).
A case that fails (out of memory) is a row saying so; the others still run. Inputs: random
uint8 images on the device. Peak memory: the GPU's `peak_bytes_in_use` or the process's peak
RSS, since the process started.
`XLA buffers` (arguments, outputs, temporaries) needs no run.
"""

import copy
import dataclasses
import functools
import gc
import json
import os
import resource
import sys
import time

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from pcp_jax import bench_report
from pcp_jax import collapse
from pcp_jax import data
from pcp_jax import config_files
from pcp_jax import loop
from pcp_jax import members as members_lib
from pcp_jax import models
from pcp_jax import parallel
from pcp_jax import random_cells
from pcp_jax import search
from pcp_jax import search_step
from pcp_jax import spaces
from pcp_jax import union
from pcp_jax import train
from pcp_jax.cpu import host

WHAT = ('search', 'train', 'curvature')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
FLAGS = flags.FLAGS


def define_flags(fv=FLAGS):
  """Defined only when run as a program: pcp_jax.main has its own --config. `fv`: the
  FlagValues to define them in (the README test parses the bench commands into its own)."""
  config_flags.DEFINE_config_file('config', config_files.config_file('pc_darts'),
                                  'Search config of the search cases.', flag_values=fv,
                                  lock_config=True)
  config_flags.DEFINE_config_file('train_config', config_files.config_file('train_cifar10'),
                                  'Train config of the train case.', flag_values=fv,
                                  lock_config=True)
  flags.DEFINE_string('what', 'search,train', 'Comma list of: search, train, curvature.',
                      flag_values=fv)
  flags.DEFINE_string('batch_size', '', "Comma list of batch sizes; '' = each config's.",
                      flag_values=fv)
  flags.DEFINE_string('stages', '1', "Search stages to time: 1-based comma list or 'all'.",
                      flag_values=fv)
  flags.DEFINE_integer('steps', 5, 'Timed steps per case.', flag_values=fv)
  flags.DEFINE_integer('warmup', 2, 'Untimed steps per case after compiling.', flag_values=fv)
  flags.DEFINE_enum('dtype', 'float32', list(DTYPES), 'Compute dtype (weights stay float32).',
                    flag_values=fv)
  flags.DEFINE_bool('compile_only', False, 'Only compile; report XLA buffer bytes.',
                    flag_values=fv)
  flags.DEFINE_bool('project', False, 'Project the whole search: hours and device-days.',
                    flag_values=fv)
  flags.DEFINE_string('population', '', 'Comma list of population sizes N: each search case '
                      'also as N members in one vmapped program.', flag_values=fv)
  flags.DEFINE_string('out', 'bench.json', "JSON results file; '' prints only.", flag_values=fv)


def _check(ok, message):
  if not ok:
    raise ValueError(message)


def _positive_ints(value, name):
  try:
    numbers = [int(v) for v in str(value).split(',')]
  except ValueError:
    numbers = [0]
  _check(min(numbers) >= 1, f'--{name} must be a comma list of positive integers, got {value!r}.')
  return numbers


def plan(search_config, train_config, *, what='search,train', batch_size='', stages='1',
         steps=5, warmup=2, dtype='float32', compile_only=False, project=False, out='',
         population=''):
  """The cases the options ask for; a ValueError names a bad option before anything compiles."""
  kinds = [w.strip() for w in what.split(',') if w.strip()]
  _check(kinds and not set(kinds) - set(WHAT),
         f'--what must be a comma list of {list(WHAT)}, got {what!r}.')
  _check(steps >= 1, f'--steps must be >= 1, got {steps}.')
  _check(warmup >= 0, f'--warmup must be >= 0, got {warmup}.')
  _check(dtype in DTYPES, f'--dtype must be one of {list(DTYPES)}, got {dtype!r}.')
  _check(not project or ('search' in kinds and not compile_only),
         '--project needs timed search steps: search in --what, no --compile_only.')
  # Checked now, not when the report is written after minutes of compiling.
  folder = os.path.dirname(os.path.abspath(out))
  _check(not out or (os.path.isdir(folder) and os.access(folder, os.W_OK)
                     and not os.path.isdir(out)),
         f'--out must be a file in an existing writable folder, got {out!r}.')
  cases = []
  for kind, config, flag in (('search', search_config, 'config'),
                             ('curvature', search_config, 'config'),
                             ('train', train_config, 'train_config')):
    if kind not in kinds:
      continue
    try:
      (train.check_config if kind == 'train' else search.check_config)(config)
      if kind == 'train':
        random_cells.genotype(config)
      devices = parallel.make_mesh(config.num_devices).size
    except ValueError as e:
      raise ValueError(f'--{flag}: {e}') from None
    sizes = _positive_ints(batch_size or config[kind].batch_size, 'batch_size')
    if kind == 'curvature':  # the meter's own batch, whatever the search's
      sizes = [config.search.curvature_batch]
    for b in sizes:  # search: batch norm needs two images
      _check(kind == 'train' or b >= 2, f'--batch_size must be >= 2 for {kind}, got {b}.')
      parallel.check_batch(b, devices, '--batch_size')
    indices = [None]
    if kind != 'train':
      n = len(config.search.stages)
      indices = (list(range(n)) if stages.strip().lower() == 'all'
                 else [s - 1 for s in _positive_ints(stages, 'stages')])
      _check(max(indices) < n, f"--stages must be 'all' or 1-based stages of the search "
             f'config ({n} stage(s)), got {stages!r}.')
      _check(not project or len(set(indices)) == n,
             f'--project needs every stage timed: add --stages=all ({n} stages).')
    members = [0]
    if kind == 'search' and population:
      members += _positive_ints(population, 'population')
      _check(devices == 1, f'--population runs on one device; set num_devices=1 (got {devices}).')
    cases += [dict(what=kind, stage=s, batch_size=b, devices=devices, population=n)
              for b in sizes for s in indices for n in members]
  return cases


def stage_switches(search_config, stage_index):
  """Op switches of a stage: the space's initial ops, then as many as the stage before keeps.
  Which ones depends on the architecture weights; the last in `genotypes.OPS` order (the DARTS
  space's convolutions) cost most, so later stages are timed at an upper bound."""
  cfg = search_config.search
  switches = spaces.initial_switches(cfg.space, cfg.initial_ops)
  if stage_index > 0:
    keep = cfg.stages[stage_index - 1].num_keep
    for cell in switches:
      for row in switches[cell]:
        on = np.flatnonzero(row)
        row[on[:len(on) - keep]] = False
  return switches


def _inputs(n, info, splits, mesh):
  rng = np.random.default_rng(0)
  images = {s: rng.integers(0, 256, (n, *train.image_shape(info)), np.uint8) for s in splits}
  labels = {s: rng.integers(0, info.num_classes, n, np.int32) for s in splits}
  return parallel.replicate((images, labels), mesh)


class _Program:
  """A case's state and jitted step `fn`; `run` dispatches steps without waiting."""

  def __init__(self, case, config, dtype, max_steps):
    info = data.DATASETS[config.data.dataset]
    mesh = parallel.make_mesh(config.num_devices)
    key_init, self.key = jax.random.split(jax.random.PRNGKey(config.seed))
    b, self.kind = case['batch_size'], case['what']
    self.search = self.kind == 'search'
    t0 = time.perf_counter()
    if self.kind == 'curvature':
      self._curvature(case, config, info, mesh, key_init)
    elif self.search:
      config = copy.deepcopy(config)
      config.search.batch_size = b  # the on-device loop slices batches of this size
      stage = config.search.stages[case['stage']]
      switches = stage_switches(config, case['stage'])
      members = case.get('population', 0)
      args = (config, stage.layers, stage.epochs, switches, info, train.image_shape(info),
              bench_report.search_steps_per_epoch(config, b) or 1, mesh, stage.skip_dropout > 0)
      built = search.build_stage(*args)
      state = parallel.run_once(built.init, key_init)
      n = b * max_steps  # every step of a call gets its own rows
      order = {s: np.arange(n, dtype=np.int32) for s in ('train', 'valid')}
      self.members = None
      if members:  # N copies of the solo state in the population's layout
        built = search.build_stage(*args, members=True)
        shapes = jax.eval_shape(built.init, key_init)
        state = union.embed(state, switches, switches, shapes, built.spec, stage.layers)
        state = jax.tree_util.tree_map(lambda a: np.stack([a] * members), state)
        order = jax.tree_util.tree_map(lambda a: np.stack([a] * members), order)
        self.key = jax.random.split(self.key, members)
        self.members = (jnp.full((members,), config.search.ss_factor, jnp.float32),
                        union.masks([switches] * members))
      self.carry = parallel.replicate(
          (state, loop.zero_sums(search_step.METRICS, members=members)), mesh)
      spec = dataclasses.replace(built.spec, model=built.spec.model.clone(dtype=dtype))
      self.fn = loop.make_chunk_fn(
          functools.partial(search_step.search_step, spec=spec), b, mesh, bool(members),
          at_once=config.search.population.members_at_once)
      self.data = (*_inputs(n, info, ('train', 'valid'), mesh),
                   parallel.replicate(order, mesh), self.key)
      self.rate = jnp.float32(stage.skip_dropout)
      self.name = (f"search stage {case['stage'] + 1} ({stage.layers} cells, "
                   f"{switches['normal'][0].sum()} ops)"
                   + (f', population of {members}' if members else ''))
    else:
      model = models.eval_network(config, random_cells.genotype(config), info.num_classes,
                                  mesh.size)
      tx, _ = train.make_optimizer(config, max(1, info.train_size // b))
      state = train.initial_state(model, tx, key_init, train.image_shape(info))
      self.carry = (parallel.replicate(state, mesh),)
      self.fn = train.make_train_step(config, model.clone(dtype=dtype), tx, info, mesh)
      images, labels = _inputs(b, info, ('train',), mesh)
      self.data = ({'train': (images['train'], labels['train'])}, self.key)
      self.rate = jnp.float32(config.train.drop_path_prob)
      self.name = f'train ({config.train.layers} cells, {config.genotype})'
    jax.block_until_ready(self.carry)
    self.init_seconds = time.perf_counter() - t0

  def _curvature(self, case, config, info, mesh, key_init):
    """The collapse meter on a fresh supernet of the case's stage, batch `case['batch_size']`."""
    stage = config.search.stages[case['stage']]
    switches = stage_switches(config, case['stage'])
    built = search.build_stage(config, stage.layers, stage.epochs, switches, info,
                               train.image_shape(info), 1, mesh)
    state = parallel.run_once(built.init, key_init)
    self.carry = ({'params': state.params, 'arch': state.arch,
                   'batch_stats': state.batch_stats},)
    self.fn = collapse.make_curvature_fn(built.spec.model, info.mean, info.std,
                                         config.search.curvature_steps)
    images, labels = _inputs(case['batch_size'], info, ('valid',), mesh)
    self.data = (images['valid'], labels['valid'], self.key)
    self.name = (f"curvature, stage {case['stage'] + 1} ({stage.layers} cells, "
                 f"{switches['normal'][0].sum()} ops), {config.search.curvature_steps} products")

  def _args(self, steps, update_arch):
    if self.kind == 'curvature':
      return self.data
    if self.search:
      hparams = search_step.HParams(self.rate, jnp.bool_(update_arch))
      if self.members is not None:
        hparams = hparams.replace(ss_factor=self.members[0], op_mask=self.members[1])
      return (*self.data, hparams, jnp.int32(0), jnp.int32(steps))
    return (*self.data, train.HParams(self.rate))

  def run(self, compiled, steps, update_arch=True):
    """Returns a device bool: all losses (or estimates) finite."""
    if self.kind == 'curvature':  # one estimate per step
      for _ in range(steps):
        _, self.history = compiled(*self.carry, *self.data)
      return jnp.all(jnp.isfinite(self.history))
    if self.search:  # one call: the on-device loop runs every step
      state, sums, bad = compiled(*self.carry, *self._args(steps, update_arch))
      self.carry = (state, sums)
      return bad < 0
    for _ in range(steps):  # the device queues the calls; nothing waits until the end
      state, metrics = compiled(*self.carry, *self._args(steps, update_arch))
      self.carry = (state,)
    return jnp.all(jnp.array([jnp.all(jnp.isfinite(v)) for v in metrics.values()]))


def run_case(case, config, *, steps=5, warmup=2, dtype='float32', compile_only=False,
             project=False):
  """Builds, compiles and (unless `compile_only`) times one case; returns its result dict."""
  program = _Program(case, config, DTYPES[dtype], max(steps, warmup))
  t0 = time.perf_counter()
  # As the loops compile their steps: on a CPU, the scheduler and the heap trimming matter.
  compiled = parallel.compile_lowered(program.fn.lower(*program.carry, *program._args(1, True)))
  m = compiled.memory_analysis()  # donated arguments are counted once (alias)
  in_turn = 0  # one member's program, run for each member: the others' state beside it
  if isinstance(program.fn, members_lib.InTurn):
    compiled = functools.partial(program.fn, program=compiled)
    n = case['population']
    in_turn = sum(a.nbytes for a in jax.tree_util.tree_leaves(program.carry)) * (n - 1) // n
  result = dict(case, case=program.name, dtype=dtype, op_impl=config.op_impl,
                kernels=models.select_kernels(config.op_impl).name,
                init_seconds=program.init_seconds,
                compile_seconds=time.perf_counter() - t0, xla_buffer_bytes=m and int(
                    m.argument_size_in_bytes + m.output_size_in_bytes
                    - m.alias_size_in_bytes + m.temp_size_in_bytes + in_turn))
  logging.info('%s: initialised in %.1f s, compiled in %.1f s.', program.name,
               result['init_seconds'], result['compile_seconds'])
  if not compile_only:
    if warmup:
      jax.block_until_ready(program.run(compiled, warmup))
    frozen = project and program.search  # the warm-up epochs' step, for the projection
    for suffix, update_arch in (('', True), ('_frozen_arch', False))[:1 + frozen]:
      t0 = time.perf_counter()
      finite = bool(jax.block_until_ready(program.run(compiled, steps, update_arch)))
      result['seconds_per_step' + suffix] = (time.perf_counter() - t0) / steps
      result.setdefault('finite_losses', finite)
    result['images_per_second'] = (case['batch_size'] * max(case.get('population', 0), 1)
                                   / result['seconds_per_step'])
    if program.kind == 'curvature':
      result['curvature_history'] = np.asarray(program.history, np.float64).tolist()
    if not result['finite_losses']:
      logging.warning('%s: a loss was NaN or infinite.', program.name)
  stats = jax.local_devices()[0].memory_stats() or {}  # None on a CPU
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == 'darwin'
                                                              else 1024)  # Linux: kilobytes
  result['memory_kind'] = 'device' if 'peak_bytes_in_use' in stats else 'RSS'
  result['peak_memory_bytes'] = int(stats.get('peak_bytes_in_use', rss))
  return result


def benchmark(search_config, train_config, cases, *, out='', **timing):
  """Runs the planned `cases`, prints the table, writes the JSON report to `out`, returns it."""
  results = []
  for c in cases:
    try:
      results.append(run_case(c, train_config if c['what'] == 'train' else search_config,
                              **timing))
    except (jax.errors.JaxRuntimeError, MemoryError) as e:  # out of memory: the next case
      message = ' '.join(str(e).split())[:300]
      logging.error('%s case at batch %d failed: %s', c['what'], c['batch_size'], message)
      results.append(dict(c, case=f"{c['what']} (failed)", error=message))
    # Each case's programs and buffers go before the next case builds its own: on a CPU the
    # stages of a progressive search do not fit in memory together.
    gc.collect()
    jax.clear_caches()
    host.trim_heap()
  projections = (bench_report.project_search(search_config, results)
                 if timing.get('project') else [])
  costs = bench_report.curvature_costs(search_config, results)
  gains = bench_report.population_gains(results)
  device = jax.local_devices()[0]
  print(bench_report.markdown_table(results))
  for g in gains:
    print(f"{g['case']} at batch {g['batch_size']}: {g['images_per_second']:.1f} img/s summed "
          f"over {g['members']} members, {g['ratio']:.2f}x {g['members']} solo runs one after "
          f"another ({g['solo_images_per_second']:.1f} img/s); XLA buffers "
          f"{bench_report.size(g['xla_buffer_bytes'])} against "
          f"{bench_report.size(g['solo_xla_buffer_bytes'])} solo.")
  for c in costs:
    print(f"{c['case']} on {c['meter_batch']} images: one estimate "
          f"({c['estimate_seconds']:.1f} s) costs {c['estimate_in_steps']:.1f} search steps at "
          f"batch {c['batch_size']}, {100 * c['share']:.2f} % of the search when run every "
          f"{c['every_epochs']} epochs of {c['steps_per_epoch']} steps; within 1e-3 of its "
          f"final value after {c['products_to_1e3']} of {c['products']} products.")
  for p in projections:
    print(f"Projected search at batch {p['batch_size']}: {p['hours']:.2f} h, {p['device_days']:.3f}"
          f" {device.device_kind}-days (steps and compiling; no evaluation, data loading).")
  if device.platform == 'cpu':
    print(host.status())
  report = dict(argv=sys.argv[1:], cases=results, projections=projections,
                curvature_costs=costs, population_gains=gains,
                platform=device.platform, device_kind=device.device_kind,
                jax_version=jax.__version__, host_memory=host.status(),
                compilation_cache_dir=jax.config.jax_compilation_cache_dir)
  if out:
    with open(out, 'w') as f:
      json.dump(report, f, indent=1, default=str)
    print(f'Wrote {out}')
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  timing = dict(steps=FLAGS.steps, warmup=FLAGS.warmup, dtype=FLAGS.dtype,
                compile_only=FLAGS.compile_only, project=FLAGS.project)
  try:
    cases = plan(FLAGS.config, FLAGS.train_config, what=FLAGS.what, out=FLAGS.out,
                 batch_size=FLAGS.batch_size, stages=FLAGS.stages, population=FLAGS.population,
                 **timing)
  except ValueError as e:  # one line naming the flag, not the usage text
    raise SystemExit(f'Error: {e}') from None
  benchmark(FLAGS.config, FLAGS.train_config, cases, out=FLAGS.out, **timing)


def parse_flags(argv):
  """absl's flag parsing, with configs also by name (`--config=ss_pcp:tiny`)."""
  try:
    argv = config_files.config_args(argv)
  except ValueError as e:
    raise SystemExit(f'Error: {e}') from None
  return app.parse_flags_with_usage(argv)


def cli():
  """The `pcp-jax-bench` command (`python -m pcp_jax.bench`)."""
  host.reexec()  # glibc reads its huge-page tunable only at start-up
  define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
