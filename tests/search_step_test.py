"""The paper's search step: what each part updates, the gradient parts and their mix, the
shared channel sample, the projector's warm-up."""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pcp_jax import data
from pcp_jax import loop
from pcp_jax import losses
from pcp_jax import parallel
from pcp_jax import search
from pcp_jax import search_step


def tiny_stage(ss_factor, float64=False, **search_fields):
  """A 3-cell stage's step spec and state; `float64` (under `jax.enable_x64`): a float64
  model and state with XLA's own ops, for comparisons that float32 noise would blur."""
  config = importlib.import_module('configs.ss_pcp').get_config('tiny')
  config.search.ss_factor = ss_factor
  config.search.update(search_fields)
  config.search.bt_lambda = 0.1
  if float64:
    config.search.dtype, config.op_impl = 'float64', 'xla'
  switches = {'normal': np.zeros((14, 8), bool), 'reduce': np.zeros((14, 8), bool)}
  for cell in switches:
    switches[cell][:, [1, 3]] = True  # max_pool_3x3, skip_connect: compiles fast
  info = data.DatasetInfo('random', 10, 8, 3, (0.5,) * 3, (0.25,) * 3)
  stage = search.build_stage(config, 3, 2, switches, info, (8, 8, 3), 4, parallel.make_mesh(1))
  return stage.spec, parallel.run_once(stage.init, jax.random.PRNGKey(0))


IMAGES = jax.random.randint(jax.random.PRNGKey(1), (8, 8, 8, 3), 0, 256).astype(jnp.uint8)
LABELS = jnp.arange(8) % 10


def changed(a, b):
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b))
  return any(leaves)


def test_arch_step_changes_only_arch_and_projector_weight_step_only_params():
  spec, state = tiny_stage(0.5)
  arch_step = jax.jit(lambda st, k: search_step.arch_step(st, IMAGES, LABELS, k, 0.0, spec))
  weight_step = jax.jit(lambda st, k: search_step.weight_step(st, IMAGES, LABELS, k, 0.0, spec))

  after_arch, metrics = arch_step(state, jax.random.PRNGKey(2))
  assert changed(state.arch, after_arch.arch)
  assert changed(state.projector['params'], after_arch.projector['params'])  # BT trains it
  assert not changed(state.params, after_arch.params)
  assert not changed(state.weight_opt, after_arch.weight_opt)
  assert float(metrics['arch_bt']) > 0
  np.testing.assert_allclose(float(metrics['arch_loss']),
                             0.5 * float(metrics['arch_bt']) + 0.5 * float(metrics['arch_ce']),
                             rtol=1e-5)

  after_weight, metrics = weight_step(state, jax.random.PRNGKey(3))
  assert changed(state.params, after_weight.params)
  assert not changed(state.arch, after_weight.arch)
  assert not changed(state.projector, after_weight.projector)
  assert int(after_weight.step) == 1


def _stack(arch, n):
  return jax.tree_util.tree_map(lambda a: jnp.stack([a] * n), arch)


@pytest.mark.parametrize('shared', [True, False])
def test_bt_views_share_the_channel_sample_when_asked(shared):
  # The same batch three times through the vmapped forward: identical outputs exactly when
  # one channel sample serves all three (skip-connect dropout off).
  spec, state = tiny_stage(0.5, shared_channels=shared)
  x = search_step._augment(spec, jax.random.PRNGKey(4), IMAGES)  # pylint: disable=protected-access
  logits, features, _ = jax.jit(lambda k: search_step._view_forwards(  # pylint: disable=protected-access
      spec, state.params, _stack(state.arch, 3), state.batch_stats, jnp.stack([x] * 3), k,
      None))(jax.random.PRNGKey(5))
  same = [np.array_equal(features[0], features[i]) for i in (1, 2)]
  assert same == ([True, True] if shared else [False, False])
  assert np.array_equal(logits[0], logits[1]) == shared


@jax.enable_x64()
def test_arch_gradient_parts_are_the_ce_and_bt_gradients():
  # One backward pass splits the architecture gradient into CE's and BT's parts; compare with
  # each loss differentiated alone on the same batches, keys and channel sample, in float64.
  spec, state = tiny_stage(0.5, float64=True)
  key = jax.random.PRNGKey(6)
  k_aug, k_fwd, k_views = jax.random.split(key, 3)
  xs = jnp.stack([search_step._augment(spec, k_aug, IMAGES),  # pylint: disable=protected-access
                  *search_step._bt_views(spec, k_views, IMAGES)])  # pylint: disable=protected-access
  (g_ce, g_bt, _), (ce, bt, _, _) = jax.jit(
      lambda st, xs: search_step.arch_gradients(st, xs, LABELS, k_fwd, 0.0, spec))(state, xs)

  def parts(arch, xs):
    logits, features, _ = search_step._view_forwards(  # pylint: disable=protected-access
        spec, state.params, _stack(arch, 3), state.batch_stats, xs, k_fwd, 0.0)
    bt, _ = search_step._bt_loss(  # pylint: disable=protected-access
        spec, state.projector['params'], state.projector['batch_stats'], features[1:])
    return losses.cross_entropy(logits[0], LABELS), bt

  direct_ce = jax.jit(jax.grad(lambda a, xs: parts(a, xs)[0]))(state.arch, xs)
  direct_bt = jax.jit(jax.grad(lambda a, xs: parts(a, xs)[1]))(state.arch, xs)
  for got, want in ((g_ce, direct_ce), (g_bt, direct_bt)):
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
  assert float(bt) > 0 and float(ce) > 0
  # The whole compiled step logs the same parts: its views, drawn inside it, are the views
  # drawn op by op above (colour jitter's hue once took a different case per compilation).
  _, metrics = jax.jit(lambda st: search_step.arch_step(st, IMAGES, LABELS, key, 0.0, spec))(state)
  np.testing.assert_allclose(metrics['arch_bt'], bt, rtol=1e-9)
  np.testing.assert_allclose(metrics['arch_ce_grad_norm'], optax.tree.norm(direct_ce), rtol=1e-9)
  np.testing.assert_allclose(metrics['arch_bt_grad_norm'], optax.tree.norm(direct_bt), rtol=1e-9)
  dot = sum(np.vdot(a, b) for a, b in zip(jax.tree_util.tree_leaves(direct_ce),
                                          jax.tree_util.tree_leaves(direct_bt)))
  np.testing.assert_allclose(
      metrics['arch_grad_cosine'],
      dot / (optax.tree.norm(direct_ce) * optax.tree.norm(direct_bt)), rtol=1e-9)
  assert float(metrics['arch_bt_grad_norm']) > float(metrics['arch_ce_grad_norm']) > 0


