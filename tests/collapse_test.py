"""Collapse diagnostics: the Lanczos curvature meter against exact spectra, the free
indicators and the stopping rules."""

import importlib
import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pcp_jax import collapse
from pcp_jax import curves
from pcp_jax import defaults
from pcp_jax import genotypes
from pcp_jax import main
from pcp_jax import runs
from pcp_jax.cpu import kernels as cpu_kernels

sys.path.insert(0, os.path.dirname(__file__))
from search_step_test import IMAGES, LABELS, tiny_stage  # noqa: E402


def known_spectrum(eigenvalues, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigenvalues),) * 2))
  return (q * np.asarray(eigenvalues)) @ q.T


@jax.enable_x64()
def test_lanczos_finds_the_largest_algebraic_eigenvalue_not_the_largest_magnitude():
  eigenvalues = np.concatenate([[-5.0, -3.0], np.linspace(-0.5, 1.0, 57), [1.3]])
  a = jnp.asarray(known_spectrum(eigenvalues))
  v0 = jnp.asarray(np.random.default_rng(1).normal(size=len(eigenvalues)))
  largest, history = jax.jit(lambda v: collapse.lanczos_max(lambda x: a @ x, v, 30))(v0)
  assert abs(float(largest) - 1.3) < 1e-9
  # Power iteration converges to the largest magnitude, -5: the wrong eigenvalue.
  m, v = np.array(a), np.array(v0)
  for _ in range(300):
    v = m @ v
    v /= np.linalg.norm(v)
  assert float(v @ m @ v) == pytest.approx(-5.0)
  # Ritz values only grow towards the answer, one estimate per product.
  history = np.asarray(history)
  assert history.shape == (30,) and np.all(np.diff(history) >= -1e-12)
  assert history[0] < 1.0


@jax.enable_x64()
def test_lanczos_past_the_dimension_stops_at_the_exact_answer():
  eigenvalues = [-2.0, -1.5, -0.25, -0.1]  # all negative: a padded zero would be wrong
  a = jnp.asarray(known_spectrum(eigenvalues, seed=3))
  largest, history = collapse.lanczos_max(lambda x: a @ x, jnp.ones(4), 9)
  assert abs(float(largest) + 0.1) < 1e-12
  assert np.allclose(np.asarray(history)[4:], -0.1, atol=1e-12)


@pytest.mark.slow
@jax.enable_x64()
def test_the_meter_equals_the_full_hessians_largest_eigenvalue_on_a_supernet():
  spec, state = tiny_stage(0.0, float64=True)
  # Away from the near-uniform start, so the Hessian has a clear spectrum.
  state = state.replace(arch=jax.tree_util.tree_map(
      lambda a: a + 0.5 * jax.random.normal(jax.random.PRNGKey(3), a.shape, a.dtype),
      state.arch))
  variables = {'params': state.params, 'arch': state.arch, 'batch_stats': state.batch_stats}
  model = spec.model.clone(bn_axis_name=None)
  key = jax.random.PRNGKey(5)
  k_channels, _ = jax.random.split(key)  # the meter's partial-channel sample
  flat, unravel = jax.flatten_util.ravel_pytree(state.arch)
  rest = {'params': state.params, 'batch_stats': state.batch_stats}
  hessian = jax.jit(jax.hessian(lambda a: collapse.arch_ce(
      model, rest, unravel(a), IMAGES, LABELS, k_channels, spec.mean, spec.std)))(flat)
  exact = np.linalg.eigvalsh(np.asarray(hessian))
  assert flat.shape == (84,) and exact[0] < -abs(exact[-1]) / 2  # negative ones, and larger
  meter = collapse.make_curvature_fn(spec.model, spec.mean, spec.std, 20)
  largest, _ = meter(variables, IMAGES, LABELS, key)
  assert abs(float(largest) - exact[-1]) <= 1e-6 * abs(exact[-1])
  # The CPU wing (custom gradients: reverse-over-reverse products) in float32, against the
  # float64 answer: float32's rounding is orders of magnitude below the tolerance.
  wing = collapse.make_curvature_fn(
      spec.model.clone(kernels=cpu_kernels.KERNELS, dtype=jnp.float32), spec.mean, spec.std, 20)
  as32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), variables)
  largest32, _ = wing(as32, IMAGES, LABELS, key)
  assert abs(float(largest32) - exact[-1]) <= 2e-3 * abs(exact[-1])


def test_indicators_count_skips_and_measure_entropy():
  genotype = genotypes.REFERENCE_GENOTYPES['PDARTS']
  weights = {'alphas_normal': np.full((14, 9), 1 / 8) * genotypes.all_switches(),
             'alphas_reduce': np.eye(14, 9)}
  found = collapse.indicators(weights, genotypes.to_dict(genotype))
  assert found['skip_normal'] == 2
  assert found['entropy_normal'] == pytest.approx(np.log(8))
  assert found['entropy_reduce'] == pytest.approx(0.0)


