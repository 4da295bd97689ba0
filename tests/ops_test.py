"""The ops: both kernel sets give the same variables and compute the same function.

`kernels.XLA` (XLA's convolution and reduce-window ops) is the simple reference; the CPU
wing's `cpu.kernels.KERNELS` is the fast path on a CPU. Outputs and gradients (w.r.t. inputs
and parameters) must agree within float tolerance for every op, stride and flavour, for
whole cells, and for the networks `models` builds.
"""

import dataclasses
import functools
import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import genotypes
from pcp_jax import heads
from pcp_jax import kernels
from pcp_jax import models
from pcp_jax import networks
from pcp_jax import ops
from pcp_jax import supernet
from pcp_jax.cpu import kernels as cpu_kernels

IMPLS = (kernels.XLA, cpu_kernels.KERNELS)


def layers(impl):
  """The bound convolution, batch norm and pools a network in training hands its ops."""
  return dict(conv=functools.partial(ops.Conv, kernels=impl),
              norm=functools.partial(ops.BatchNorm, use_running_average=False, kernels=impl),
              max_pool=impl.max_pool, avg_pool=impl.avg_pool)


def assert_trees_close(a, b, rtol=1e-4, atol=1e-5):
  """Leaf-wise closeness, the tolerance scaled by each leaf's largest magnitude."""
  leaves_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  leaves_b, tree_b = jax.tree_util.tree_flatten(b)
  assert tree_a == tree_b and len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(leaves_a, leaves_b):
    x, y = np.asarray(x), np.asarray(y)
    scale = max(float(np.max(np.abs(x), initial=0.0)), 1.0)
    np.testing.assert_allclose(y, x, rtol=rtol, atol=atol * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_op_impl_selects_a_kernel_set_and_auto_follows_the_backend(monkeypatch):
  with pytest.raises(ValueError, match="op_impl must be one of .*'xla'.*got 'fast'"):
    models.select_kernels('fast')
  assert models.select_kernels('xla') is kernels.XLA
  assert models.select_kernels('cpu') is cpu_kernels.KERNELS
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert models.select_kernels('auto') is cpu_kernels.KERNELS
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert models.select_kernels('auto') is kernels.XLA


def test_models_compute_with_the_kernel_set_they_are_given():
  # No layer decides by itself: a set that counts its convolutions, pools and batch norms
  # sees every one of them.
  seen = []

  def counting(name, fn):
    def wrapped(*args):
      seen.append(name)
      return fn(*args)
    return wrapped

  counted = dataclasses.replace(kernels.XLA, name='counted', **{
      f.name: counting(f.name, getattr(kernels.XLA, f.name))
      for f in dataclasses.fields(kernels.Kernels) if callable(getattr(kernels.XLA, f.name))})
  rngs = {'params': jax.random.PRNGKey(0), 'channels': jax.random.PRNGKey(1)}
  x = jnp.zeros((2, 32, 32, 3))
  everything = {'conv2d', 'normalize', 'max_pool', 'avg_pool'}
  for model, x, expected in [
      (supernet.SearchNetwork(channels=4, layers=3, partial_k=2, kernels=counted), x,
       everything | {'take_channels', 'put_channels'}),
      # PDARTS' reduction cell has both pools; the auxiliary head pools too.
      (networks.EvalNetwork(genotypes.REFERENCE_GENOTYPES['PDARTS'], channels=4, layers=3,
                            kernels=counted), x, everything),
      (heads.Projector((8, 4), kernels=counted), jnp.zeros((2, 16)), {'normalize'})]:
    seen.clear()
    jax.eval_shape(lambda m=model, x=x: m.init(rngs, x))
    assert set(seen) >= expected


@pytest.mark.parametrize('kernel,groups,stride,padding', [
    (3, 1, 1, 1), (1, 1, 2, 0), (3, 5, 1, 1), (5, 5, 2, 2)])
def test_conv_has_the_variables_of_the_equivalent_nn_conv(kernel, groups, stride, padding):
  # Same names and shapes (checkpoints load across implementations and from before ops.Conv
  # existed), and the initial values of an nn.Conv initialised as PyTorch's nn.Conv2d.
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 5))
  reference = nn.Conv(5, (kernel, kernel), strides=stride, padding=padding,
                      feature_group_count=groups, use_bias=False, kernel_init=ops.WEIGHT_INIT)
  variables = reference.init(jax.random.PRNGKey(1), x)
  for impl in IMPLS:
    ours = ops.Conv(5, kernel, stride, padding, groups=groups, kernels=impl)
    mine = ours.init(jax.random.PRNGKey(1), x)
    assert jax.tree_util.tree_structure(mine) == jax.tree_util.tree_structure(variables)
    np.testing.assert_array_equal(mine['params']['kernel'], variables['params']['kernel'])
    np.testing.assert_allclose(ours.apply(variables, x), reference.apply(variables, x),
                               rtol=1e-5, atol=1e-5)