def test_mix_arch_gradients_scales_bt_as_configured():
  g_ce = {'a': jnp.array([3.0, 4.0])}
  g_bt = {'a': jnp.array([0.0, 100.0])}
  mixed, _ = search_step.mix_arch_gradients(g_ce, g_bt, 0.25, 'none', 512)
  np.testing.assert_allclose(mixed['a'], [2.25, 28.0])
  mixed, _ = search_step.mix_arch_gradients(g_ce, g_bt, 0.25, 'dim', 100)
  np.testing.assert_allclose(mixed['a'], [2.25, 3.25])
  mixed, scale = search_step.mix_arch_gradients(g_ce, g_bt, 0.25, 'balance', 512)
  np.testing.assert_allclose(scale, 0.05)  # |g_bt| scaled to |g_ce| = 5
  np.testing.assert_allclose(mixed['a'], [2.25, 3.0 + 1.25])
  # ss_factor 1 takes BT alone: a non-finite CE gradient does not leak into it.
  mixed, _ = search_step.mix_arch_gradients({'a': jnp.array([np.nan, 1.0])}, g_bt, 1.0, 'none', 512)
  np.testing.assert_array_equal(mixed['a'], [0.0, 100.0])


@pytest.mark.parametrize('warmup', [True, False])
def test_projector_trains_during_the_warm_up_only_when_asked(warmup):
  spec, state = tiny_stage(0.5, projector_warmup=warmup)
  batch = {'train': (IMAGES, LABELS), 'valid': (IMAGES, LABELS)}
  after, metrics = jax.jit(lambda st: search_step.search_step(
      st, batch, jax.random.PRNGKey(7),
      search_step.HParams(jnp.float32(0.0), jnp.bool_(False)), spec))(state)
  assert not changed(state.arch, after.arch) and not changed(state.arch_opt, after.arch_opt)
  assert changed(state.projector['params'], after.projector['params']) == warmup
  assert (float(metrics['arch_bt']) > 0) == warmup
  assert float(metrics['arch_loss']) == 0.0  # no architecture loss in the warm-up


def _three_steps(spec, state, key):
  """Three search steps in one on-device loop (`loop.run_steps`: the step compiled once)."""
  chunk = jax.jit(functools.partial(
      loop.run_steps, step_fn=functools.partial(search_step.search_step, spec=spec),
      batch_size=4))
  order = {'train': jnp.arange(12) % 8, 'valid': (jnp.arange(12) + 3) % 8}
  hparams = search_step.HParams(jnp.float32(0.0), jnp.bool_(True))
  state, _, bad = chunk(state, loop.zero_sums(search_step.METRICS),
                        {'train': IMAGES, 'valid': IMAGES}, {'train': LABELS, 'valid': LABELS},
                        order, key, hparams, 0, 3)
  assert int(bad) == -1
  return state


def test_with_augmentation_off_the_steps_depend_only_on_the_batches():
  # Fixed channels (shuffle mode) and no skip-connect dropout: with the augmentation off the
  # step keys draw nothing, so two runs with different keys agree bit for bit.
  spec, state = tiny_stage(0.5, channel_mode='shuffle', augment=False, bt_augment=False)
  a = _three_steps(spec, state, jax.random.PRNGKey(10))
  b = _three_steps(spec, state, jax.random.PRNGKey(11))
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(x, y)
  assert changed(state.arch, a.arch) and changed(state.params, a.params)
  # With it on, the same keys draw different crops, flips and views.
  for augment in (False, True):
    on = dataclasses.replace(spec, augment=augment, bt_augment=augment)
    keys = jax.random.PRNGKey(10), jax.random.PRNGKey(11)
    ce = [search_step._augment(on, k, IMAGES) for k in keys]  # pylint: disable=protected-access
    views = [search_step._bt_views(on, k, IMAGES)[0] for k in keys]  # pylint: disable=protected-access
    assert np.array_equal(ce[0], ce[1]) == (not augment)
    assert np.array_equal(views[0], views[1]) == (not augment)
