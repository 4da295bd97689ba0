"""Run by multidevice_test.py in its own process with 2 forced CPU devices.

Checks, for a small supernet search step and the evaluation-network train step:
  1. after several data-parallel steps every device holds identical weights, architecture
     weights, BN statistics, projector and optimiser states (bitwise; in float64 with XLA's
     kernels, a GPU's: the CPU kernel set computes the same function, ops_test);
  2. 2-device steps equal 1-device steps on the same global batch: with skip-connect
     dropout and drop-path off, the images, crops, flips and partial-channel samples do not
     depend on the device count and BN statistics, gradients and the Barlow Twins
     cross-correlation are averaged over the global batch, so every quantity matches.
     Compared in float64 (`jax.enable_x64`, a float64 model and state, XLA's own ops), where
     a different summation order moves results by ~1e-16 relative: in float32 it moves ReLU
     inputs within ~1e-7 of zero across the kink, switching their gradients on or off, and a
     few steps of a tiny random network can then differ by 1e-3, so a float32 comparison can
     pass on one CPU and fail on another. A device-dependent quantity (a per-device crop key,
     say) moves results by far more than the float64 tolerance.
Prints OK and exits 0 when all hold; raises otherwise.
"""

import functools
import importlib
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from absl import logging  # pylint: disable=g-import-not-at-top
import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from pcp_jax import data
from pcp_jax import genotypes
from pcp_jax import loop
from pcp_jax import parallel
from pcp_jax import models
from pcp_jax import population
from pcp_jax import runs
from pcp_jax import search
from pcp_jax import search_step
from pcp_jax import spaces
from pcp_jax import train

STEPS = 3
BATCH = 8
SHAPE = (8, 8, 3)
TRAIN_SHAPE = (32, 32, 3)  # the auxiliary head needs 8x8 features after 2 reductions
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def leaves(tree):
  return jax.tree_util.tree_leaves(jax.device_get(tree))


def assert_close(a, b, what, rtol=1e-9, atol=1e-12):
  """Float64 results of one computation on 1 and 2 devices agree to summation-order noise."""
  worst = 0.0
  for x, y in zip(leaves(a), leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype, (what, x.dtype, y.dtype)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol, err_msg=what)
    if x.dtype.kind == 'f' and x.size:
      worst = max(worst, float(np.max(np.abs(x - y) / (np.abs(y) + atol / rtol))))
  log(f'{what}: largest relative difference {worst:.1e}')


def assert_float64(tree, what):
  """The run really computed in float64: no float32 left in its state."""
  kinds = {leaf.dtype for leaf in leaves(tree) if np.asarray(leaf).dtype.kind == 'f'}
  assert kinds == {np.dtype(np.float64)}, (what, kinds)


def to_float64(tree):
  """Every float32 leaf of `tree` as float64 (a model's state for a float64 run)."""
  return jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, tree)


def assert_replicas_identical(tree, what):
  for leaf in jax.tree_util.tree_leaves(tree):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 2, (what, len(shards))
    for shard in shards[1:]:
      np.testing.assert_array_equal(shards[0], shard, err_msg=what)


def search_config():
  config = importlib.import_module('configs.ss_pcp').get_config('tiny')
  config.search.initial_ops = ('none', 'avg_pool_3x3', 'skip_connect')
  config.search.channels = 4
  config.search.batch_size = BATCH
  return config


def search_data():
  rng = np.random.default_rng(0)
  n = BATCH * STEPS
  images = {k: rng.integers(0, 256, (n,) + SHAPE, dtype=np.uint8) for k in ('train', 'valid')}
  labels = {k: rng.integers(0, 10, (n,), dtype=np.int32) for k in ('train', 'valid')}
  order = {k: np.arange(n, dtype=np.int32) for k in ('train', 'valid')}
  return images, labels, order


