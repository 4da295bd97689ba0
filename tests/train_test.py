"""Tests for pcp_jax.train and configs/train_*.py on tiny networks and a few dozen images.

One tiny run (module fixture) serves the pipeline, best-checkpoint and resume tests; runs of the
same shapes reuse its compiled programs through a persistent compilation cache.
"""

import gzip
import json
import math
import os
import shutil
import struct

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import end_on_chunk
from conftest import on_chunk

from configs import train_cifar10
from configs import train_cifar100
from configs import train_fashion_mnist
from pcp_jax import analysis
from pcp_jax import checkpoint
from pcp_jax import data
from pcp_jax import events
from pcp_jax import genotypes
from pcp_jax import loop
from pcp_jax import main
from pcp_jax import models
from pcp_jax import networks
from pcp_jax import reports
from pcp_jax import runs
from pcp_jax import train

GENOTYPE = 'DARTS_V2'  # of the reference genotypes, the fastest to compile
RESULT_KEYS = {'test_accuracy', 'test_loss', 'params', 'params_with_aux', 'genotype',
               'genotype_source', 'dataset', 'method', 'search_cost_days', 'epochs',
               'train_seconds', 'test_top5_accuracy'}


def _tiny_config(genotype=GENOTYPE, optim_overrides=None, **train_overrides):
  """64 training images (4 steps of 16), 40 test images (a full and a padded eval batch)."""
  config = train_cifar10.get_config('tiny')
  config.genotype = genotype
  config.data.max_train = 64
  config.data.max_test = 40
  config.train.eval_batch_size = 32
  config.fgsm.num_examples = 8
  config.fgsm.batch_size = 8
  config.fgsm.example_indices = [0, 1]
  config.lock()  # a misspelt override fails instead of adding an unused field
  for name, value in train_overrides.items():
    setattr(config.train, name, value)
  for name, value in (optim_overrides or {}).items():
    setattr(config.train.optim, name, value)
  return config


def _rows(workdir):
  with open(os.path.join(workdir, runs.TRAIN_METRICS)) as f:
    return [json.loads(line) for line in f]


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _assert_valid_png(path):
  with Image.open(path) as image:
    image.verify()
  with Image.open(path) as image:
    assert image.format == 'PNG' and min(image.size) > 50


@pytest.fixture(scope='module')
def reference_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('reference_run'))
  config = _tiny_config()
  main.run(config, workdir)
  return config, workdir


# ---------------------------------------------------------------------------
# End to end.


def test_pipeline_from_a_reference_name(reference_run):
  config, workdir = reference_run
  results = _read_json(os.path.join(workdir, 'results.json'))
  assert RESULT_KEYS <= set(results)
  assert results['params'] == networks.count_params(
      genotypes.get(GENOTYPE), channels=4, layers=3, num_classes=10, image_shape=(32, 32, 3))
  assert results['params_with_aux'] > results['params']
  assert 0.0 <= results['test_accuracy'] <= 1.0 and math.isfinite(results['test_loss'])
  assert results['num_test_examples'] == 40
  # 64 training images of the shipped subset: a tiny run, marked as such.
  assert results['num_train_examples'] == 64 and results['data_source'] == 'subset'
  method = genotypes.REFERENCE_METHODS[GENOTYPE][0]  # the cell's published name
  assert results['method'] == method and results['genotype_source'] == GENOTYPE
  assert results['search_cost_days'] is None
  assert results['dataset'] == 'cifar10' and results['epochs'] == 2
  # The last epoch's test accuracy beside the best checkpoint's: the same number exactly when
  # the best checkpoint is the last epoch's.
  assert results['last_checkpoint_epoch'] == 2 and results['val_split'] == 'test'
  assert 0.0 <= results['last_test_accuracy'] <= 1.0
  if results['checkpoint_epoch'] == 2:
    assert results['last_test_accuracy'] == results['test_accuracy']
  assert results['genotype'] == genotypes.to_dict(genotypes.get(GENOTYPE))
  assert genotypes.load(os.path.join(workdir, 'genotype.json')) == genotypes.get(GENOTYPE)
  assert _read_json(os.path.join(workdir, 'train_config.json'))['genotype'] == GENOTYPE

  fgsm = _read_json(os.path.join(workdir, 'fgsm.json'))
  assert fgsm['eps'] == pytest.approx(list(config.fgsm.eps))
  assert len(fgsm['accuracy']) == len(fgsm['eps']) and set(fgsm['examples']) == {'0', '1'}
  assert fgsm['num_examples'] == 8 and fgsm['method'] == method
  pngs = [f for f in os.listdir(workdir) if f.endswith('.png')]
  assert len(pngs) == 3 and all('fgsm' in f for f in pngs)
  for name in pngs:
    _assert_valid_png(os.path.join(workdir, name))

  rows = _rows(workdir)
  scalars = events.read_scalars(os.path.join(workdir, 'tensorboard', 'train'))
  for key in ('train_loss', 'valid_acc', 'lr', 'grad_norm'):
    assert [(step, pytest.approx(v, rel=1e-6)) for step, v in scalars[key]] == [
        (r['step'], r[key]) for r in rows]
  assert 'compiling training' in open(os.path.join(workdir, 'log.txt')).read()
  assert os.path.getsize(os.path.join(workdir, 'plots', 'train_curves.png')) > 10_000

  md_path, _ = reports.write_paper_table([workdir], os.path.join(workdir, 'table'))
  with open(md_path) as f:
    assert f'| {method} |' in f.read()