def grads_of(fn, *args):
  """(value, grads w.r.t. every argument) of sum(sin(fn(*args)) * fixed weights)."""
  out_shape = jax.eval_shape(fn, *args).shape
  weights = jax.random.normal(jax.random.PRNGKey(42), out_shape)
  loss = lambda *a: jnp.sum(jnp.sin(fn(*a)) * weights)
  return jax.value_and_grad(loss, argnums=tuple(range(len(args))))(*args)


def all_cases(cases, impl):
  """grads_of every (fn(impl), args) case, all in one compiled program."""
  return jax.jit(lambda: [grads_of(fn(impl), *args) for fn, args in cases])()


DEPTHWISE_CASES = [  # shape, kernel, stride, padding, dilation
    ((2, 8, 8, 3), 3, 1, 1, 1), ((2, 8, 8, 3), 5, 1, 2, 1), ((2, 8, 8, 3), 3, 1, 2, 2),
    ((2, 9, 9, 3), 5, 2, 4, 2), ((2, 7, 10, 3), 3, 2, 1, 1), ((2, 6, 6, 2), 3, 1, 0, 1),
    # the reduction cells' (even sizes), and a stride whose phases differ in length
    ((2, 8, 8, 3), 3, 2, 1, 1), ((2, 8, 8, 3), 5, 2, 2, 1), ((2, 8, 8, 3), 3, 2, 2, 2),
    ((2, 8, 8, 3), 5, 2, 4, 2), ((2, 10, 11, 2), 3, 3, 1, 1)]


def test_depthwise_conv_values_and_gradients_agree():
  cases = []
  for i, (shape, kernel, stride, padding, dilation) in enumerate(DEPTHWISE_CASES):
    x = jax.random.normal(jax.random.PRNGKey(i), shape)
    w = jax.random.normal(jax.random.PRNGKey(100 + i), (kernel, kernel, 1, shape[-1]))
    fn = lambda impl, s=stride, p=padding, d=dilation, g=shape[-1]: (
        lambda x, w: impl.conv2d(x, w, s, p, d, g))
    cases.append((fn, (x, w)))
  assert_trees_close(*[all_cases(cases, impl) for impl in IMPLS])


def test_pointwise_conv_values_and_gradients_agree():
  cases = []
  for shape, stride in [((2, 8, 8, 6), 1), ((2, 9, 7, 6), 2)]:
    x = jax.random.normal(jax.random.PRNGKey(0), shape)
    w = jax.random.normal(jax.random.PRNGKey(1), (1, 1, shape[-1], 4))
    cases.append((lambda impl, s=stride: lambda x, w: impl.conv2d(x, w, s), (x, w)))
  assert_trees_close(*[all_cases(cases, impl) for impl in IMPLS])


