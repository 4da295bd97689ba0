"""Benchmark of the search step and the train step: `python -m pcp_jax.bench`.

  python -m pcp_jax.bench --what=search,train --batch_size=64,256
  python -m pcp_jax.bench --config=configs/ss_pcp.py --stages=all --project

For every case (one search stage or the train step, at one batch size) it reports the compile
time (`jit(...).lower(...).compile()`, timed apart from execution), the median time per step
over `--steps` timed calls after `--warmup` untimed ones (each call followed by
`jax.block_until_ready`), images per second, peak memory and the parameter count. Every case
runs in a fresh subprocess by default, so that its peak memory (the process's peak RSS on CPU,
`peak_bytes_in_use` of the device on GPU, both process-lifetime peaks) is its own; `--jobs`
such processes build and compile side by side, and each times its steps alone.

Inputs are random uint8 images of the dataset's shape already on the device (timing does not
depend on pixel values, and no dataset is needed). The search step is the architecture step
(not frozen, at the stage's skip-dropout rate) plus the weight step, run by the program the
search loop compiles (`search.make_stage_fns`), `--steps_per_call` steps per call,
data-parallel over `--devices` devices; its images per second count the weight step's training
batch, as the PyTorch reference figure does. The train step is `train.make_train_step` (a
`lax.scan` over it for `--steps_per_call` > 1) at the config's drop-path rate, with its
auxiliary head and cutout. A stage s > 1 of a progressive config searches over as many ops per
edge as stage s-1 keeps; the benchmark keeps the last ones in PRIMITIVES order (convolutions
before pools, skip and none), the costliest choice, so later stages are timed at an upper
bound.
"""

import contextlib
import copy
import fcntl
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, NamedTuple

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from pcp_jax import data
from pcp_jax import genotypes
from pcp_jax import hugepages
from pcp_jax import ops
from pcp_jax import parallel
from pcp_jax import search
from pcp_jax import train

# The official PyTorch PC-DARTS search step (C=16, 8 cells, K=4, all 8 ops, first order, arch
# step + weight step, batch 64) on the project's 2-core CPU, quiet machine (issue 6;
# docs ENVIRONMENT.md): 9.6 s per step, 6.6 training images/s, peak RSS 3.3 GB.
REFERENCE_SECONDS_PER_STEP = 9.6
REFERENCE_BATCH_SIZE = 64
REFERENCE_PEAK_RSS_BYTES = 3.3e9
REFERENCE = dict(what='search', channels=16, layers=8, partial_k=4, ops_per_edge=8,
                 platform='cpu', seconds_per_step=REFERENCE_SECONDS_PER_STEP,
                 batch_size=REFERENCE_BATCH_SIZE, peak_rss_bytes=REFERENCE_PEAK_RSS_BYTES,
                 source='official PyTorch PC-DARTS, torch 2.13 CPU, 2 threads (issue 6)')

