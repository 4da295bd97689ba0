"""The search: each method's tiny config end to end, the two steps, schedules, config errors."""

import dataclasses
import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pcp_jax import genotypes
from pcp_jax import losses
from pcp_jax import main
from pcp_jax import monitor
from pcp_jax import ops
from pcp_jax import search


def load_config(name, arg='tiny'):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def write_cifar100(directory, num_train=128, num_test=8):
  """A small CIFAR-100 in the official binary format (coarse label, fine label, pixels)."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(directory, 'cifar-100-binary'))
  for split, n in (('train', num_train), ('test', num_test)):
    fine = rng.integers(0, 100, n, dtype=np.uint8)
    records = np.concatenate([np.stack([fine // 5, fine], 1),
                              rng.integers(0, 256, (n, 3072), dtype=np.uint8)], axis=1)
    with open(os.path.join(directory, 'cifar-100-binary', f'{split}.bin'), 'wb') as f:
      f.write(records.astype(np.uint8).tobytes())


# pcp's code path is ss_pcp's progressive stages with pc_darts' ss_factor = 0 architecture step,
# both run here (pc_darts on CIFAR-100, the paper's Table III search); p_darts' differences
# from them (K = 1, no betas) are the supernet's and the genotype's, tested in supernet_test
# and genotypes_test. Leaving those two out saves CI two 2-stage compiles.
@pytest.mark.parametrize('name, arg', [('pc_darts', 'tiny,dataset=cifar100'),
                                       ('ss_pcp', 'tiny')])
def test_tiny_search_end_to_end(name, arg, tmp_path):
  config = load_config(name, arg)
  if config.data.dataset == 'cifar100':
    write_cifar100(str(tmp_path / 'data'))
    config.data.dir = str(tmp_path / 'data')
  workdir = str(tmp_path / 'run')
  main.run(config, workdir)
  summary = json.load(open(os.path.join(workdir, 'search_summary.json')))
  assert summary['dataset'] == config.data.dataset

  genotype = genotypes.load(os.path.join(workdir, 'genotype.json'))
  assert genotype.normal_concat == (2, 3, 4, 5)
  assert all(op in config.search.initial_ops and op != 'none'
             for op, _ in genotype.normal + genotype.reduce)
  if config.search.max_skip_normal >= 0:
    assert sum(op == 'skip_connect' for op, _ in genotype.normal) <= config.search.max_skip_normal

  rows = [json.loads(line) for line in open(os.path.join(workdir, 'search_metrics.jsonl'))]
  assert len(rows) == sum(stage.epochs for stage in config.search.stages)
  for row in rows:
    assert np.isfinite(row['train_loss']) and 0 <= row['valid_acc'] <= 1
    genotypes.from_dict(row['genotype'])
  frozen = [r for r in rows if r['arch_frozen']]
  assert len(frozen) == sum(stage.warmup_epochs for stage in config.search.stages)
  assert all(r['arch_loss'] > 0 for r in rows if not r['arch_frozen'])
  if config.search.ss_factor > 0:
    assert all(r['arch_bt'] > 0 for r in rows if not r['arch_frozen'])
  else:
    assert all(r['arch_bt'] == 0 for r in rows)

  arch = np.load(os.path.join(workdir, 'arch.npz'))
  assert ('betas_normal' in arch) == config.search.use_betas
  for s, stage in enumerate(config.search.stages[1:], start=2):
    # Each stage after the first searches over the ops the previous one kept.
    kept = config.search.stages[s - 2].num_keep
    stage_arch = np.load(os.path.join(workdir, f'arch_stage{s}.npz'))
    assert stage_arch['alphas_normal'].shape == (14, kept)
    assert stage_arch['switches_normal'].sum(axis=1).tolist() == [kept] * 14
    assert stage_arch['switches_reduce'].sum(axis=1).tolist() == [kept] * 14
    assert rows[-1]['ops_per_edge'] == kept
  for image in ('normal.png', 'reduce.png'):
    assert os.path.getsize(os.path.join(workdir, image)) > 1000
  summary = json.load(open(os.path.join(workdir, 'search_summary.json')))
  assert summary['search_cost_days'] > 0 and summary['method'] == config.method

  # What a researcher watches: the history of the architecture weights (an entry per epoch,
  # each op row a softmax over the ops on), TensorBoard events holding the rows' values, the
  # log, the effective config, the pictures.
  history = [json.loads(line) for line in open(os.path.join(workdir, 'arch_history.jsonl'))]
  assert [(h['stage'], h['epoch'], h['step']) for h in history] == [
      (r['stage'], r['epoch'], r['step']) for r in rows]
  for h in history:
    for cell in ('normal', 'reduce'):
      alphas, switches = np.array(h[f'alphas_{cell}']), np.array(h[f'switches_{cell}'])
      np.testing.assert_allclose(alphas.sum(axis=1), 1.0, rtol=1e-5)
      assert not alphas[~switches].any()
  events = monitor.read_scalars(os.path.join(workdir, 'tensorboard', 'search'))
  for key in ('valid_acc', 'train_loss', 'arch_loss', 'lr', 'skip_dropout'):
    np.testing.assert_allclose([v for _, v in events[key]], [r[key] for r in rows], rtol=1e-6)
    assert [step for step, _ in events[key]] == [r['step'] for r in rows]
  edge0 = f'arch/normal/edge00/{config.search.initial_ops[-1]}'
  np.testing.assert_allclose(
      [v for _, v in events[edge0]][:config.search.stages[0].epochs],
      [h['alphas_normal'][0][genotypes.PRIMITIVES.index(config.search.initial_ops[-1])]
       for h in history[:config.search.stages[0].epochs]], rtol=1e-5)
  log = open(os.path.join(workdir, 'log.txt')).read()
  assert 'compiling stage 1/' in log and 'stage 1/' in log and 'Search done' in log
  assert json.load(open(os.path.join(workdir, 'config.json')))['search']['ss_factor'] == (
      config.search.ss_factor)
  assert json.load(open(os.path.join(workdir, 'environment.json')))['jax'] == jax.__version__
  for name in ('search_curves.png', 'op_weights_normal.png', 'op_weights_reduce.png',
               'stage_cells.png'):
    assert os.path.getsize(os.path.join(workdir, 'plots', name)) > 10_000, name


def tiny_stage(ss_factor, float64=False, **search_fields):
  """A 3-cell stage's step spec and state; `float64` (under `jax.enable_x64`): a float64
  model and state with XLA's own ops, for comparisons that float32 noise would blur."""
  config = load_config('ss_pcp')
  config.search.ss_factor = ss_factor
  config.search.update(search_fields)
  switches = {'normal': np.zeros((14, 8), bool), 'reduce': np.zeros((14, 8), bool)}
  for cell in switches:
    switches[cell][:, [1, 3]] = True  # max_pool_3x3, skip_connect: compiles fast
  config.search.bt_lambda = 0.1
  model, projector, state, _, optimizers = search.build_stage(
      config.search, 3, 2, switches, 10, (8, 8, 3), 4, jax.random.PRNGKey(0))
  spec = search.StepSpec.from_config(config.search, model, projector, optimizers,
                                     (0.5,) * 3, (0.25,) * 3)
  if float64:
    spec = dataclasses.replace(spec, model=model.clone(dtype=jnp.float64, kernels=ops.XLA))
    state = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state)
  return spec, state