def test_dense_conv_values_and_gradients_agree():
  # The stems (3 input channels, 3x3) and the auxiliary head's 2x2; strided and dilated too.
  cases = []
  for i, (shape, kernel, c_out, stride, padding, dilation) in enumerate([
      ((2, 8, 8, 3), 3, 6, 1, 1, 1), ((2, 9, 7, 3), 3, 4, 2, 1, 1),
      ((2, 2, 2, 5), 2, 7, 1, 0, 1), ((2, 8, 8, 2), 3, 3, 1, 2, 2)]):
    x = jax.random.normal(jax.random.PRNGKey(i), shape)
    w = jax.random.normal(jax.random.PRNGKey(100 + i), (kernel, kernel, shape[-1], c_out))
    fn = lambda impl, s=stride, p=padding, d=dilation: (
        lambda x, w: impl.conv2d(x, w, s, p, d))
    cases.append((fn, (x, w)))
  assert_trees_close(*[all_cases(cases, impl) for impl in IMPLS])


def tied(shape):
  """Inputs with many exact ties (a flat corner and coarse steps), as flat images give."""
  x = jnp.round(2 * jax.random.normal(jax.random.PRNGKey(0), shape)) / 2
  return x.at[:, :4, :4, :].set(0.5)


def test_pools_agree_including_gradients_at_ties():
  cases, is_max = [], []
  for shape in [(2, 8, 8, 3), (2, 7, 9, 3)]:
    for x in (jax.random.normal(jax.random.PRNGKey(0), shape), tied(shape)):
      for stride in (1, 2):
        for pool in ('max_pool', 'avg_pool'):
          cases.append((lambda impl, p=pool, s=stride: lambda x: getattr(impl, p)(x, 3, s, 1),
                        (x,)))
          is_max.append(pool == 'max_pool')
      cases.append((lambda impl: lambda x: impl.max_pool(x, 2, 2, 0), (x,)))
      is_max.append(True)
  reference, fast = [all_cases(cases, impl) for impl in IMPLS]
  assert_trees_close(reference, fast)
  # The gradient of a max goes to one of the tied inputs, the same one in both.
  for max_pool, (_, (g_xla,)), (_, (g_cpu,)) in zip(is_max, reference, fast):
    if max_pool:
      np.testing.assert_array_equal(g_xla != 0, g_cpu != 0)


@pytest.mark.parametrize('impl', IMPLS, ids=lambda k: k.name)
def test_take_channels_with_static_or_traced_indices(impl):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 8))
  for indices in (np.tile(np.arange(2), (3, 1)),  # `shuffle` mode: the first C/K, per edge
                  np.array([[5, 6], [1, 0]])):  # not a run of channels
    expected = np.asarray(x)[..., indices.reshape(-1)]
    np.testing.assert_array_equal(impl.take_channels(x, indices), expected)
    np.testing.assert_array_equal(
        jax.jit(impl.take_channels)(x, jnp.asarray(indices)), expected)


def op_results(names_strides, affine, channels, impl):
  """Variables and (value, output, new batch stats, grads) of each op under `impl`."""
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, channels))
  built = [ops.make_op(name, channels, stride, affine, **layers(impl))
           for name, stride in names_strides]
  variables = jax.jit(lambda k: [op.init(k, x) for op in built])(jax.random.PRNGKey(1))

  def one(op, v):
    out_shape = jax.eval_shape(lambda: op.apply(v, x, mutable=['batch_stats'])[0]).shape
    weights = jax.random.normal(jax.random.PRNGKey(2), out_shape)

    def loss(x, params):
      y, state = op.apply(dict(v, params=params), x, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y) * weights), (y, state)
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x, v.get('params', {}))

  return variables, jax.jit(lambda: [one(op, v) for op, v in zip(built, variables)])()