def test_pipeline_from_a_genotype_json(reference_run, tmp_path):
  search_dir = tmp_path / 'ss_pcp_search'
  search_dir.mkdir()
  genotypes.save(genotypes.get(GENOTYPE), str(search_dir / 'genotype.json'))
  (search_dir / 'search_summary.json').write_text(json.dumps({'search_cost_days': 0.125}))
  config = _tiny_config(genotype=str(search_dir / 'genotype.json'))
  workdir = str(tmp_path / 'train')
  main.run(config, workdir)

  results = _read_json(os.path.join(workdir, 'results.json'))
  assert results['method'] == 'ss_pcp_search'
  assert results['search_cost_days'] == 0.125
  assert results['genotype_source'] == str(search_dir / 'genotype.json')
  # Same genotype and seed as the reference run: the same trained network.
  reference = _read_json(os.path.join(reference_run[1], 'results.json'))
  assert results['test_loss'] == pytest.approx(reference['test_loss'], rel=1e-5)

  paths = reports.fgsm_overlay([reference_run[1], workdir], str(tmp_path / 'compare'))
  assert len(paths) == 3 and all('fgsm' in os.path.basename(p) for p in paths)
  for path in paths:
    _assert_valid_png(path)


@pytest.mark.slow
def test_fashion_mnist_trains_on_one_channel_28px_images(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {
      'train-images-idx3-ubyte.gz': rng.integers(0, 256, (48, 28, 28)),
      'train-labels-idx1-ubyte.gz': rng.integers(0, 10, 48),
      't10k-images-idx3-ubyte.gz': rng.integers(0, 256, (24, 28, 28)),
      't10k-labels-idx1-ubyte.gz': rng.integers(0, 10, 24),
  }
  for name, array in arrays.items():
    header = struct.pack(f'>BBBB{array.ndim}I', 0, 0, 8, array.ndim, *array.shape)
    with open(tmp_path / name, 'wb') as f:
      f.write(gzip.compress(header + array.astype(np.uint8).tobytes()))
  config = train_fashion_mnist.get_config('tiny')
  config.data.dir = str(tmp_path)
  config.genotype = GENOTYPE
  config.train.epochs = 1
  config.modes = 'train,test'
  workdir = str(tmp_path / 'run')
  main.run(config, workdir)

  results = _read_json(os.path.join(workdir, 'results.json'))
  assert results['dataset'] == 'fashion_mnist' and results['num_test_examples'] == 24
  assert results['params'] == networks.count_params(
      genotypes.get(GENOTYPE), channels=4, layers=3, num_classes=10, image_shape=(28, 28, 1))
  assert [r['epoch'] for r in _rows(workdir)] == [1]


# ---------------------------------------------------------------------------
# Checkpoints: the best-by-validation-loss rule, resume, interrupt.


def test_best_rule_saves_whenever_the_validation_loss_decreases():
  best, saved = None, []
  for epoch, loss in enumerate([2.0, 1.5, 1.7, 1.5, 1.2, float('nan'), 1.3]):
    if train.is_better(loss, best):
      best = loss
      saved.append(epoch)
  assert saved == [0, 1, 4]


def test_best_checkpoint_holds_the_epoch_of_lowest_validation_loss(reference_run):
  _, workdir = reference_run
  rows = _rows(workdir)
  lowest = min(rows, key=lambda r: r['valid_loss'])
  best = checkpoint.Checkpointer(os.path.join(workdir, 'best'))
  assert best.all_steps() == [lowest['step']]
  template = train.checkpoint_template(models.eval_network(
      _tiny_config(), genotypes.get(GENOTYPE), data.DATASETS['cifar10'].num_classes),
      train.make_optimizer(_tiny_config())[0], (32, 32, 3))
  _, _, metadata = best.restore_latest(template)
  assert metadata['epoch'] == lowest['epoch']
  assert metadata['valid_loss'] == pytest.approx(lowest['valid_loss'])
  assert [r['best'] for r in rows] == [
      r['valid_loss'] == min(q['valid_loss'] for q in rows[:i + 1]) for i, r in enumerate(rows)]
  assert checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')).all_steps() == [4, 8]


@pytest.fixture(scope='module')
def one_epoch_run(tmp_path_factory):
  """A run of the reference config stopped after its first epoch (copied by the tests)."""
  workdir = str(tmp_path_factory.mktemp('one_epoch_run'))
  train.train_and_evaluate(_tiny_config(epochs=1), workdir)
  return workdir


def test_rerun_resumes_from_the_latest_epoch(reference_run, one_epoch_run, tmp_path):
  workdir = shutil.copytree(one_epoch_run, str(tmp_path / 'run'))
  first = _rows(workdir)
  train.train_and_evaluate(_tiny_config(epochs=2), workdir)
  rows = _rows(workdir)
  assert [r['epoch'] for r in rows] == [1, 2]
  assert rows[0] == first[0]  # epoch 1 was not run again
  # Epoch 2 continued from epoch 1's state: the same result as the uninterrupted run.
  reference = _rows(reference_run[1])
  for key in ('train_loss', 'train_acc', 'valid_loss', 'valid_acc'):
    assert rows[1][key] == pytest.approx(reference[1][key], rel=1e-5), key


def _on_chunk(monkeypatch, n, action):
  """Runs `action()` before the `n`-th chunk (1-based) of the on-device train loop."""
  def fault(state):
    action()
    return state

  on_chunk(monkeypatch, n, fault)


def test_checkpoints_every_n_steps_and_a_crash_resumes_from_them(reference_run, tmp_path,
                                                                 monkeypatch):
  workdir = str(tmp_path / 'run')
  config = _tiny_config()
  config.checkpoint.every_steps = 3

  def crash():
    raise RuntimeError('simulated crash')

  # Chunks end at steps 3 and 4 of each epoch: the 4th chunk is epoch 2's last step, after
  # the save at its step 3.
  _on_chunk(monkeypatch, 4, crash)
  with pytest.raises(RuntimeError, match='simulated crash'):
    train.train_and_evaluate(config, workdir)
  latest = checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints'))
  assert latest.all_steps() == [4, 7]  # the newest 2: epoch 1's end, epoch 2 step 3
  end_on_chunk(monkeypatch)
  train.train_and_evaluate(config, workdir)
  rows, reference = _rows(workdir), _rows(reference_run[1])
  assert [r['epoch'] for r in rows] == [1, 2]
  for key in ('train_loss', 'train_acc', 'valid_loss', 'valid_acc'):
    assert rows[1][key] == pytest.approx(reference[1][key], rel=1e-5), key


def test_resume_refuses_a_changed_config_but_extends_epochs(one_epoch_run, tmp_path):
  workdir = shutil.copytree(one_epoch_run, str(tmp_path / 'run'))
  saved_config = _read_json(os.path.join(workdir, 'train_config.json'))
  changed = _tiny_config(epochs=1, optim_overrides=dict(lr=0.1))
  changed.seed = 7
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=r'seed: 0 -> 7, train\.optim\.lr: 0\.0006 -> 0\.1'):
    train.train_and_evaluate(changed, workdir)
  assert _read_json(os.path.join(workdir, 'train_config.json')) == saved_config
  # Under val_split='test' the test images are the validation set: "best" compares losses on
  # one set only.
  fewer_test = _tiny_config(epochs=2)
  fewer_test.data.max_test = 32
  with pytest.raises(checkpoint.IncompatibleCheckpoint, match=r'data\.max_test: 40 -> 32'):
    train.train_and_evaluate(fewer_test, workdir)
  train.train_and_evaluate(_tiny_config(epochs=2), workdir)  # more epochs: allowed
  assert [r['epoch'] for r in _rows(workdir)] == [1, 2]
  assert _read_json(os.path.join(workdir, 'train_config.json'))['train']['epochs'] == 2