WHAT = ('search', 'train')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
TRAIN_SET_SIZES = {'cifar10': 50_000, 'cifar100': 50_000, 'fashion_mnist': 60_000}

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags; defined only when run as a program, so that importing this
  module next to pcp_jax.main (which has its own --config) does not clash."""
  config_flags.DEFINE_config_file(
      'config', os.path.join(_REPO, 'configs', 'pc_darts.py'),
      'Search config whose stages the search cases time.', lock_config=True)
  config_flags.DEFINE_config_file(
      'train_config', os.path.join(_REPO, 'configs', 'train_cifar10.py'),
      'Train config whose evaluation network the train case times.', lock_config=True)
  flags.DEFINE_string('what', 'search,train', 'Comma list of: search, train.')
  flags.DEFINE_string('batch_size', '', "Search batch sizes, comma list; '' = the config's.")
  flags.DEFINE_string('train_batch_size', '',
                      "Train batch sizes, comma list; '' = the config's.")
  flags.DEFINE_string('stages', '1', "Search stages to time: 1-based comma list or 'all'.")
  flags.DEFINE_string('genotype', '', "Train case genotype (name or path); '' = the config's.")
  flags.DEFINE_integer('steps', 5, 'Timed calls per case (the median is reported).')
  flags.DEFINE_integer('warmup', 1, 'Untimed calls after compilation.')
  flags.DEFINE_integer('steps_per_call', 1, 'Steps per jitted call (>1: a lax.scan over them).')
  flags.DEFINE_enum('dtype', 'float32', list(DTYPES),
                    'Compute dtype of the networks; weights, optimiser and losses stay float32.')
  flags.DEFINE_integer('devices', 1, 'Devices the step runs on, data-parallel (0: all).')
  flags.DEFINE_bool('project', False, 'Also time frozen-architecture (warm-up) steps and '
                    'project the wall time of the whole configured search.')
  flags.DEFINE_bool('compile_only', False, 'Compile each case and report the memory XLA '
                    'assigns to its buffers (arguments, outputs, temporaries), without running '
                    'it: a pre-flight memory check for sizes this machine cannot run.')
  flags.DEFINE_bool('isolate', True, 'Run each case in a fresh subprocess (own peak memory).')
  flags.DEFINE_integer('jobs', 1, 'Case subprocesses at a time: they initialise and compile '
                       'concurrently, and run their timed steps one at a time.')
  flags.DEFINE_string('out', 'bench.json', "JSON results path; '' prints only.")
  flags.DEFINE_string('_case', '', 'Internal: run this one case (JSON) and write its result.')


# ---------------------------------------------------------------------------
# Options and cases.


def parse_int_list(value, name):
  """'64,256' -> [64, 256]; each must be a positive integer."""
  items = [v.strip() for v in str(value).split(',') if v.strip()]
  try:
    numbers = [int(v) for v in items]
  except ValueError:
    numbers = []
  if not numbers or len(numbers) != len(items) or min(numbers) < 1:
    raise ValueError(f'--{name} must be a comma list of positive integers, got {value!r}.')
  return numbers


def parse_stages(value, num_stages):
  """0-based stage indices from '1,3' or 'all'."""
  if str(value).strip().lower() == 'all':
    return list(range(num_stages))
  stages = parse_int_list(value, 'stages')
  if max(stages) > num_stages:
    raise ValueError(f"--stages: the search config has {num_stages} stage(s), got {value!r} "
                     f"(1-based; or 'all').")
  return [s - 1 for s in stages]


def make_cases(search_config, train_config, *, what='search,train', batch_size='',
               train_batch_size='', stages='1', genotype='', steps=5, warmup=1,
               steps_per_call=1, dtype='float32', devices=1, project=False, seed=0,
               compile_only=False):
  """The list of case dicts the options ask for; raises ValueError naming a bad option."""
  kinds = [w.strip() for w in what.split(',') if w.strip()]
  if not kinds or set(kinds) - set(WHAT):
    raise ValueError(f'--what must be a comma list of {list(WHAT)}, got {what!r}.')
  if steps < 1:
    raise ValueError(f'--steps must be >= 1, got {steps}.')
  if warmup < 0:
    raise ValueError(f'--warmup must be >= 0, got {warmup}.')
  if steps_per_call < 1:
    raise ValueError(f'--steps_per_call must be >= 1, got {steps_per_call}.')
  if dtype not in DTYPES:
    raise ValueError(f'--dtype must be one of {list(DTYPES)}, got {dtype!r}.')
  if devices < 0:
    raise ValueError(f'--devices must be >= 0 (0: all devices), got {devices}.')
  if compile_only and project:
    raise ValueError('--project needs timed steps; drop --compile_only.')
  common = dict(steps=steps, warmup=warmup, steps_per_call=steps_per_call, dtype=dtype,
                compile_only=compile_only,
                devices=devices, seed=seed)
  cases = []
  if 'search' in kinds:
    search.check_config(search_config)
    num_stages = len(search_config.search.stages)
    stage_list = parse_stages(stages, num_stages)
    if project and len(stage_list) != num_stages:
      raise ValueError(f'--project needs every stage of the search timed: add --stages=all '
                       f'(the config has {num_stages} stages).')
    sizes = parse_int_list(batch_size or search_config.search.batch_size, 'batch_size')
    if min(sizes) < 2:
      raise ValueError(f'--batch_size must be >= 2 for the search step, got {batch_size!r}.')
    for b in sizes:
      if devices:
        parallel.check_batch(b, devices, '--batch_size')
      cases += [dict(what='search', stage=s, batch_size=b, project=project, **common)
                for s in stage_list]
  if 'train' in kinds:
    genotypes.get(genotype or train_config.genotype)  # fail early on an unknown genotype
    ops.resolve_op_impl(train_config.get('op_impl', 'auto'))
    sizes = parse_int_list(train_batch_size or train_config.train.batch_size,
                           'train_batch_size')
    for b in sizes:
      if devices:
        parallel.check_batch(b, devices, '--train_batch_size')
    cases += [dict(what='train', batch_size=b, genotype=genotype, **common) for b in sizes]
  return cases


# ---------------------------------------------------------------------------
# Building and timing one case.


def image_shape(config):
  info = data.DATASETS[config.data.dataset]
  size = 32 if config.data.pad_to_32 and info.image_size < 32 else info.image_size
  return (size, size, info.channels)


def stage_switches(search_config, stage_index):
  """Op switches of a stage: the initial ops, then as many as the stage before keeps.

  Which ops a real search keeps depends on its architecture weights; for timing only their
  number matters much, and the last ones in PRIMITIVES order (the convolutions) cost most.
  """
  cfg = search_config.search
  ops = [p for p in genotypes.PRIMITIVES if p in cfg.initial_ops]
  if stage_index > 0:
    ops = ops[len(ops) - cfg.stages[stage_index - 1].num_keep:]
  row = np.array([p in ops for p in genotypes.PRIMITIVES])
  switches = np.tile(row, (genotypes.NUM_EDGES, 1))
  return {'normal': switches, 'reduce': switches.copy()}


def search_steps_per_epoch(config, batch_size):
  """Steps per search epoch on the configured dataset's full training split."""
  n = config.data.max_train or TRAIN_SET_SIZES[config.data.dataset]
  n_weights = int(config.data.train_portion * n)
  return min(n_weights, n - n_weights) // batch_size


