"""The search: each method's tiny config end to end, the two steps, schedules, config errors."""

import importlib
import json
import os

import jax
import numpy as np
import pytest

from pcp_jax import events
from pcp_jax import genotypes
from pcp_jax import main
from pcp_jax import search
from pcp_jax import search_step


def load_config(name, arg='tiny'):
  return importlib.import_module(f'configs.{name}').get_config(arg)


# pcp's code path is ss_pcp's progressive stages with pc_darts' ss_factor = 0 architecture step;
# ss_pcp runs here, pc_darts end to end in collapse_test (in S3); p_darts' differences from them
# (K = 1, no betas) are the supernet's and the genotype's, tested in supernet_test and
# genotypes_test; CIFAR-100's files in data_test. Leaving those out saves CI compiles.
@pytest.mark.parametrize('name, arg', [('ss_pcp', 'tiny')])
def test_tiny_search_end_to_end(name, arg, tmp_path):
  config = load_config(name, arg)
  workdir = str(tmp_path / 'run')
  # An earlier run's genotype, with no checkpoint to resume from: set aside, not left beside.
  os.makedirs(workdir)
  genotypes.save(genotypes.REFERENCE_GENOTYPES['DARTS_V2'], os.path.join(workdir, 'genotype.json'))
  main.run(config, workdir)
  assert genotypes.load(os.path.join(workdir, 'earlier_runs', '1', 'genotype.json')) == (
      genotypes.REFERENCE_GENOTYPES['DARTS_V2'])
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
  scalars = events.read_scalars(os.path.join(workdir, 'tensorboard', 'search'))
  for key in ('valid_acc', 'train_loss', 'arch_loss', 'lr', 'skip_dropout'):
    np.testing.assert_allclose([v for _, v in scalars[key]], [r[key] for r in rows], rtol=1e-6)
    assert [step for step, _ in scalars[key]] == [r['step'] for r in rows]
  edge0 = f'arch/normal/c_k-2_to_node_0/{config.search.initial_ops[-1]}'
  np.testing.assert_allclose(
      [v for _, v in scalars[edge0]][:config.search.stages[0].epochs],
      [h['alphas_normal'][0][genotypes.PRIMITIVES.index(config.search.initial_ops[-1])]
       for h in history[:config.search.stages[0].epochs]], rtol=1e-5)
  texts = events.read_texts(os.path.join(workdir, 'tensorboard', 'search'))
  assert [step for step, _ in texts['genotype/text_summary']] == [r['step'] for r in rows]
  assert genotypes.get(texts['genotype/text_summary'][-1][1].strip()) == genotypes.from_dict(
      rows[-1]['genotype'])
  assert 'ss_factor' in texts['config/text_summary'][0][1]
  log = open(os.path.join(workdir, 'log.txt')).read()
  assert 'compiling stage 1/' in log and 'stage 1/' in log and 'Search done' in log
  # The genotype in the DARTS family's printed form, every epoch and at the end, reads back.
  printed = [line.split('genotype = ', 1)[1] for line in log.splitlines()
             if 'genotype = ' in line]
  assert len(printed) == len(rows) + 1
  assert genotypes.get(printed[-1]) == genotype
  assert genotypes.to_dict(genotypes.get(printed[-2])) == rows[-1]['genotype']
  if len(config.search.stages) > 1:
    assert 'Stage 1 dropped from the normal cell: c_{k-2} \u2192 node 0: ' in log
  assert json.load(open(os.path.join(workdir, 'config.json')))['search']['ss_factor'] == (
      config.search.ss_factor)
  assert json.load(open(os.path.join(workdir, 'environment.json')))['jax'] == jax.__version__
  for name in ('search_curves.png', 'op_weights_normal.png', 'op_weights_reduce.png',
               'stage_cells.png'):
    assert os.path.getsize(os.path.join(workdir, 'plots', name)) > 10_000, name


def test_skip_dropout_schedule():
  # Warm-up: r * (E - e - 1) / E; afterwards r * exp(-(e - warmup) * 0.2).
  assert search_step.skip_dropout_rate(0.4, 0, 25, 10) == pytest.approx(0.4 * 24 / 25)
  assert search_step.skip_dropout_rate(0.4, 9, 25, 10) == pytest.approx(0.4 * 15 / 25)
  assert search_step.skip_dropout_rate(0.4, 10, 25, 10) == pytest.approx(0.4)
  assert search_step.skip_dropout_rate(0.4, 15, 25, 10) == pytest.approx(0.4 * np.exp(-1.0))


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


def test_config_arguments_do_what_they_say():
  assert load_config('ss_pcp', 'ssf=0.25').search.ss_factor == 0.25
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