def test_a_fresh_start_sets_the_earlier_runs_outputs_aside(one_epoch_run, tmp_path):
  # The checkpoints deleted: the rerun starts afresh, and the earlier results, best
  # checkpoint and metric rows go to earlier_runs/1 instead of standing beside the new ones.
  workdir = shutil.copytree(one_epoch_run, str(tmp_path / 'run'))
  shutil.rmtree(os.path.join(workdir, 'checkpoints'))
  (tmp_path / 'run' / 'results.json').write_text('{"test_accuracy": 0.5}')
  earlier_rows = _rows(workdir)
  train.train_and_evaluate(_tiny_config(epochs=1), workdir)
  earlier = os.path.join(workdir, 'earlier_runs', '1')
  assert sorted(os.listdir(earlier)) == ['best', 'results.json', 'train_metrics.jsonl']
  assert not os.path.exists(os.path.join(workdir, 'results.json'))
  assert _rows(earlier) == earlier_rows and len(_rows(workdir)) == 1
  assert checkpoint.Checkpointer(os.path.join(workdir, 'best')).all_steps() == [4]


def test_a_damaged_best_checkpoint_falls_back_to_the_latest_with_a_warning(
    reference_run, tmp_path, caplog):
  config, workdir = reference_run
  workdir = shutil.copytree(workdir, str(tmp_path / 'run'))
  for root, _, files in os.walk(os.path.join(workdir, 'best')):
    if os.path.basename(root) == 'state' or '/state/' in root:
      for name in files:
        with open(os.path.join(root, name), 'wb') as f:
          f.write(b'garbage')
  splits = data.train_splits(config)
  model = models.eval_network(config, genotypes.get(GENOTYPE), splits.info.num_classes)
  _, name, meta = analysis.restore_for_eval(config, workdir, model, splits.info)
  assert name == 'checkpoints' and meta['epoch'] == 2
  assert 'best' in caplog.text and 'restores' in caplog.text
  # results.json and the table say which checkpoint the test error is of.
  assert analysis.test(config, workdir)['checkpoint'] == 'checkpoints'
  _, (row,) = reports.paper_table([workdir])
  assert row['Tested checkpoint'] == 'latest (best/ unusable)'