def _random_images(rng, n, shape):
  return rng.integers(0, 256, (n,) + tuple(shape), dtype=np.uint8)


def _random_labels(rng, n, num_classes):
  return rng.integers(0, num_classes, n, dtype=np.int32)


def _count(tree):
  return int(sum(np.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree)))


def _scan_steps(state, images, labels, key, drop_path_rate, *, step_fn):
  """Train steps over the leading axis of `images`/`labels` inside one lax.scan."""
  state, metrics = jax.lax.scan(
      lambda state, xy: step_fn(state, xy[0], xy[1], key, drop_path_rate), state,
      (images, labels))
  return state, jax.tree_util.tree_map(jnp.mean, metrics)


class Program(NamedTuple):
  """A case's compiled-to-be step: `jitted(*carry, *call_args(update_arch))` runs
  `steps_per_call` steps; `next_carry(outputs)` is the next call's (donated) carry and
  `metrics(outputs, steps_run)` the mean losses so far."""
  jitted: Callable
  carry: tuple
  call_args: Callable
  next_carry: Callable
  metrics: Callable
  details: dict


def build_program(case, config):
  """The jitted step of a case as its own loop runs it, its initial carry and arguments.

  Search: `search.make_stage_fns`'s chunk function (the search loop's program: `run_steps`,
  data-parallel over the device mesh), running `steps_per_call` steps per call. Train:
  `train.make_train_step` (under a `lax.scan` for `steps_per_call` > 1).
  """
  b, k = case['batch_size'], case['steps_per_call']
  dtype = DTYPES[case['dtype']]
  mesh = parallel.make_mesh(case['devices'], '--devices')
  rng = np.random.default_rng(case['seed'])
  key_init, key_run = jax.random.split(jax.random.PRNGKey(case['seed']))
  shape = image_shape(config)
  info = data.DATASETS[config.data.dataset]
  op_impl = config.get('op_impl', 'auto')
  t0 = time.perf_counter()
  if case['what'] == 'search':
    parallel.check_batch(b, mesh.size, '--batch_size')
    cfg = copy.deepcopy(config.search)
    cfg.batch_size = b
    stage = cfg.stages[case['stage']]
    switches = stage_switches(config, case['stage'])
    model, projector, state, _, optimizers = search.build_stage(
        cfg, stage.layers, stage.epochs, switches, info.num_classes, shape,
        search_steps_per_epoch(config, b) or 1, key_init, mesh.size, op_impl)
    jax.block_until_ready(state)
    init_seconds = time.perf_counter() - t0
    chunk_fn, _ = search.make_stage_fns(cfg, model.clone(dtype=dtype), projector, optimizers,
                                        mesh, info.mean, info.std,
                                        skip_dropout=stage.skip_dropout > 0)
    n = b * k
    images = parallel.replicate(
        {s: _random_images(rng, n, shape) for s in ('train', 'valid')}, mesh)
    labels = parallel.replicate(
        {s: _random_labels(rng, n, info.num_classes) for s in ('train', 'valid')}, mesh)
    order = parallel.replicate({'train': np.arange(n), 'valid': np.arange(n)}, mesh)
    skip_rate = jnp.float32(stage.skip_dropout)  # the rate of the first epoch past warm-up

    def call_args(update_arch):
      return (images, labels, order, key_run, skip_rate, jnp.bool_(update_arch),
              jnp.int32(0), jnp.int32(k))

    def metrics(outputs, steps_run):
      _, sums, bad = jax.device_get(outputs)
      if bad >= 0:
        raise FloatingPointError(f'A loss became NaN or infinite: {sums}.')
      return {name: float(v) / steps_run for name, v in sums.items()}

    program = Program(chunk_fn, parallel.replicate((state, search.zero_sums()), mesh),
                      call_args, lambda outputs: outputs[:2], metrics, {})
    details = dict(layers=stage.layers, channels=cfg.channels, partial_k=cfg.partial_k,
                   ops_per_edge=int(switches['normal'][0].sum()),
                   ops=[p for p, on in zip(genotypes.PRIMITIVES, switches['normal'][0]) if on],
                   ss_factor=float(cfg.ss_factor), skip_rate=float(stage.skip_dropout),
                   params=_count(state.params), arch_params=_count(state.arch),
                   projector_params=_count(state.projector.get('params', {})))
  else:
    parallel.check_batch(b, mesh.size, '--train_batch_size')
    genotype_name = case['genotype'] or config.genotype
    model = train.create_model(config, genotypes.get(genotype_name), info, mesh.size)
    tx = train.make_optimizer(config.train, max(1, TRAIN_SET_SIZES[info.name] // b))
    state = train.initial_state(model, tx, key_init, shape)
    jax.block_until_ready(state)
    init_seconds = time.perf_counter() - t0
    single = train.make_train_step(config, model.clone(dtype=dtype), tx, info, mesh)
    if k == 1:
      jitted = single
      x, y = _random_images(rng, b, shape), _random_labels(rng, b, info.num_classes)
    else:
      jitted = jax.jit(functools.partial(_scan_steps, step_fn=single), donate_argnums=(0,))
      x = _random_images(rng, k * b, shape).reshape((k, b) + shape)
      y = _random_labels(rng, k * b, info.num_classes).reshape(k, b)
    x, y = parallel.replicate((x, y), mesh)
    drop_path_rate = jnp.float32(config.train.drop_path_prob)

    def metrics(outputs, steps_run):
      del steps_run  # the metrics are the last call's
      return {name: float(v) for name, v in jax.device_get(outputs[1]).items()}

    program = Program(jitted, (parallel.replicate(state, mesh),),
                      lambda update_arch: (x, y, key_run, drop_path_rate),
                      lambda outputs: outputs[:1], metrics, {})
    details = dict(layers=config.train.layers, channels=config.train.channels,
                   auxiliary=bool(config.train.auxiliary), genotype=genotype_name,
                   params=_count(state.params))
  return program._replace(details=dict(details, init_seconds=init_seconds,
                                        op_impl=ops.resolve_op_impl(op_impl)))


def _timed_calls(compiled, carry, args, calls, next_carry):
  """Runs `calls` calls; returns the carry, the seconds of each call and the last outputs."""
  seconds, outputs = [], None
  for _ in range(calls):
    t0 = time.perf_counter()
    outputs = compiled(*carry, *args)
    jax.block_until_ready(outputs)
    seconds.append(time.perf_counter() - t0)
    carry = next_carry(outputs)
  return carry, seconds, outputs


def peak_memory():
  """(peak RSS of this process in bytes, device peak bytes in use or None)."""
  rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  rss *= 1 if sys.platform == 'darwin' else 1024  # Linux reports kilobytes
  stats = jax.local_devices()[0].memory_stats() or {}
  return int(rss), stats.get('peak_bytes_in_use')


def reset_peak_rss():
  """Restarts the kernel's peak-RSS count (Linux VmHWM), so compilation is left out of it."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_rss_since_reset():
  """Linux VmHWM in bytes: the peak RSS since `reset_peak_rss` (or since the start)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('VmHWM:'):
        return int(line.split()[1]) * 1024
  return None


def xla_buffer_bytes(compiled):
  """The memory XLA assigned to a compiled program's buffers: arguments and outputs (donated
  arguments counted once) and temporaries; None where the backend does not say."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def reference_ratio(result):
  """Reference seconds per image / ours, where the case is the reference's network on a CPU."""
  same = all(result.get(k) == REFERENCE[k] for k in
             ('what', 'channels', 'layers', 'partial_k', 'ops_per_edge', 'platform'))
  if not same or result.get('ss_factor') or result['dtype'] != 'float32':
    return None
  return (REFERENCE_SECONDS_PER_STEP / REFERENCE_BATCH_SIZE) / (
      result['seconds_per_step'] / result['batch_size'])


def run_case(case, config):
  """Builds, compiles and times one case in this process; returns its result dict.

  `config` is the search config for a search case and the train config for a train case.
  """
  with timing_lock(case.get('timing_lock'), exclusive=False):
    program = build_program(case, config)
    details = program.details
    logging.info('Initialised in %.1f s (%d parameters); compiling.', details['init_seconds'],
                 details['params'])
    args = program.call_args(True)
    t0 = time.perf_counter()
    lowered = program.jitted.lower(*program.carry, *args)
    lower_seconds = time.perf_counter() - t0
    compiled = parallel.compile_lowered(lowered)  # as the loops compile (heap trimmed too)
    compile_seconds = time.perf_counter() - t0
  logging.info('Compiled in %.1f s (%.1f s tracing and lowering).', compile_seconds,
               lower_seconds)
  device = jax.local_devices()[0]
  compiled_stats = dict(
      compile_seconds=compile_seconds, lower_seconds=lower_seconds,
      xla_buffer_bytes=xla_buffer_bytes(compiled), platform=device.platform,
      device_kind=device.device_kind, device_count=case['devices'] or jax.device_count(),
      devices_available=jax.device_count(), jax_version=jax.__version__)
  if case.get('compile_only'):
    return dict(case, **details, **compiled_stats, peak_rss_bytes=peak_memory()[0])
  # Resetting the kernel's peak count also resets getrusage's: read the peak so far first.
  rss_until_compiled = peak_memory()[0]
  steps_rss_measured = reset_peak_rss()
  with timing_lock(case.get('timing_lock')):
    timed_from = time.time()
    carry, _, _ = _timed_calls(compiled, program.carry, args, case['warmup'],
                               program.next_carry)
    carry, seconds, outputs = _timed_calls(compiled, carry, args, case['steps'],
                                           program.next_carry)
    k = case['steps_per_call']
    # Read before the frozen-architecture calls below, which take (donate) these buffers.
    final_metrics = program.metrics(outputs, (case['warmup'] + case['steps']) * k)
    frozen = None
    if case['what'] == 'search' and case.get('project'):
      # The warm-up epochs skip the architecture step (same compiled program, update_arch off).
      _, frozen, _ = _timed_calls(compiled, carry, program.call_args(False), case['steps'],
                                  program.next_carry)
    timed_until = time.time()
  logging.info('Seconds per call: %s', ', '.join(f'{s:.3f}' for s in seconds))
  per_step = statistics.median(seconds) / k
  result = dict(case, **details, **compiled_stats, seconds_per_step=per_step, call_seconds=seconds,
                images_per_second=case['batch_size'] / per_step,
                final_metrics=final_metrics, timed_from=timed_from, timed_until=timed_until)
  if frozen is not None:
    result['seconds_per_step_frozen_arch'] = statistics.median(frozen) / k
  steps_rss = peak_rss_since_reset() if steps_rss_measured else None
  peak_rss, peak_device = peak_memory()
  result.update(peak_rss_bytes=max(peak_rss, rss_until_compiled, steps_rss or 0),
                compile_peak_rss_bytes=rss_until_compiled, steps_peak_rss_bytes=steps_rss,
                peak_device_bytes=peak_device)
  result['x_vs_reference'] = reference_ratio(result)
  return result


# ---------------------------------------------------------------------------
# Running the cases, the projection and the report.


@contextlib.contextmanager
def timing_lock(path, exclusive=True):
  """Holds a lock on the file `path` (none if empty). Concurrent case processes (`--jobs`)
  build and compile under a shared lock and time their steps under an exclusive one: the
  timed steps run alone, with no other case's steps or compilation beside them."""
  if not path:
    yield
    return
  with open(path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def run_isolated(cases, argv, jobs=1):
  """Runs each case in a fresh `python -m pcp_jax.bench` process with the same flags, `jobs`
  processes at a time; returns the results in the order of `cases`.

  With several jobs the processes share a lock file (`timing_lock`: each times its steps
  alone) and, on a GPU, do not preallocate device memory (each would take 75% of it).
  """
  env = dict(os.environ)
  if jobs > 1:
    env.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  with tempfile.TemporaryDirectory() as tmp:
    lock = os.path.join(tmp, 'timing.lock') if jobs > 1 else ''
    paths = [os.path.join(tmp, f'result{i}.json') for i in range(len(cases))]
    running, codes = {}, {}

    def reap(until_below):
      while len(running) >= until_below:
        for i, proc in list(running.items()):
          if proc.poll() is not None:
            codes[i] = running.pop(i).returncode
        if len(running) >= until_below:
          time.sleep(0.2)

    try:
      for i, case in enumerate(cases):
        reap(jobs)
        logging.info('Case: %s', case)
        command = [sys.executable, '-m', 'pcp_jax.bench', *argv, '--_case=' + json.dumps(
            dict(case, result_path=paths[i], timing_lock=lock))]
        running[i] = subprocess.Popen(command, env=env)
      reap(1)
    finally:  # interrupted: no case process outlives this one
      for proc in running.values():
        proc.kill()
    results = []
    for i, case in enumerate(cases):
      if codes[i] or not os.path.isfile(paths[i]):
        results.append(dict(case, error=f'the case process exited with code {codes[i]} '
                                         '(see its log above)'))
        continue
      with open(paths[i]) as f:
        results.append(json.load(f))
    return results


def project_search(search_config, results):
  """Projected wall time of the configured search per batch size (all stages timed).

  Sums over stages: compile + warm-up epochs x steps x frozen-arch step time + other epochs x
  steps x step time. Excludes the per-epoch evaluation and data loading.
  """
  projections = []
  by_batch = {}
  for r in results:
    if r['what'] == 'search' and 'seconds_per_step_frozen_arch' in r:
      by_batch.setdefault(r['batch_size'], {})[r['stage']] = r
  stages = search_config.search.stages
  for b, timed in sorted(by_batch.items()):
    if len(timed) != len(stages):
      continue
    steps = search_steps_per_epoch(search_config, b)
    rows, total = [], 0.0
    for s, stage in enumerate(stages):
      r = timed[s]
      seconds = (r['compile_seconds'] + steps * (
          stage.warmup_epochs * r['seconds_per_step_frozen_arch']
          + (stage.epochs - stage.warmup_epochs) * r['seconds_per_step']))
      rows.append(dict(stage=s + 1, epochs=stage.epochs, warmup_epochs=stage.warmup_epochs,
                       steps_per_epoch=steps, seconds=seconds))
      total += seconds
    devices = timed[0]['devices']
    projections.append(dict(
        batch_size=b, stages=rows, hours=total / 3600, device_days=total * devices / 86400,
        device_kind=timed[0]['device_kind'], platform=timed[0]['platform'], devices=devices,
        excludes='per-epoch evaluation, data loading, checkpoints'))
  return projections


def _bytes(n):
  return '' if n is None else f'{n / 2**30:.2f} GiB'


def format_table(results):
  """A readable text table of the results."""
  header = ('case', 'cells', 'ops', 'batch', 'dtype', 'op impl', 'init s', 'compile s', 's/step',
            'img/s', 'peak mem', 'steps RSS', 'XLA buffers', 'params', 'x vs ref')
  rows, errors = [], []
  for r in results:
    name = f"search stage {r['stage'] + 1}" if r['what'] == 'search' else 'train'
    if 'error' in r:
      rows.append((name, '', '', str(r['batch_size']), r['dtype'], '', 'failed'))
      errors.append(f"{name}, batch {r['batch_size']}: {r['error']}")
      continue
    mem = r.get('peak_device_bytes')
    mem = r['peak_rss_bytes'] if mem is None else mem
    ratio = r.get('x_vs_reference')
    timed = 'seconds_per_step' in r
    rows.append((name, str(r['layers']), str(r.get('ops_per_edge', '')), str(r['batch_size']),
                 r['dtype'], r.get('op_impl', ''), f"{r['init_seconds']:.1f}",
                 f"{r['compile_seconds']:.1f}",
                 f"{r['seconds_per_step']:.4g}" if timed else '-',
                 f"{r['images_per_second']:.1f}" if timed else '-', _bytes(mem),
                 _bytes(r.get('steps_peak_rss_bytes')), _bytes(r.get('xla_buffer_bytes')),
                 f"{r['params']:,}", '' if ratio is None else f'{ratio:.2f}'))
  widths = [max(len(row[i]) if i < len(row) else 0 for row in [header] + rows)
            for i in range(len(header))]
  lines = ['  '.join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
           for row in [header] + rows]
  lines.insert(1, '  '.join('-' * w for w in widths))
  return '\n'.join(lines + errors)


def format_projections(projections):
  lines = []
  for p in projections:
    unit = 'GPU' if p['platform'] == 'gpu' else p['platform'].upper()
    lines.append(f"Projected search at batch {p['batch_size']} on {p['devices']} x "
                 f"{p['device_kind']}: {p['hours']:.2f} h = {p['device_days']:.4f} "
                 f"{unit}-days (steps + compile only; excludes {p['excludes']}).")
  return '\n'.join(lines)


def benchmark(search_config, train_config, cases, argv=None, jobs=1):
  """Runs the cases (each in a subprocess with `argv` as its flags, `jobs` at a time; else
  one after the other in this process)."""
  if argv is not None:
    return run_isolated(cases, argv, jobs)
  results = []
  for case in cases:
    logging.info('Case: %s', case)
    config = search_config if case['what'] == 'search' else train_config
    results.append(run_case(case, config))
  return results


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  if FLAGS._case:
    case = json.loads(FLAGS._case)
    config = FLAGS.config if case['what'] == 'search' else FLAGS.train_config
    result = run_case(case, config)
    with open(case['result_path'], 'w') as f:
      json.dump(result, f)
    return
  try:
    cases = make_cases(
        FLAGS.config, FLAGS.train_config, what=FLAGS.what, batch_size=FLAGS.batch_size,
        train_batch_size=FLAGS.train_batch_size, stages=FLAGS.stages,
        genotype=FLAGS.genotype, steps=FLAGS.steps, warmup=FLAGS.warmup,
        steps_per_call=FLAGS.steps_per_call, dtype=FLAGS.dtype, devices=FLAGS.devices,
        project=FLAGS.project, compile_only=FLAGS.compile_only)
  except ValueError as e:
    raise app.UsageError(str(e))
  if FLAGS.jobs < 1:
    raise app.UsageError(f'--jobs must be >= 1, got {FLAGS.jobs}.')
  if FLAGS.jobs > 1 and not FLAGS.isolate:
    raise app.UsageError(f'--jobs={FLAGS.jobs} needs --isolate (cases in their own '
                         'processes); --noisolate runs one case at a time.')
  results = benchmark(FLAGS.config, FLAGS.train_config, cases,
                      argv=sys.argv[1:] if FLAGS.isolate else None, jobs=FLAGS.jobs)
  projections = project_search(FLAGS.config, results) if FLAGS.project else []
  print(format_table(results))
  host_memory = hugepages.status()
  if jax.default_backend() == 'cpu':
    print(host_memory[0].upper() + host_memory[1:])
  if projections:
    print(format_projections(projections))
  report = dict(argv=sys.argv[1:], reference=REFERENCE, cases=results,
                projections=projections,
                search_config=FLAGS.config.to_dict() if 'search' in FLAGS.what else None,
                compilation_cache_dir=jax.config.jax_compilation_cache_dir,
                host_memory=host_memory)
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(report, f, indent=1, default=str)
    print(f'Wrote {FLAGS.out}')
  if any('error' in r for r in results):
    sys.exit(1)


if __name__ == '__main__':
  hugepages.reexec()  # glibc reads its huge-page tunable at start-up; case processes inherit it
  define_flags()
  app.run(main)