def run_search(num_devices, float64=False):
  cfg = search_config()
  switches = {c: np.asarray([[op in cfg.search.initial_ops for op in genotypes.PRIMITIVES]] * 14)
              for c in ('normal', 'reduce')}
  mesh = parallel.make_mesh(num_devices)
  if float64:
    cfg.op_impl, cfg.search.dtype = 'xla', 'float64'
  info = data.DatasetInfo('random', 10, SHAPE[0], SHAPE[2], MEAN, STD)
  stage = search.build_stage(cfg, 3, 2, switches, info, SHAPE, STEPS, mesh)
  state = parallel.run_once(stage.init, jax.random.PRNGKey(0))
  sums = loop.zero_sums(search_step.METRICS)
  if float64:
    sums = to_float64(sums)
  chunk_fn = stage.chunk_fn
  images, labels, order = search_data()
  put = functools.partial(parallel.replicate, mesh=mesh)
  initial_arch = jax.device_get(state.arch)
  # Two chunks, the second fed the first's outputs, as the search loop does: the chunk
  # function is compiled ahead at its first call and must take its own outputs back.
  state, sums = put(state), put(sums)
  args = (put(images), put(labels), put(order), jax.random.PRNGKey(1),
          search_step.HParams(jnp.float32(0.0), jnp.bool_(True)))
  for start, stop in ((0, STEPS // 2), (STEPS // 2, STEPS)):
    state, sums, bad = chunk_fn(state, sums, *args, jnp.int32(start), jnp.int32(stop))
    assert int(bad) == -1, 'non-finite loss'
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), initial_arch,
                                 jax.device_get(state.arch))
  assert min(jax.tree_util.tree_leaves(moved)) > 0, f'architecture weights did not move {moved}'
  return state, sums


def run_train(num_devices, float64=False):
  # SGD: Adam would turn float-noise gradients of ~0 into full-size steps.
  config = importlib.import_module('configs.train_cifar10').get_config('tiny,sgd')
  config.train.layers, config.train.channels = 3, 4
  if float64:
    config.op_impl = 'xla'  # the 'cpu' kernels compute in float32
  info = data.DatasetInfo('random', 10, TRAIN_SHAPE[0], TRAIN_SHAPE[2], MEAN, STD)
  mesh = parallel.make_mesh(num_devices)
  model = models.eval_network(config, genotypes.get('PC_DARTS_cifar'), info.num_classes,
                              num_devices)
  tx, _ = train.make_optimizer(config, STEPS)
  state = train.initial_state(model, tx, jax.random.key(2), TRAIN_SHAPE)
  if float64:
    model, state = model.clone(dtype=jnp.float64), to_float64(state)
  state = parallel.replicate(state, mesh)
  # Compiled ahead at its first call, as the train loop runs it.
  step_fn = parallel.CompiledOnFirstCall(
      train.make_train_step(config, model, tx, info, mesh))
  rng = np.random.default_rng(0)
  images = parallel.replicate(
      rng.integers(0, 256, (STEPS, BATCH) + TRAIN_SHAPE, dtype=np.uint8), mesh)
  labels = parallel.replicate(rng.integers(0, 10, (STEPS, BATCH), dtype=np.int32), mesh)
  for i in range(STEPS):
    state, metrics = step_fn(state, {'train': (images[i], labels[i])},
                             jax.random.fold_in(jax.random.key(3), i), train.HParams(None))
  return state, metrics


def population_config(num_devices, mode):
  """A float64 population of 2 seeds, one stage of one epoch (4 steps), no skip dropout (its
  masks are drawn per device in a data-parallel step)."""
  config = importlib.import_module('configs.pcp').get_config('seeds=2,tiny')
  config.op_impl, config.search.dtype = 'xla', 'float64'
  config.num_devices, config.search.population.devices = num_devices, mode
  config.search.initial_ops = ('none', 'avg_pool_3x3', 'skip_connect')
  config.data.max_train, config.search.batch_size, config.search.eval_batch_size = 64, 8, 16
  config.search.channels = 4
  config.search.stages = config.search.stages[-1:]
  stage = config.search.stages[0]
  stage.epochs, stage.warmup_epochs, stage.skip_dropout = 1, 0, 0.0
  return config