def test_a_pasted_genotype_trains_as_the_same_genotype(reference_run):
  pasted = genotypes.to_string(genotypes.get(GENOTYPE))
  assert train.load_genotype(_tiny_config(genotype=pasted), reference_run[1]) == (
      genotypes.get(GENOTYPE))
  assert runs.method_name(pasted) == 'pasted genotype'


def test_workdir_of_another_genotype_is_refused(reference_run):
  with pytest.raises(ValueError, match='another genotype'):
    analysis.test(_tiny_config(genotype='PDARTS'), reference_run[1])


@pytest.mark.parametrize('mode', ['test', 'fgsm'])
def test_test_and_fgsm_name_a_changed_network_field(reference_run, mode):
  config = _tiny_config(channels=8)
  with pytest.raises(checkpoint.IncompatibleCheckpoint,
                     match=r'different configuration \(train\.channels: 4 -> 8\)'):
    (analysis.test if mode == 'test' else analysis.fgsm)(config, reference_run[1])


def test_evaluate_pads_the_last_batch(reference_run):
  config, workdir = reference_run
  splits = data.train_splits(config)
  model = models.eval_network(config, genotypes.get(GENOTYPE), splits.info.num_classes)
  state, name, _ = analysis.restore_for_eval(config, workdir, model, splits.info)
  assert name == 'best'
  eval_fn = loop.make_eval_fn(model, splits.info.mean, splits.info.std)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  padded = loop.evaluate(eval_fn, variables, splits.test_images, splits.test_labels, 32)
  whole = loop.evaluate(eval_fn, variables, splits.test_images, splits.test_labels, 40)
  assert padded['loss'] == pytest.approx(whole['loss'], rel=1e-5)
  assert padded['accuracy'] == whole['accuracy']