IMAGES = jax.random.randint(jax.random.PRNGKey(1), (8, 8, 8, 3), 0, 256).astype(jnp.uint8)
LABELS = jnp.arange(8) % 10


def changed(a, b):
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b))
  return any(leaves)


def test_arch_step_changes_only_arch_and_projector_weight_step_only_params():
  spec, state = tiny_stage(0.5)
  arch_step = jax.jit(lambda st, k: search.arch_step(st, IMAGES, LABELS, k, 0.0, spec))
  weight_step = jax.jit(lambda st, k: search.weight_step(st, IMAGES, LABELS, k, 0.0, spec))

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
  x = search._augment(spec, jax.random.PRNGKey(4), IMAGES)  # pylint: disable=protected-access
  logits, features, _ = jax.jit(lambda k: search._view_forwards(  # pylint: disable=protected-access
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
  xs = jnp.stack([search._augment(spec, k_aug, IMAGES),  # pylint: disable=protected-access
                  *search._bt_views(spec, k_views, IMAGES)])  # pylint: disable=protected-access
  (g_ce, g_bt, _), (ce, bt, _, _) = jax.jit(
      lambda st, xs: search.arch_gradients(st, xs, LABELS, k_fwd, 0.0, spec))(state, xs)

  def parts(arch, xs):
    logits, features, _ = search._view_forwards(  # pylint: disable=protected-access
        spec, state.params, _stack(arch, 3), state.batch_stats, xs, k_fwd, 0.0)
    bt, _ = search._bt_loss(  # pylint: disable=protected-access
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
  _, metrics = jax.jit(lambda st: search.arch_step(st, IMAGES, LABELS, key, 0.0, spec))(state)
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
  mixed, _ = search.mix_arch_gradients(g_ce, g_bt, 0.25, 'none', 512)
  np.testing.assert_allclose(mixed['a'], [2.25, 28.0])
  mixed, _ = search.mix_arch_gradients(g_ce, g_bt, 0.25, 'dim', 100)
  np.testing.assert_allclose(mixed['a'], [2.25, 3.25])
  mixed, scale = search.mix_arch_gradients(g_ce, g_bt, 0.25, 'balance', 512)
  np.testing.assert_allclose(scale, 0.05)  # |g_bt| scaled to |g_ce| = 5
  np.testing.assert_allclose(mixed['a'], [2.25, 3.0 + 1.25])
  # ss_factor 1 takes BT alone: a non-finite CE gradient does not leak into it.
  mixed, _ = search.mix_arch_gradients({'a': jnp.array([np.nan, 1.0])}, g_bt, 1.0, 'none', 512)
  np.testing.assert_array_equal(mixed['a'], [0.0, 100.0])


@pytest.mark.parametrize('warmup', [True, False])
def test_projector_trains_during_the_warm_up_only_when_asked(warmup):
  spec, state = tiny_stage(0.5, projector_warmup=warmup)
  batch = {'train': (IMAGES, LABELS), 'valid': (IMAGES, LABELS)}
  after, metrics = jax.jit(lambda st: search.search_step(
      st, batch, jax.random.PRNGKey(7), 0.0, False, spec))(state)
  assert not changed(state.arch, after.arch) and not changed(state.arch_opt, after.arch_opt)
  assert changed(state.projector['params'], after.projector['params']) == warmup
  assert (float(metrics['arch_bt']) > 0) == warmup
  assert float(metrics['arch_loss']) == 0.0  # no architecture loss in the warm-up


def test_skip_dropout_schedule():
  # Warm-up: r * (E - e - 1) / E; afterwards r * exp(-(e - warmup) * 0.2).
  assert search.skip_dropout_rate(0.4, 0, 25, 10) == pytest.approx(0.4 * 24 / 25)
  assert search.skip_dropout_rate(0.4, 9, 25, 10) == pytest.approx(0.4 * 15 / 25)
  assert search.skip_dropout_rate(0.4, 10, 25, 10) == pytest.approx(0.4)
  assert search.skip_dropout_rate(0.4, 15, 25, 10) == pytest.approx(0.4 * np.exp(-1.0))


def test_config_errors_name_the_option():
  with pytest.raises(ValueError, match='ssf'):
    load_config('ss_pcp', 'ssf=abc')
  with pytest.raises(ValueError, match=r'search.ss_factor must be in \[0, 1\], got 1.5'):
    search.check_config(load_config('ss_pcp', 'ssf=1.5'))
  with pytest.raises(ValueError, match='Unknown config argument'):
    load_config('pcp', 'huge')
  config = load_config('pcp')
  config.search.stages[0].num_keep = 9
  with pytest.raises(ValueError, match=r'search.stages\[0\].num_keep'):
    search.check_config(config)
  config = load_config('pcp')
  config.search.channel_mode = 'first'
  with pytest.raises(ValueError, match='search.channel_mode'):
    search.check_config(config)
  config.search.channel_mode = 'random'
  config.op_impl = 'fast'
  with pytest.raises(ValueError, match=r"op_impl must be one of .*got 'fast' \(config.op_impl\)"):
    search.check_config(config)
  with pytest.raises(ValueError, match=r'config\.op_impl'):
    main.run(config, '/nonexistent')  # before any work (the workdir does not exist)
  config.op_impl = 'auto'
  config.modes = 'search,train'
  with pytest.raises(ValueError, match="mode 'train' needs a train config"):
    main.run(config, '/nonexistent')


def test_the_kernel_set_decides_whether_a_stage_loops_over_its_repeated_cells():
  # XLA (GPUs, TPUs) runs the 17-cell stage's repeated cells as one loop, which compiles
  # faster; the CPU wing writes them out, since XLA:CPU runs the looped step slower.
  from pcp_jax.cpu import kernels as cpu_kernels  # pylint: disable=g-import-not-at-top
  cfg = load_config('ss_pcp', 'tiny').search
  switches = {c: search.initial_switches(cfg.initial_ops) for c in ('normal', 'reduce')}
  for kernels, loops in ((ops.XLA, True), (cpu_kernels.KERNELS, False)):
    model = search.stage_pieces(cfg, 17, 1, switches, 10, (8, 8, 3), 1, kernels=kernels)[0]
    assert model.kernels is kernels and model.scan_cells is loops


def pcp_arch_clip(config):
  return config.search.optim.arch.grad_clip


def test_configs_carry_the_paper_settings():
  ss = load_config('ss_pcp', '')
  assert ss.search.ss_factor == 0.75 and load_config('ss_pcp', 'ssf=0.25').search.ss_factor == 0.25
  pc = load_config('pc_darts', '')
  assert [s.layers for s in pc.search.stages] == [8] and pc.search.partial_k == 4
  assert pc.search.batch_size == 256 and pc.search.optim.weights.lr == 0.1 and pc.search.use_betas
  assert pc.search.optim.arch.grad_clip == 0 and pcp_arch_clip(load_config('pcp', '')) == 5
  pd = load_config('p_darts', '')
  assert [s.layers for s in pd.search.stages] == [5, 11, 17] and pd.search.partial_k == 1
  assert [s.num_keep for s in pd.search.stages] == [5, 3, 1] and not pd.search.use_betas
  assert pc.search.channel_mode == 'shuffle'  # the released code, which made the paper's row
  assert pd.search.batch_size == 96
  pcp = load_config('pcp', '')
  assert pcp.search.partial_k == 4 and pcp.search.use_betas and pcp.search.ss_factor == 0
  assert pcp.search.batch_size == 256 and pcp.search.optim.weights.lr == 0.025  # the paper
  assert pcp.search.optim.arch.lr == 6e-4 and pcp.search.optim.arch.name == 'adam'
  assert pcp.search.channel_mode == 'random' and pcp.search.shared_channels
  assert pcp.search.bt_scale == 'none' and pcp.search.bt_views == 'asymmetric'
  assert [s.warmup_epochs for s in pcp.search.stages] == [15, 15, 15]
  assert [s.warmup_epochs for s in load_config('pcp', 'warmup=10').search.stages] == [10] * 3
  cells8 = load_config('ss_pcp', 'cells8,warmup=15')
  assert [(s.layers, s.warmup_epochs) for s in cells8.search.stages] == [(8, 15)] * 3
  for name in ('pc_darts', 'p_darts', 'pcp', 'ss_pcp', 'quickstart'):
    assert load_config(name, 'dataset=cifar100').data.dataset == 'cifar100'
  tiny100 = load_config('ss_pcp', 'tiny,dataset=cifar100')  # tiny shrinks whatever is chosen
  assert tiny100.data.dataset == 'cifar100' and tiny100.data.source == 'files'
  assert tiny100.data.max_train == 128


@pytest.mark.parametrize('arg, message', [
    ('dataset=mnist', 'dataset must be one of'), ('warmup=x', 'warmup must be a whole'),
    ('warmup=40', r'warmup must be in 0\.\.25')])
def test_config_arguments_are_checked(arg, message):
  with pytest.raises(ValueError, match=message):
    load_config('pcp', arg)


@pytest.mark.parametrize('field, value, message', [
    ('bt_scale', 'log', 'search.bt_scale must be one of'),
    ('bt_views', 'strong', 'search.bt_views must be one of')])
def test_new_search_fields_are_checked(field, value, message):
  config = load_config('ss_pcp')
  config.search[field] = value
  with pytest.raises(ValueError, match=message):
    search.check_config(config)
