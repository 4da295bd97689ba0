"""The search: each method's tiny config end to end, the two steps, schedules, config errors."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import genotypes
from pcp_jax import main
from pcp_jax import search


def load_config(name, arg='tiny'):
  return importlib.import_module(f'configs.{name}').get_config(arg)


# pcp's code path is ss_pcp's progressive stages with pc_darts' ss_factor = 0 architecture step,
# both run here; p_darts' differences from them (K = 1, no betas) are the supernet's and the
# genotype's, tested in supernet_test and genotypes_test. Leaving those two out saves CI two
# 2-stage compiles.
@pytest.mark.parametrize('name', ['pc_darts', 'ss_pcp'])
def test_tiny_search_end_to_end(name, tmp_path):
  config = load_config(name)
  workdir = str(tmp_path)
  main.run(config, workdir)

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


def tiny_stage(ss_factor):
  config = load_config('ss_pcp')
  config.search.ss_factor = ss_factor
  switches = {'normal': np.zeros((14, 8), bool), 'reduce': np.zeros((14, 8), bool)}
  for cell in switches:
    switches[cell][:, [1, 3]] = True  # max_pool_3x3, skip_connect: compiles fast
  return search.build_stage(config.search, 3, 2, switches, 10, (8, 8, 3), 4,
                            jax.random.PRNGKey(0)), config


def changed(a, b):
  leaves = jax.tree_util.tree_leaves(jax.tree_util.tree_map(
      lambda x, y: bool(np.any(np.asarray(x) != np.asarray(y))), a, b))
  return any(leaves)


def test_arch_step_changes_only_arch_and_projector_weight_step_only_params():
  (model, projector, state, _, (tx_w, tx_a, tx_p)), config = tiny_stage(0.5)
  images = jax.random.randint(jax.random.PRNGKey(1), (8, 8, 8, 3), 0, 256).astype(jnp.uint8)
  labels = jnp.arange(8) % 10
  mean, std = (0.5,) * 3, (0.25,) * 3
  arch_step = jax.jit(lambda st, k: search.arch_step(
      st, images, labels, k, 0.0, model=model, projector=projector, tx_arch=tx_a,
      tx_projector=tx_p, ss_factor=0.5, bt_lambda=0.1, mean=mean, std=std))
  weight_step = jax.jit(lambda st, k: search.weight_step(
      st, images, labels, k, 0.0, model=model, tx_weights=tx_w, mean=mean, std=std))

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


def test_skip_dropout_schedule():
  # Warm-up: r * (E - e - 1) / E; afterwards r * exp(-(e - warmup) * 0.2).
  assert search.skip_dropout_rate(0.4, 0, 25, 10) == pytest.approx(0.4 * 24 / 25)
  assert search.skip_dropout_rate(0.4, 9, 25, 10) == pytest.approx(0.4 * 15 / 25)
  assert search.skip_dropout_rate(0.4, 10, 25, 10) == pytest.approx(0.4)
  assert search.skip_dropout_rate(0.4, 15, 25, 10) == pytest.approx(0.4 * np.exp(-1.0))


def test_weight_lr_is_cosine_per_epoch():
  schedule = search.cosine_epoch_lr(0.1, 0.001, 10, 5)
  assert float(schedule(0)) == pytest.approx(0.1)
  assert float(schedule(4)) == pytest.approx(0.1)  # constant within an epoch
  assert float(schedule(25)) == pytest.approx(0.001 + 0.5 * 0.099 * (1 + np.cos(np.pi / 2)))


def test_config_errors_name_the_option():
  with pytest.raises(ValueError, match='ssf'):
    load_config('ss_pcp', 'ssf=abc')
  with pytest.raises(ValueError, match='ssf must be in'):
    load_config('ss_pcp', 'ssf=1.5')
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
  config.modes = 'search,dance'
  with pytest.raises(ValueError, match='config.modes'):
    main.run(config, '/nonexistent')


def test_configs_carry_the_paper_settings():
  ss = load_config('ss_pcp', '')
  assert ss.search.ss_factor == 0.75 and load_config('ss_pcp', 'ssf=0.25').search.ss_factor == 0.25
  pc = load_config('pc_darts', '')
  assert [s.layers for s in pc.search.stages] == [8] and pc.search.partial_k == 4
  assert pc.search.batch_size == 256 and pc.search.lr == 0.1 and pc.search.use_betas
  pd = load_config('p_darts', '')
  assert [s.layers for s in pd.search.stages] == [5, 11, 17] and pd.search.partial_k == 1
  assert [s.num_keep for s in pd.search.stages] == [5, 3, 1] and not pd.search.use_betas
  pcp = load_config('pcp', '')
  assert pcp.search.partial_k == 4 and pcp.search.use_betas and pcp.search.ss_factor == 0


def test_command_line_entry_point_rejects_unknown_modes(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / 'cache'))
  result = subprocess.run(
      [sys.executable, '-m', 'pcp_jax.main', '--config=configs/pcp.py:tiny',
       f'--workdir={tmp_path}', '--config.modes=search,dance'],
      cwd=root, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert 'config.modes must be a comma list of' in result.stderr
  assert "'search'" in result.stderr and "'train'" in result.stderr