# ---------------------------------------------------------------------------
# The model in training and in evaluation.


def test_auxiliary_head_and_drop_path_act_only_in_training():
  config = _tiny_config()
  model = models.eval_network(config, genotypes.get(GENOTYPE), 10)
  assert model.auxiliary
  variables = train.initial_state(model, train.make_optimizer(config)[0], jax.random.key(0),
                                  (32, 32, 3))
  variables = {'params': variables.params, 'batch_stats': variables.batch_stats}
  x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))

  @jax.jit
  def train_forward(x, key):
    (logits, aux), _ = model.apply(variables, x, train=True, drop_path_rate=0.5,
                                   rngs={'drop_path': key}, mutable=['batch_stats'])
    return logits, aux

  @jax.jit
  def eval_forward(x, rate):
    return model.apply(variables, x, train=False, drop_path_rate=rate)

  logits_a, aux_a = train_forward(x, jax.random.key(2))
  logits_b, _ = train_forward(x, jax.random.key(3))
  assert aux_a is not None and aux_a.shape == (4, 10)
  assert not np.allclose(logits_a, logits_b)
  logits, aux = eval_forward(x, 0.5)
  assert aux is None
  np.testing.assert_array_equal(logits, eval_forward(x, 0.5)[0])
  np.testing.assert_allclose(logits, eval_forward(x, None)[0], rtol=1e-6)


# ---------------------------------------------------------------------------
# Optimizers and configs (no compilation).


def test_unknown_optimizer_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r"train.optim.name must be one of \['sgd', 'adam'\]"):
    main.run(_tiny_config(optim_overrides=dict(name='rmsprop')), str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before anything was written


@pytest.mark.parametrize('get_config, dataset', [
    (train_cifar10.get_config, 'cifar10'), (train_cifar100.get_config, 'cifar100'),
    (train_fashion_mnist.get_config, 'fashion_mnist')])
def test_configs_give_the_papers_recipe(get_config, dataset):
  config = get_config()
  assert config.data.dataset == dataset and config.data.dir == ''
  assert (config.train.channels, config.train.layers, config.train.epochs) == (36, 20, 600)
  assert config.train.optim.name == 'adam' and config.train.optim.lr == 6e-4
  assert (config.train.optim.b1, config.train.optim.b2) == (0.5, 0.999)
  assert config.train.auxiliary and config.train.auxiliary_weight == 0.4
  tiny = get_config('tiny,sgd')
  assert tiny.train.layers == 3 and tiny.train.optim.name == 'sgd'


def test_unknown_config_argument_names_the_allowed_ones():
  with pytest.raises(ValueError,
                     match=r"'huge' for a train config; allowed: adam, seeds, sgd, tiny"):
    train_cifar10.get_config('tiny,huge')
  with pytest.raises(ValueError, match=r"sgd is written sgd, got 'sgd=1'"):
    train_cifar10.get_config('sgd=1')


@pytest.mark.parametrize('value, expected', [('test', None), ('0.1', 0.1), (0.25, 0.25)])
def test_val_split_values(value, expected):
  assert data.parse_val_split(value) == expected


@pytest.mark.parametrize('value', ['1.5', 'train', '0'])
def test_bad_val_split_is_a_clear_error(value):
  with pytest.raises(ValueError, match='train.val_split'):
    data.parse_val_split(value)


def test_held_out_validation_comes_from_the_end_of_the_training_set():
  config = _tiny_config(val_split='0.25')
  splits = data.train_splits(config)
  assert len(splits.train_images) == 48 and len(splits.val_images) == 16
  assert len(splits.test_images) == 40
  full = data.train_splits(_tiny_config())
  np.testing.assert_array_equal(splits.val_images, full.train_images[48:])
