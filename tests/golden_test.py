"""Golden values: one search step and one train step on a fixed tiny batch, so that a silent
change to the numbers (an op, a loss, an augmentation, a key split) fails here.

Computed in float64 with XLA's own ops (`jax.enable_x64`, a float64 model and state), where
another CPU's summation order moves the losses by ~1e-15, far inside the tolerance; any change
to what is computed moves them by far more. A deliberate change to the numbers updates the
values below in the same commit, saying why.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import data
from pcp_jax import genotypes
from pcp_jax import models
from pcp_jax import parallel
from pcp_jax import search
from pcp_jax import search_step
from pcp_jax import spaces
from pcp_jax import train

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
RTOL = 1e-7


def to_float64(tree):
  return jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, tree)


def images(seed, shape):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


# The supernet draws each cell's channel sample and skip-dropout mask from fold_in(one draw
# per stream, cell index) (so that a scanned run of cells draws what its unrolled cells do);
# weights start as PyTorch's defaults (`ops.WEIGHT_INIT`).
GOLDEN_SEARCH = {
    'arch_ce': 2.24537367150, 'arch_bt': 203.140706356, 'arch_loss': 152.916873185,
    'arch_ce_grad_norm': 0.0272753745887, 'arch_bt_grad_norm': 60.6569111327,
    'arch_grad_cosine': 0.360941454196, 'train_loss': 2.23462784790, 'train_acc': 0.25,
}
GOLDEN_TRAIN = {'train_loss': 3.72066973892, 'grad_norm': 5.91330327699, 'train_acc': 0.0}


@jax.enable_x64()
def test_one_search_step():
  config = importlib.import_module('configs.ss_pcp').get_config('tiny')
  config.op_impl, config.search.dtype = 'xla', 'float64'
  switches = spaces.initial_switches('darts', config.search.initial_ops)
  info = data.DatasetInfo('random', 10, 16, 3, MEAN, STD)
  stage = search.build_stage(config, 3, 2, switches, info, (16, 16, 3), 4,
                             parallel.make_mesh(1))
  state = parallel.run_once(stage.init, jax.random.PRNGKey(0))
  labels = np.arange(8, dtype=np.int32) % 10
  batch = {'train': (images(1, (8, 16, 16, 3)), labels),
           'valid': (images(2, (8, 16, 16, 3)), labels[::-1].copy())}
  _, metrics = jax.jit(lambda st: search_step.search_step(
      st, batch, jax.random.PRNGKey(3), search_step.HParams(0.1, True), stage.spec))(state)
  got = {k: float(v) for k, v in metrics.items()}
  assert got.keys() == set(search_step.METRICS) == GOLDEN_SEARCH.keys()
  for name, value in GOLDEN_SEARCH.items():
    assert got[name] == pytest.approx(value, rel=RTOL), name


@jax.enable_x64()
def test_one_train_step():
  config = importlib.import_module('configs.train_cifar10').get_config('tiny')
  config.op_impl = 'xla'
  info = data.DatasetInfo('random', 10, 32, 3, MEAN, STD)
  model = models.eval_network(config, genotypes.get('PC_DARTS_cifar'), info.num_classes)
  tx, _ = train.make_optimizer(config, 4)
  state = to_float64(train.initial_state(model, tx, jax.random.key(2), (32, 32, 3)))
  step = train.make_train_step(
      config, model.clone(dtype=jnp.float64), tx, info)
  batch = {'train': (images(4, (8, 32, 32, 3)), np.arange(8, dtype=np.int32))}
  _, metrics = step(state, batch, jax.random.fold_in(jax.random.key(5), 0),
                    train.HParams(jnp.float64(0.2)))
  got = {k: float(v) for k, v in metrics.items()}
  assert got.keys() == GOLDEN_TRAIN.keys()
  for name, value in GOLDEN_TRAIN.items():
    assert got[name] == pytest.approx(value, rel=RTOL), name