@pytest.mark.parametrize('affine', [False, True], ids=['search', 'eval'])
def test_every_op_agrees_across_impls(affine):
  # Stride-1 skip_connect is the identity in every implementation (make_op gives None).
  names_strides = [(name, stride) for name in genotypes.PRIMITIVES if name != 'none'
                   for stride in (1, 2) if (name, stride) != ('skip_connect', 1)]
  reference_vars, reference = op_results(names_strides, affine, 6, IMPLS[0])
  variables, result = op_results(names_strides, affine, 6, IMPLS[1])
  assert_trees_close(reference_vars, variables, rtol=0, atol=0)
  assert_trees_close(reference, result)


def one_op_per_edge(offset):
  """(14, 8) switches, one op per edge, every primitive on some edge."""
  switches = np.zeros((14, 8), bool)
  for e in range(14):
    switches[e, (e + offset) % 8] = True
  return genotypes.switches_to_tuple(switches)


def cell_results(cell, inputs, call_args, key):
  """Initial variables and (value, grads w.r.t. params, inputs and the float call arguments:
  op and edge weights) of a cell under train."""
  rngs = {'drop_path': key}
  variables = jax.jit(lambda k: cell.init(dict(rngs, params=k), *inputs, *call_args))(key)
  arrays = [i for i, a in enumerate(call_args)
            if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jnp.floating)]

  def loss(params, inputs, array_args):
    args = list(call_args)
    for i, a in zip(arrays, array_args):
      args[i] = a
    out, state = cell.apply(dict(variables, params=params), *inputs, *args, rngs=rngs,
                            mutable=['batch_stats'])
    return jnp.sum(jnp.sin(out)), state

  return variables, jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      variables['params'], inputs, [call_args[i] for i in arrays])


@pytest.mark.parametrize('channel_mode', ['random', 'shuffle'])
def test_search_cell_agrees_across_impls(channel_mode):
  # A reduction cell after a reduction: stride-2 and stride-1 edges, the factorized-reduce
  # preprocessing, partial channels, edge weights and skip-connect dropout.
  inputs = (jax.random.normal(jax.random.PRNGKey(0), (2, 16, 16, 6)),
            jax.random.normal(jax.random.PRNGKey(1), (2, 8, 8, 6)))
  op_names = supernet.edge_ops(one_op_per_edge(3))
  weights = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(2), (14, 1)), axis=-1)
  edge_weights = jax.random.uniform(jax.random.PRNGKey(3), (14,))
  results = []
  for impl in IMPLS:
    bound = layers(impl)
    cell = supernet.SearchCell(8, True, True, op_names, 2, channel_mode, bound['conv'],
                               bound['norm'], impl)
    results.append(cell_results(cell, inputs, (weights, edge_weights, 0.3,
                                               jax.random.PRNGKey(5), jax.random.PRNGKey(6)),
                                jax.random.PRNGKey(4)))
  (vars_a, out_a), (vars_b, out_b) = results
  assert_trees_close(vars_a, vars_b, rtol=0, atol=0)
  assert_trees_close(out_a, out_b, rtol=2e-4, atol=2e-5)