def records(curvatures, every=2, skips=None):
  """A stage's history: a curvature every `every` epochs, a genotype naming its epoch."""
  out = []
  for epoch in range(len(curvatures) * every):
    out.append({'epoch': epoch, 'curvature': curvatures[epoch // every]
                if epoch % every == 0 else None,
                'skip_normal': 0 if skips is None else skips[epoch],
                'genotype': {'epoch': epoch}})
  return out[:(len(curvatures) - 1) * every + 1]


def test_darts_es_fires_as_robustdarts_with_its_defaults():
  # Estimates at epochs 0, 2, ..., 22: flat at 1, then 3 at epoch 22. The local average of
  # the last 5 (epochs 14..22) is 1.4, 4 estimates earlier 1.0: 1.4 > 1.3 fires at epoch 22
  # and returns the genotype of epoch 22 - 2 * 2 - 2 * 4 = 10.
  history = records([1.0] * 11 + [3.0])
  decision = collapse.darts_es(history, every=2)
  assert decision['decided_at'] == 22 and decision['chosen'] == 10
  assert decision['genotype'] == {'epoch': 10}
  assert decision['ratio'] == pytest.approx(1.4)
  # 2 at epoch 22 is a ratio of 1.2: not yet; a second 2 at epoch 24 (1.4) fires, epoch 12.
  assert collapse.darts_es(records([1.0] * 11 + [2.0]), every=2) is None
  decision = collapse.darts_es(records([1.0] * 11 + [2.0, 2.0]), every=2)
  assert decision['decided_at'] == 24 and decision['chosen'] == 12
  # Before epoch 10 + 4 + 8 nothing fires, however large the jump.
  assert collapse.darts_es(records([1.0] * 10 + [100.0]), every=2) is None
  # Only on epochs that have an estimate.
  assert collapse.darts_es(records([1.0] * 11 + [3.0]) + [
      {'epoch': 23, 'curvature': None, 'skip_normal': 0, 'genotype': {}}], every=2) is None


def test_local_averages_grow_to_the_window_then_slide():
  assert collapse.local_averages([1, 2, 3, 4, 5, 6], 5) == [2.0, 2.5, 3.0, 4.0]


def test_skip_rule_waits_for_the_warm_up():
  history = records([0.0] * 4, every=1, skips=[3, 1, 2, 2])
  assert collapse.skip_stop(history[:1], 2, warmup_epochs=1) is None  # frozen epoch
  assert collapse.skip_stop(history[:2], 2, warmup_epochs=1) is None  # 1 < 2
  decision = collapse.skip_stop(history[:3], 2, warmup_epochs=1)
  assert decision['chosen'] == 2 and decision['genotype'] == {'epoch': 2}


def search_cfg(**fields):
  cfg = defaults.search_config().search
  cfg.update(fields)
  return cfg


def test_history_keeps_the_first_decision_through_its_metadata():
  cfg = search_cfg(early_stop='skip_count', early_stop_action='warn')
  cfg.stages[0].warmup_epochs = 0
  first, second = (genotypes.to_dict(genotypes.REFERENCE_GENOTYPES[name])
                    for name in ('PDARTS', 'DARTS_V2'))
  history = collapse.History()
  history.update(cfg, {'epoch': 1, 'skip_normal': 2}, first, 0)
  assert history.decision['genotype'] == first and not history.stopped
  history.update(cfg, {'epoch': 2, 'skip_normal': 3}, second, 0)
  assert history.decision['chosen'] == 0  # the first decision stays
  again = collapse.History.from_meta(history.to_meta())
  assert again == history and again.next_stage().records == []
  assert again.next_stage().decision == history.decision
  cfg.early_stop_action = 'stop'
  stopping = collapse.History()
  stopping.update(cfg, {'epoch': 1, 'skip_normal': 2, 'curvature': 0.5}, first, 0)
  assert stopping.stopped and stopping.records[0]['curvature'] == 0.5


@pytest.mark.parametrize('override, message', [
    (dict(early_stop='darts_es'), 'search.curvature_every >= 1'),
    (dict(early_stop='es'), 'search.early_stop must be one of'),
    (dict(early_stop_action='ignore'), 'search.early_stop_action must be one of'),
    (dict(curvature_steps=1), 'search.curvature_steps must be a whole number >= 2'),
    (dict(darts_es=ml_collections.ConfigDict(dict(window=5, delta=4, factor=float('inf'),
                                                  start_epoch=10))),
     'search.darts_es.factor must be a finite number'),
])
def test_bad_settings_name_the_option(override, message):
  config = defaults.search_config()
  config.search.update(override)
  with pytest.raises(ValueError, match=message.replace('.', r'\.').replace('(', r'\(')):
    collapse.check_config(config)


def test_space_argument_sets_the_space_and_caps_the_ops_kept():
  config = importlib.import_module('configs.pcp').get_config('space=s3')
  assert config.search.space == 's3'
  assert [st.num_keep for st in config.search.stages] == [3, 3, 1]
  with pytest.raises(ValueError, match="space must be one of"):
    importlib.import_module('configs.pcp').get_config('space=s9')


@pytest.mark.slow
def test_a_tiny_s3_search_measures_the_curvature_stops_and_keeps_the_chosen_genotype(tmp_path):
  config = importlib.import_module('configs.pc_darts').get_config('tiny,space=s3')
  s = config.search
  s.stages[0].epochs, s.curvature_every, s.early_stop = 3, 1, 'darts_es'
  s.curvature_batch, s.curvature_steps = 16, 8  # cheap products: unoptimised code in tests
  # DARTS-ES shrunk to two epochs: the second estimate against the first, from epoch 0, any
  # rise (or fall, at the same sign) fires; it returns the first epoch's genotype.
  s.darts_es.update(window=1, delta=1, start_epoch=0, factor=0.0)
  workdir = str(tmp_path / 'run')
  main.run(config, workdir)
  rows = runs.Rows(os.path.join(workdir, runs.SEARCH_METRICS)).read()
  assert [r['epoch'] for r in rows] == [1, 2]  # stopped after the rule fired, of 3
  assert all(r['curvature'] > 0 and 0 <= r['curvature_change'] < 1 for r in rows)
  assert all(set(op for op, _ in r['genotype']['normal']) <= {'skip_connect', 'sep_conv_3x3'}
             for r in rows)
  summary = runs.load_json(os.path.join(workdir, runs.SEARCH_SUMMARY))
  assert summary['space'] == 's3' and summary['method'] == 'PC-DARTS'
  assert summary['early_stop']['rule'] == 'darts_es' and summary['early_stop']['chosen'] == 0
  kept = genotypes.load(os.path.join(workdir, runs.GENOTYPE))
  assert genotypes.to_dict(kept) == rows[0]['genotype'] == summary['genotype']
  log = open(os.path.join(workdir, 'log.txt')).read()
  assert 'Collapse: darts_es fired after stage 1 epoch 2; the genotype of epoch 1 is' in log
  assert 'collapse: curvature ' in log
  # The curvature panel of search_curves.png has a point per estimate.
  panel = next(ax for ax in curves.search_curves_figure(rows).axes
               if ax.get_title().startswith('Curvature'))
  assert len(panel.get_lines()[0].get_xdata()) == 2
  assert os.path.getsize(os.path.join(workdir, 'plots', 'search_curves.png')) > 10_000
  # A rerun resumes a stopped search as stopped: no third epoch, the same genotype, and the
  # rerun's seconds are no search cost.
  main.run(config, workdir)
  assert len(runs.Rows(os.path.join(workdir, runs.SEARCH_METRICS)).read()) == 2
  assert genotypes.load(os.path.join(workdir, runs.GENOTYPE)) == kept
  again = runs.load_json(os.path.join(workdir, runs.SEARCH_SUMMARY))
  assert again['search_cost_hours'] == summary['search_cost_hours'] > 0


def test_trajectory_tabulates_the_indicators_and_replays_both_rules():
  genotype = genotypes.to_dict(genotypes.REFERENCE_GENOTYPES['PDARTS'])  # 2 skips
  rows = []
  for epoch in range(1, 24):
    rows.append(dict(stage=1, epoch=epoch, arch_frozen=epoch <= 3, skip_normal=min(epoch, 3),
                     entropy_normal=2.0, entropy_reduce=1.5, genotype=genotype,
                     **({'curvature': 1.0 if epoch < 23 else 3.0, 'curvature_change': 1e-4}
                        if epoch % 2 == 1 else {})))
  table = collapse.trajectory(rows, every=2)
  assert '| 1 | 1 | 1 | 1.0e-04 | 1 | 2.0000 | 1.5000 |' in table
  assert '| 1 | 2 | - | - | 2 | 2.0000 | 1.5000 |' in table
  # The skip rule waits for the first unfrozen epoch (4); DARTS-ES fires at epoch 23 (index 22)
  # and keeps epoch 11, as in test_darts_es_fires_as_robustdarts_with_its_defaults.
  assert 'skip_count: fires after stage 1 epoch 4, keeps epoch 4 (2 skip connections)' in table
  assert 'darts_es: fires after stage 1 epoch 23, keeps epoch 11 (2 skip connections)' in table
  assert 'No rule fires' in collapse.trajectory(rows[:2], every=2)
