"""The search supernet: shapes, parameter counts, partial channels, skip dropout."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import genotypes
from pcp_jax import kernels
from pcp_jax import ops
from pcp_jax import supernet

# What a search network hands its cells, with XLA's kernel set.
LAYERS = dict(conv=functools.partial(ops.Conv, kernels=kernels.XLA),
              norm=functools.partial(ops.BatchNorm, use_running_average=False,
                                     kernels=kernels.XLA),
              kernels=kernels.XLA)


def search_network(**kwargs):
  return supernet.SearchNetwork(kernels=kernels.XLA, **kwargs)


def only(*names):
  """(14, 8) switches with exactly `names` on."""
  switches = np.zeros((14, 8), bool)
  switches[:, [genotypes.PRIMITIVES.index(n) for n in names]] = True
  return genotypes.switches_to_tuple(switches)


def test_search_network_parameter_counts_match_the_reference_code():
  # The reference PC-DARTS search network (C=16, 8 cells, K=4) prints 0.299578 MB of
  # weights; DARTS' (K=1) prints 1.930618 MB. Alphas/betas: 2 x 14 x 8 + 2 x 14.
  assert supernet.count_params(16, 8, 10, partial_k=4) == (299578, 252)
  assert supernet.count_params(16, 8, 10, partial_k=1, use_betas=False) == (1930618, 224)


def test_arch_collection_and_per_cell_shapes():
  model = search_network(num_classes=7, channels=8, layers=5, partial_k=2,
                         switches_normal=only('none', 'max_pool_3x3', 'skip_connect'),
                         switches_reduce=only('skip_connect', 'avg_pool_3x3'))
  key = jax.random.PRNGKey(0)
  x = jnp.zeros((2, 32, 32, 3))

  def init_and_capture(k):
    variables = supernet.init_variables(model, k, (32, 32, 3))
    out, state = model.apply(variables, x, rngs={'channels': k, 'dropout': k},
                             capture_intermediates=True, mutable=['intermediates', 'batch_stats'])
    return variables, out, state['intermediates']

  variables, (logits, features), inter = jax.eval_shape(init_and_capture, key)
  arch = variables['arch']
  assert arch['alphas_normal'].shape == (14, 3) and arch['alphas_reduce'].shape == (14, 2)
  assert arch['betas_normal'].shape == (14,) and arch['betas_reduce'].shape == (14,)
  assert set(variables) == {'params', 'arch', 'batch_stats'}
  assert logits.shape == (2, 7) and features.shape == (2, 4 * 32)
  # Reductions at cells 1 and 3 (L//3, 2L//3): channels double, resolution halves.
  expected = [(32, 32), (16, 64), (16, 64), (8, 128), (8, 128)]
  for i, (hw, c) in enumerate(expected):
    assert inter[f'cell{i}']['__call__'][0].shape == (2, hw, hw, c), i


def test_arch_init_is_small_gaussian():
  model = search_network(num_classes=10, channels=4, layers=3, partial_k=1,
                         switches_normal=only('skip_connect'),
                         switches_reduce=only('max_pool_3x3'))
  variables = jax.jit(lambda k: supernet.init_variables(model, k, (8, 8, 3)))(
      jax.random.PRNGKey(1))
  alphas = np.asarray(variables['arch']['alphas_normal'])
  assert alphas.shape == (14, 1)
  assert 0 < np.abs(alphas).max() < 1e-2 and np.std(alphas) > 1e-4
  betas = np.asarray(variables['arch']['betas_reduce'])
  assert not np.allclose(betas, np.asarray(variables['arch']['betas_normal']))


class mixed_op:  # pylint: disable=invalid-name
  """One edge's mixed op, called as the edge alone would be (PartialChannelMixedOp takes
  lists of edges)."""

  def __init__(self, op_names, stride=1, k=4, mode='random'):
    self.module = supernet.PartialChannelMixedOp((tuple(op_names),), stride, k, mode,
                                                 **LAYERS)

  @staticmethod
  def _edge_args(x, w, perm=None, mask=None, keep=None):
    return ([x], w[None], None if perm is None else perm[None],
            None if mask is None else mask[None], keep)

  def init(self, key, *args):
    return self.module.init(key, *self._edge_args(*args))

  def apply(self, variables, *args, mutable=False):
    if mutable:
      outs, state = self.module.apply(variables, *self._edge_args(*args), mutable=mutable)
      return outs[0], state
    return self.module.apply(variables, *self._edge_args(*args))[0]


def test_random_channels_bypassed_untouched_and_keyed():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  op = mixed_op(('none', 'skip_connect'))
  w = jnp.array([0.25, 0.75])
  perm_a = jnp.array([5, 2, 0, 1, 3, 4, 6, 7])
  perm_b = jnp.array([1, 7, 0, 2, 3, 4, 5, 6])
  y_a = op.apply({}, x, w, perm_a)
  y_b = op.apply({}, x, w, perm_b)
  np.testing.assert_allclose(y_a[..., [5, 2]], 0.75 * x[..., [5, 2]], rtol=1e-6)
  untouched = [0, 1, 3, 4, 6, 7]
  np.testing.assert_array_equal(y_a[..., untouched], x[..., untouched])
  assert not np.allclose(y_a, y_b)
  np.testing.assert_array_equal(y_a, op.apply({}, x, w, perm_a))


def test_random_channels_stride2_bypass_is_max_pooled():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 4))
  op = mixed_op(('none',), stride=2, k=2)
  y = op.apply({}, x, jnp.ones(1), jnp.array([3, 1, 0, 2]))
  pooled = np.asarray(x).reshape(1, 2, 2, 2, 2, 4).max(axis=(2, 4))
  np.testing.assert_array_equal(y[..., [3, 1]], 0)
  np.testing.assert_allclose(y[..., [0, 2]], pooled[..., [0, 2]])


def test_cell_channel_sampling_differs_between_keys_and_repeats_per_key():
  cell = supernet.SearchCell(8, False, False, supernet.edge_ops(only('none', 'skip_connect')),
                             4, 'random', **LAYERS)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8))
  w = jnp.tile(jnp.array([0.3, 0.7]), (14, 1))
  variables = cell.init(jax.random.PRNGKey(1), x, x, w, channel_key=jax.random.PRNGKey(2))
  run = jax.jit(lambda key: cell.apply(variables, x, x, w, channel_key=key,
                                       mutable=['batch_stats'])[0])
  a, b = run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(4))
  assert a.shape == (2, 4, 4, 32)
  assert not np.allclose(a, b)
  np.testing.assert_array_equal(a, run(jax.random.PRNGKey(3)))


def numpy_bn(x):
  mean = x.mean(axis=(0, 1, 2))
  var = x.var(axis=(0, 1, 2))
  return (x - mean) / np.sqrt(var + 1e-5)


def numpy_shuffle(x, groups):
  b, h, w, c = x.shape
  return x.reshape(b, h, w, groups, c // groups).swapaxes(-1, -2).reshape(b, h, w, c)


def test_shuffle_mode_matches_the_reference_formula():
  x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 8)))
  op = mixed_op(('none', 'skip_connect'), k=4, mode='shuffle')
  y = op.apply({}, jnp.asarray(x), jnp.array([0.4, 0.6]))
  # temp1 = sum(w * op(x[:, :C/K])); ans = cat(temp1, x[:, C/K:]); channel_shuffle(ans, K)
  expected = numpy_shuffle(np.concatenate([0.6 * x[..., :2], x[..., 2:]], -1), 4)
  np.testing.assert_allclose(y, expected, rtol=1e-6)

  # Stride 2: max pool 3x3 (pad 1) + BN on the processed channels, 2x2 max pool bypass.
  op = mixed_op(('max_pool_3x3',), stride=2, k=2, mode='shuffle')
  variables = op.init(jax.random.PRNGKey(0), jnp.asarray(x), jnp.ones(1))
  y, _ = op.apply(variables, jnp.asarray(x), jnp.array([0.5]), mutable=['batch_stats'])
  padded = np.pad(x[..., :4], ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  pool3 = np.stack([np.stack([padded[:, 2 * i:2 * i + 3, 2 * j:2 * j + 3].max(axis=(1, 2))
                              for j in range(2)], axis=1) for i in range(2)], axis=1)
  pool2 = x[..., 4:].reshape(2, 2, 2, 2, 2, 4).max(axis=(2, 4))
  expected = numpy_shuffle(np.concatenate([0.5 * numpy_bn(pool3), pool2], -1), 2)
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)


def test_skip_dropout_touches_only_identities():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 4))
  op = mixed_op(('max_pool_3x3', 'skip_connect'), k=1)
  variables = op.init(jax.random.PRNGKey(0), x, jnp.ones(2))
  w = jnp.array([0.5, 0.5])
  run = lambda *a: op.apply(variables, x, w, *a, mutable=['batch_stats'])[0]
  clean = run(None)
  dropped = run(None, jnp.zeros(x.shape, bool), 0.5)
  pool_only = op.apply(variables, x, jnp.array([0.5, 0.0]), mutable=['batch_stats'])[0]
  np.testing.assert_allclose(dropped, pool_only, rtol=1e-6)  # the identity was dropped
  half = jnp.arange(x.size).reshape(x.shape) % 2 == 0
  partly = run(None, half, 0.5)
  np.testing.assert_allclose(partly - pool_only, jnp.where(half, x, 0), rtol=1e-5, atol=1e-6)
  assert not np.allclose(clean, dropped)
  # On a stride-2 edge skip_connect is a FactorizedReduce: dropout does not apply.
  op2 = mixed_op(('skip_connect',), stride=2, k=1)
  v2 = op2.init(jax.random.PRNGKey(0), x, jnp.ones(1))
  a = op2.apply(v2, x, jnp.ones(1), None, mutable=['batch_stats'])[0]
  b = op2.apply(v2, x, jnp.ones(1), None, jnp.zeros((2, 2, 2, 4), bool), 0.5,
                mutable=['batch_stats'])[0]
  np.testing.assert_array_equal(a, b)


def test_skip_dropout_rate_zero_is_no_dropout_and_acts_on_identities_only():
  # search_step leaves the masks out of stages whose rate is 0 (skip_dropout=False): that
  # must be the same function as drawing them at rate 0. At a high rate only the stride-1
  # skip_connects change: a network whose reduction cells have skip_connect on their
  # stride-2 edges alone (FactorizedReduce) and whose normal cells lack it is untouched.
  model = search_network(num_classes=5, channels=4, layers=3, partial_k=2,
                         switches_normal=only('max_pool_3x3', 'skip_connect'),
                         switches_reduce=only('avg_pool_3x3', 'skip_connect'))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 3))
  variables = supernet.init_variables(model, jax.random.PRNGKey(0), (8, 8, 3))
  rngs = {'channels': jax.random.PRNGKey(2), 'dropout': jax.random.PRNGKey(3)}

  def logits(rate, model=model):
    return model.apply(variables, x, skip_drop_rate=rate, rngs=rngs,
                       mutable=['batch_stats'])[0][0]

  np.testing.assert_array_equal(logits(None), logits(0.0))
  assert not np.allclose(logits(None), logits(0.9))  # the normal cells' identities drop
  # Reduction cells: skip_connect on the stride-2 edges only (the node-to-node edges, stride
  # 1, have a max pool instead); normal cells: no skip_connect.
  switches = np.zeros((14, len(genotypes.PRIMITIVES)), bool)
  switches[:, genotypes.PRIMITIVES.index('avg_pool_3x3')] = True
  for e, (src, _) in enumerate(genotypes.EDGES):
    switches[e, genotypes.PRIMITIVES.index('skip_connect' if src < 2 else 'max_pool_3x3')] = True
  no_skip = model.clone(switches_normal=only('max_pool_3x3', 'avg_pool_3x3'),
                        switches_reduce=genotypes.switches_to_tuple(switches))
  variables = supernet.init_variables(no_skip, jax.random.PRNGKey(0), (8, 8, 3))
  np.testing.assert_array_equal(logits(None, no_skip), logits(0.9, no_skip))


def test_bad_settings_give_clear_errors():
  x = jnp.zeros((1, 8, 8, 3))
  with pytest.raises(ValueError, match='search.channel_mode'):
    search_network(channel_mode='first').init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match='search.partial_k'):
    search_network(channels=6, partial_k=4).init(jax.random.PRNGKey(0), x)


def test_channel_shuffle_matches_reshape_definition():
  x = jnp.arange(2 * 8).reshape(1, 1, 2, 8)
  y = ops.channel_shuffle(x, 4)
  assert y[0, 0, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.mark.parametrize('stride,mode,k', [(1, 'random', 2), (2, 'random', 2), (2, 'shuffle', 2),
                                           (1, 'random', 1)])
def test_edges_computed_together_equal_each_edge_alone(stride, mode, k):
  # Three edges, two reading the same input, with different op sets (as in later P-DARTS
  # stages): the group's variables, cut into per-edge blocks along their last axis, make
  # each edge alone compute the same output and batch statistics.
  op_names = (('none', 'max_pool_3x3', 'skip_connect', 'sep_conv_3x3'),
              ('avg_pool_3x3', 'skip_connect', 'dil_conv_3x3', 'sep_conv_3x3'),
              ('none', 'max_pool_3x3', 'dil_conv_3x3', 'dil_conv_5x5'))
  x_a = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 8))
  x_b = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 8))
  xs = [x_a, x_a, x_b]
  weights = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (3, 4)), axis=-1)
  perms = jnp.argsort(jax.random.uniform(jax.random.PRNGKey(3), (3, 8)), axis=-1)
  # Masks for the edges with skip_connect (0 and 1), in edge order.
  masks = jax.random.bernoulli(jax.random.PRNGKey(4), 0.7, (2, 2, 8 // stride, 8 // stride, 8 // k))
  group = supernet.PartialChannelMixedOp(op_names, stride, k, mode, **LAYERS)
  args = (weights, perms, masks, 0.7)
  variables = jax.jit(lambda key: group.init(key, xs, *args))(jax.random.PRNGKey(5))
  outs, state = jax.jit(lambda v: group.apply(v, xs, *args, mutable=['batch_stats']))(variables)

  def edge_slice(tree, name, e):
    members = [i for i in range(3) if name in op_names[i]]
    n, i = len(members), members.index(e)
    return jax.tree_util.tree_map(
        lambda a: a[..., i * a.shape[-1] // n:(i + 1) * a.shape[-1] // n], tree)

  for e in range(3):
    alone = supernet.PartialChannelMixedOp((op_names[e],), stride, k, mode, **LAYERS)
    mine = {c: {name: edge_slice(variables[c][name], name, e)
                for name in op_names[e] if name in variables[c]} for c in variables}
    out, edge_state = alone.apply(mine, [xs[e]], weights[e:e + 1], perms[e:e + 1],
                                  masks[e:e + 1] if e < 2 else None, 0.7,
                                  mutable=['batch_stats'])
    np.testing.assert_allclose(out[0], outs[e], rtol=1e-5, atol=1e-5)
    for name, stats in edge_state['batch_stats'].items():
      expected = edge_slice(state['batch_stats'][name], name, e)
      jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                             stats, expected)
  assert not np.allclose(outs[0], outs[1])  # same input, different edges


def test_darts_style_network_has_no_betas_and_all_channels():
  # P-DARTS' supernet: K = 1 (every channel through the ops), no edge normalisation.
  model = search_network(num_classes=10, channels=4, layers=3, partial_k=1,
                         use_betas=False, switches_normal=only('none', 'skip_connect'),
                         switches_reduce=only('max_pool_3x3', 'skip_connect'))
  variables, (logits, features) = jax.eval_shape(
      lambda k: (lambda v: (v, model.apply(v, jnp.zeros((2, 8, 8, 3)), rngs={'dropout': k},
                                           mutable=['batch_stats'])[0]))(
          supernet.init_variables(model, k, (8, 8, 3))), jax.random.PRNGKey(0))
  assert set(variables['arch']) == {'alphas_normal', 'alphas_reduce'}
  assert logits.shape == (2, 10) and features.shape == (2, 16 * 4)
  # The stride-2 skip_connect of the reduction cell sees all 8 channels of its input.
  kernel = variables['params']['cell1']['from_inputs']['skip_connect']['Conv_0']['kernel']
  assert kernel.shape == (1, 1, 8, 8 * 8 // 2)


def test_cell_runs_group_the_cells_that_have_identical_shapes():
  # P-DARTS' 17-cell stage (reductions at 5 and 11): after each reduction the first cell
  # reads the reduction's input too, so only the cells after it repeat.
  assert supernet.cell_runs(17) == ((0,), (1,), (2, 3, 4), (5,), (6,), (7, 8, 9, 10), (11,),
                                    (12,), (13, 14, 15, 16))
  assert supernet.cell_runs(11) == ((0,), (1,), (2,), (3,), (4,), (5, 6), (7,), (8,), (9, 10))
  assert all(len(run) == 1 for run in supernet.cell_runs(8))  # PC-DARTS: nothing repeats
  # Runs of two stay unrolled (a two-cell loop compiles slower than the cells written out).
  assert all(len(m) == 1 for m in supernet.cell_modules(11))
  assert supernet.cell_modules(17)[2] == (2, 3, 4) and len(supernet.cell_modules(17)) == 9
  assert all(len(m) == 1 for m in supernet.cell_modules(17, scan_cells=False))


def deep_model(**kwargs):
  # Ten cells: reductions at 3 and 6, cells 8 and 9 one run (scanned when runs of two are).
  return search_network(num_classes=5, channels=4, layers=10, partial_k=2,
                        switches_normal=only('max_pool_3x3', 'skip_connect'),
                        switches_reduce=only('avg_pool_3x3', 'skip_connect'), **kwargs)


@pytest.mark.slow
@jax.enable_x64()
def test_scanned_cells_compute_what_unrolled_cells_do(monkeypatch):
  # In float64 with XLA's ops: random channels and skip dropout drawn per cell, batch-norm
  # statistics, and the gradients of weights and architecture all agree. A run of two cells
  # is scanned here (the loop is the same for any length) to keep the programs small.
  monkeypatch.setattr(supernet, 'MIN_SCANNED_RUN', 2)
  unrolled = deep_model(dtype=jnp.float64, scan_cells=False)
  scanned = unrolled.clone(scan_cells=True)
  k_init, k_x, k_channels, k_dropout = jax.random.split(jax.random.PRNGKey(0), 4)
  variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                     supernet.init_variables(unrolled, k_init, (8, 8, 3)))
  x = jax.random.normal(k_x, (4, 8, 8, 3), jnp.float64)

  def run(model, v):
    def loss(params, arch):
      (logits, features), state = model.apply(
          dict(v, params=params, arch=arch), x, skip_drop_rate=0.3,
          rngs={'channels': k_channels, 'dropout': k_dropout}, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(logits)) + jnp.sum(features ** 2), (logits, state)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(v['params'],
                                                                           v['arch'])

  (loss_u, (logits_u, state_u)), (g_params_u, g_arch_u) = run(unrolled, variables)
  stacked = {name: supernet.stack_cells(c, 10) for name, c in variables.items()}
  assert 'cells8-9' in stacked['params'] and 'cell8' not in stacked['params']
  (loss_s, (logits_s, state_s)), (g_params_s, g_arch_s) = run(scanned, stacked)
  close = lambda a, b: chex.assert_trees_all_close(a, b, rtol=1e-10, atol=1e-12)
  close(loss_s, loss_u)
  close(logits_s, logits_u)
  close(g_arch_s, g_arch_u)
  close(g_params_s, supernet.stack_cells(g_params_u, 10))
  close(state_s['batch_stats'], supernet.stack_cells(state_u['batch_stats'], 10))
  assert float(jnp.max(jnp.abs(g_arch_u['alphas_normal']))) > 0


def test_a_scanned_run_is_traced_once_not_per_cell():
  # What makes a deep stage compile fast: the program holds each distinct cell once, so three
  # more repeated cells (17 -> 20, the same runs, each longer) leave its size as it was, while
  # the unrolled 17-cell network's program is much larger.
  def program_lines(layers, scan_cells=True):
    model = search_network(num_classes=5, channels=4, layers=layers, partial_k=2,
                           switches_normal=only('max_pool_3x3', 'sep_conv_3x3'),
                           switches_reduce=only('avg_pool_3x3', 'skip_connect'),
                           scan_cells=scan_cells)
    variables = jax.eval_shape(lambda k: supernet.init_variables(model, k, (8, 8, 3)),
                               jax.random.PRNGKey(0))

    def forward(v, k):
      return model.apply(v, jnp.zeros((2, 8, 8, 3)), rngs={'channels': k},
                         mutable=['batch_stats'])[0]
    return len(jax.jit(forward).lower(variables, jax.random.PRNGKey(0)).as_text().splitlines())

  assert supernet.cell_runs(20)[2::3] == ((2, 3, 4, 5), (8, 9, 10, 11, 12), (15, 16, 17, 18, 19))
  scanned = program_lines(17)
  assert program_lines(20) <= 1.01 * scanned
  assert program_lines(17, scan_cells=False) > 1.5 * scanned