def test_eval_cell_agrees_across_impls():
  inputs = (jax.random.normal(jax.random.PRNGKey(0), (4, 16, 16, 6)),
            jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 6)))
  results = []
  for impl in IMPLS:
    cell = networks.EvalCell(genotypes.REFERENCE_GENOTYPES['PDARTS'], 8, True, True,
                             **layers(impl))
    results.append(cell_results(cell, inputs, (True, 0.2), jax.random.PRNGKey(4)))
  (vars_a, out_a), (vars_b, out_b) = results
  assert_trees_close(vars_a, vars_b, rtol=0, atol=0)
  assert_trees_close(out_a, out_b, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize('affine', [False, True])
def test_batch_norm_agrees_across_impls_including_across_devices(affine):
  # A vmapped axis stands in for the data-parallel device axis: statistics are means over
  # all devices, and each device differentiates its own loss, as in a data-parallel step.
  x = 3 * jax.random.normal(jax.random.PRNGKey(0), (2, 4, 5, 5, 3)) + 1
  weights = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  results = []
  for impl in IMPLS:
    bn = ops.BatchNorm(use_running_average=False, use_scale=affine, use_bias=affine,
                       axis_name='devices', kernels=impl)
    variables = bn.init(jax.random.PRNGKey(2), x[0])
    variables = jax.tree_util.tree_map(lambda v: v + 0.5, variables)  # non-trivial scale/bias

    def device_loss(x, weights, params, bn=bn, variables=variables):
      y, state = bn.apply(dict(variables, params=params), x, mutable=['batch_stats'])
      return jnp.sum(jnp.sin(y) * weights), (y, state)

    step = jax.value_and_grad(device_loss, argnums=(0, 2), has_aux=True)
    results.append(jax.jit(jax.vmap(step, in_axes=(0, 0, None), axis_name='devices'))(
        x, weights, variables.get('params', {})))
  assert_trees_close(*results)
  y = results[1][0][1][0]
  np.testing.assert_allclose(np.mean(y, axis=(0, 1, 2, 3)), 0.5 if affine else 0, atol=1e-5)


@pytest.mark.parametrize('impl', IMPLS, ids=lambda k: k.name)
def test_batch_norm_running_variance_is_unbiased_over_the_global_batch(impl):
  # PyTorch's update: running_var = 0.9 * running_var + 0.1 * var_batch * n / (n - 1), n the
  # count over the global batch (both devices of the vmapped device axis here).
  x = 3 * np.random.default_rng(0).normal(size=(2, 4, 5, 5, 3)) + 1
  bn = ops.BatchNorm(use_running_average=False, use_scale=False, use_bias=False,
                     axis_name='devices', kernels=impl)
  variables = bn.init(jax.random.PRNGKey(0), jnp.asarray(x[0], jnp.float32))
  _, state = jax.vmap(lambda xi: bn.apply(variables, xi, mutable=['batch_stats']),
                      axis_name='devices')(jnp.asarray(x, jnp.float32))
  flat = x.reshape(-1, 3)
  np.testing.assert_allclose(state['batch_stats']['var'][0],
                             0.9 + 0.1 * flat.var(axis=0, ddof=1), rtol=1e-5)
  np.testing.assert_allclose(state['batch_stats']['mean'][0], 0.1 * flat.mean(axis=0),
                             rtol=1e-5)


def to_float64(tree):
  return jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, tree)


def test_networks_built_for_either_op_impl_have_the_same_variables():
  # What switching config.op_impl relies on: a checkpoint of one loads into the other (the
  # same names, shapes and types; the ops' functions agree in the tests above).
  search_config = importlib.import_module('configs.ss_pcp').get_config('tiny')
  train_config = importlib.import_module('configs.train_cifar10').get_config('tiny')
  on = [genotypes.PRIMITIVES.index(p) for p in ('max_pool_3x3', 'avg_pool_3x3',
                                                'skip_connect', 'sep_conv_3x3')]
  switches = np.zeros((14, 8), bool)
  switches[:, on] = True

  def variables(op_impl):
    search_config.op_impl = train_config.op_impl = op_impl
    search = models.search_network(search_config, 3, {'normal': switches, 'reduce': switches},
                                   10)
    projector = models.projector(search_config)
    evaluation = models.eval_network(train_config, genotypes.REFERENCE_GENOTYPES['PDARTS'], 10)
    key = jax.random.PRNGKey(0)
    return jax.eval_shape(lambda: (
        supernet.init_variables(search, key, (16, 16, 3)),
        projector.init(key, jnp.zeros((2, 16 * search.channels), jnp.float32)),
        networks.init_variables(evaluation, key, (32, 32, 3))))

  xla, cpu = variables('xla'), variables('cpu')
  assert jax.tree_util.tree_structure(xla) == jax.tree_util.tree_structure(cpu)
  assert jax.tree_util.tree_leaves(xla) == jax.tree_util.tree_leaves(cpu)
