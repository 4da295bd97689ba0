"""Run by multidevice_test.py in its own process with 2 forced CPU devices.

Checks, for a small supernet search step and the evaluation-network train step:
  1. after several data-parallel steps every device holds identical weights, architecture
     weights, BN statistics, projector and optimiser states (bitwise);
  2. a 2-device step equals a 1-device step on the same global batch (float tolerance): with
     skip-connect dropout and drop-path off, the images, crops, flips and partial-channel
     samples do not depend on the device count and BN statistics, gradients and the Barlow
     Twins cross-correlation are averaged over the global batch, so every quantity matches;
Prints OK and exits 0 when all hold; raises otherwise.
"""

import functools
import importlib
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from pcp_jax import data
from pcp_jax import genotypes
from pcp_jax import parallel
from pcp_jax import search
from pcp_jax import train

STEPS = 3
BATCH = 8
SHAPE = (8, 8, 3)
TRAIN_SHAPE = (32, 32, 3)  # the auxiliary head needs 8x8 features after 2 reductions
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def leaves(tree):
  return jax.tree_util.tree_leaves(jax.device_get(tree))


def assert_close(a, b, what, rtol=2e-4, atol=2e-5):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                               rtol=rtol, atol=atol, err_msg=what)


def assert_replicas_identical(tree, what):
  for leaf in jax.tree_util.tree_leaves(tree):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    assert len(shards) == 2, (what, len(shards))
    for shard in shards[1:]:
      np.testing.assert_array_equal(shards[0], shard, err_msg=what)


def search_config():
  config = importlib.import_module('configs.ss_pcp').get_config('tiny')
  cfg = config.search
  cfg.initial_ops = ('none', 'avg_pool_3x3', 'skip_connect')
  cfg.channels = 4
  cfg.batch_size = BATCH
  return cfg


def search_data():
  rng = np.random.default_rng(0)
  n = BATCH * STEPS
  images = {k: rng.integers(0, 256, (n,) + SHAPE, dtype=np.uint8) for k in ('train', 'valid')}
  labels = {k: rng.integers(0, 10, (n,), dtype=np.int32) for k in ('train', 'valid')}
  order = {k: np.arange(n, dtype=np.int32) for k in ('train', 'valid')}
  return images, labels, order


def run_search(num_devices):
  cfg = search_config()
  switches = {c: np.asarray([[op in cfg.initial_ops for op in genotypes.PRIMITIVES]] * 14)
              for c in ('normal', 'reduce')}
  mesh = parallel.make_mesh(num_devices)
  model, projector, state, _, optimizers = search.build_stage(
      cfg, 3, 2, switches, 10, SHAPE, STEPS, jax.random.PRNGKey(0), num_devices)
  chunk_fn, _ = search.make_stage_fns(cfg, model, projector, optimizers, mesh, MEAN, STD)
  images, labels, order = search_data()
  put = functools.partial(parallel.replicate, mesh=mesh)
  initial_arch = jax.device_get(state.arch)
  # Two chunks, the second fed the first's outputs, as the search loop does: the chunk
  # function is compiled ahead at its first call and must take its own outputs back.
  state, sums = put(state), put(search.zero_sums())
  args = (put(images), put(labels), put(order), jax.random.PRNGKey(1), jnp.float32(0.0),
          jnp.bool_(True))
  for start, stop in ((0, STEPS // 2), (STEPS // 2, STEPS)):
    state, sums, bad = chunk_fn(state, sums, *args, jnp.int32(start), jnp.int32(stop))
    assert int(bad) == -1, 'non-finite loss'
  moved = jax.tree_util.tree_map(lambda a, b: np.abs(a - b).max(), initial_arch,
                                 jax.device_get(state.arch))
  assert min(jax.tree_util.tree_leaves(moved)) > 0, f'architecture weights did not move {moved}'
  return state, sums


def run_train(num_devices):
  # SGD: Adam would turn float-noise gradients of ~0 into full-size steps.
  config = importlib.import_module('configs.train_cifar10').get_config('tiny,sgd')
  config.train.layers, config.train.channels = 3, 4
  info = data.DatasetInfo('random', 10, TRAIN_SHAPE[0], TRAIN_SHAPE[2], MEAN, STD)
  mesh = parallel.make_mesh(num_devices)
  model = train.create_model(config, genotypes.get('PC_DARTS_cifar'), info, num_devices)
  tx = train.make_optimizer(config.train, STEPS)
  state = parallel.replicate(train.initial_state(model, tx, jax.random.key(2), TRAIN_SHAPE), mesh)
  # Compiled ahead at its first call, as the train loop runs it.
  step_fn = parallel.CompiledOnFirstCall(
      train._jit_train_step(config, model, tx, info, mesh))  # pylint: disable=protected-access
  rng = np.random.default_rng(0)
  images = parallel.replicate(
      rng.integers(0, 256, (STEPS, BATCH) + TRAIN_SHAPE, dtype=np.uint8), mesh)
  labels = parallel.replicate(rng.integers(0, 10, (STEPS, BATCH), dtype=np.int32), mesh)
  for i in range(STEPS):
    state, metrics = step_fn(state, images[i], labels[i], jax.random.key(3), None)
  return state, metrics


def log(what, start=[time.time()]):  # pylint: disable=dangerous-default-value
  print(f'{time.time() - start[0]:7.1f}s {what}', flush=True)


def main():
  assert jax.device_count() == 2, jax.devices()
  state2, sums2 = run_search(2)
  log('search, 2 devices')
  assert_replicas_identical((state2, sums2), 'search replicas differ')
  state1, sums1 = run_search(1)
  log('search, 1 device')
  assert_close(sums1, sums2, 'search metrics: 1 vs 2 devices')
  assert_close(state1, state2, 'search state: 1 vs 2 devices')
  t2, m2 = run_train(2)
  log('train, 2 devices')
  assert_replicas_identical(t2, 'train replicas differ')
  t1, m1 = run_train(1)
  log('train, 1 device')
  assert_close(m1, m2, 'train metrics: 1 vs 2 devices')
  assert_close(t1, t2, 'train state: 1 vs 2 devices')
  print('OK')


if __name__ == '__main__':
  main()