def run_population(folder, num_devices, mode):
  """Each member's architecture weights and metric row after the population's search."""
  workdir = os.path.join(folder, f'{num_devices}_{mode}')
  population.run(population_config(num_devices, mode), workdir)
  out = []
  for k in range(2):
    member = os.path.join(workdir, 'members', str(k))
    with np.load(os.path.join(member, runs.ARCH_WEIGHTS)) as f:
      arch = {name: f[name] for name in f.files}
    row, = runs.Rows(os.path.join(member, runs.SEARCH_METRICS), write=False).read()
    out.append((arch, {name: row[name] for name in ('train_loss', 'valid_loss', 'arch_loss')}))
  return out


def population_steps(folder, num_devices, mode):
  """The population's state and metric sums after its first 2 steps (the chunk function a
  run of the same config built before is reused: `parallel.reused`)."""
  config = population_config(num_devices, mode)
  pop = population._prepare(config, os.path.join(folder, f'steps_{num_devices}_{mode}'))  # pylint: disable=protected-access
  switch_sets = [spaces.initial_switches(config.search.space, config.search.initial_ops)] * 2
  built = pop.build(0, switch_sets)
  state = pop.place(pop.init(0, switch_sets, built))
  sums = pop.place(loop.zero_sums(search_step.METRICS, config.search.dtype, 2))
  state, sums, bad = built.chunk_fn(state, sums, *pop.inputs(0, 0, switch_sets),
                                    jnp.int32(0), jnp.int32(2))
  assert int(bad) == -1, 'non-finite loss'
  if pop.sharded:  # each device holds its own member of every array
    for leaf in jax.tree_util.tree_leaves((state, sums)):
      assert [s.data.shape[0] for s in leaf.addressable_shards] == [1, 1], leaf.sharding
  return state, sums


def log(what, start=[time.time()]):  # pylint: disable=dangerous-default-value
  print(f'{time.time() - start[0]:7.1f}s {what}', flush=True)


def main():
  assert jax.device_count() == 2, jax.devices()
  logging.set_verbosity(logging.WARNING)  # the population searches' progress lines
  with jax.enable_x64():
    state2, sums2 = run_search(2, float64=True)
    log('search, 2 devices, float64')
    assert_replicas_identical((state2, sums2), 'search replicas differ (float64)')
    state1, sums1 = run_search(1, float64=True)
    log('search, 1 device, float64')
    assert_float64((state1, state2), 'search state')
    assert_close(sums1, sums2, 'search metrics: 1 vs 2 devices')
    assert_close(state1, state2, 'search state: 1 vs 2 devices')
    t2, m2 = run_train(2, float64=True)
    log('train, 2 devices, float64')
    t1, m1 = run_train(1, float64=True)
    log('train, 1 device, float64')
    assert_float64((t1, t2), 'train state')
    assert_close(m1, m2, 'train metrics: 1 vs 2 devices')
    assert_close(t1, t2, 'train state: 1 vs 2 devices')
    with tempfile.TemporaryDirectory() as folder:
      # Whole searches (placement, evaluation, checkpoints of split arrays) with the members
      # split across the devices; the data-parallel population's steps.
      one = run_population(folder, 1, 'auto')
      log('population search, 1 device, float64')
      two = run_population(folder, 2, 'members')
      log('population search, 2 devices (members split), float64')
      for k, ((arch1, rows1), (arch2, rows2)) in enumerate(zip(one, two)):
        assert_close(rows1, rows2, f'population member {k} metrics: 1 vs 2 devices (members)')
        assert_close(arch1, arch2, f'population member {k} arch: 1 vs 2 devices (members)')
      # Each device holds its own member of every array (the search's stage, reused). The
      # data-parallel population (devices=data) is the data-parallel step above, vmapped.
      assert population.shards_members(population_config(2, 'members'))
      population_steps(folder, 2, 'members')
      log('population members split across the devices')
  print('OK')


if __name__ == '__main__':
  main()
