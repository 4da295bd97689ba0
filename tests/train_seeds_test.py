"""Training one genotype over N seeds as one program (pcp_jax/train_seeds.py): each member is
its solo run, resume is bitwise, RUN/results.json's format and the one-line refusals."""

import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from conftest import OnChunk
from configs import train_cifar10
from pcp_jax import checkpoint
from pcp_jax import data
from pcp_jax import loop
from pcp_jax import main
from pcp_jax import memory
from pcp_jax import models
from pcp_jax import runs
from pcp_jax import train
from pcp_jax import train_seeds

TIMING = ('epoch_seconds', 'elapsed_seconds')


def tiny_config(arg='seeds=2,sgd'):
  """64 training images (4 steps of 16; chunks end at steps 3 and 4), 40 test images, two
  epochs (the second with drop-path)."""
  config = train_cifar10.get_config(f'{arg},tiny')
  config.genotype = 'DARTS_V2'
  config.data.max_train, config.data.max_test = 64, 40
  config.train.eval_batch_size = 32
  config.checkpoint.every_steps = 3
  return config


def rows_of(folder, name=runs.TRAIN_METRICS):
  return [{k: v for k, v in r.items() if not k.startswith(TIMING)}
          for r in runs.Rows(os.path.join(folder, name), write=False).read()]


def _model(folder, config):
  info = data.train_splits(config).info
  model = models.eval_network(config, train.load_genotype(config, folder), info.num_classes)
  return model, train.make_optimizer(config)[0], train.image_shape(info)


def params_of(folder, config, name=runs.CHECKPOINTS):
  """(parameters, metadata) of the newest checkpoint in `folder/name` (a solo run's layout)."""
  model, tx, shape = _model(folder, config)
  ckpt = checkpoint.Checkpointer(os.path.join(folder, name), max_to_keep=None)
  _, tree, meta = ckpt.restore_latest(train.checkpoint_template(model, tx, shape))
  ckpt.close()
  return jax.tree_util.tree_leaves(tree['state'].params), meta


def initial_params(folder, config):
  """The parameters a solo run of `config` starts from."""
  model, tx, shape = _model(folder, config)
  key = jax.random.split(jax.random.key(config.seed), 3)[0]
  return jax.tree_util.tree_leaves(train.initial_state(model, tx, key, shape).params)


@pytest.fixture(scope='module')
def seeds_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('seeds_run'))
  config = tiny_config()
  train_seeds.train_seeds(config, workdir)
  return config, workdir


@pytest.mark.slow  # two solo runs beside the seeds run
def test_members_equal_their_solo_runs(seeds_run, tmp_path):
  """Float32 (training has no float64 option), SGD: the vmapped step batches the members'
  convolutions, so a member's sums round differently from its solo run's (and Adam, which
  divides by the root of tiny second moments, would blow that rounding up to the size of a
  step). Decisive all the same: a member starts from its solo run's parameters bit for bit,
  its metric rows match to 1e-4, and the parameters' gap to the solo run stays within 1e-2
  of the solo run's own update (each array's within 1e-1; measured: 7e-4 and 1e-2 at worst
  for seed 0, 1e-6 for seed 1); a swapped key, data order or state, or one member's batch
  statistics reaching another, gives another update, a gap of the update's own size (and
  the two seeds' runs differ, checked below)."""
  config, workdir = seeds_run
  solo = []
  for k in range(2):
    folder = str(tmp_path / f'solo{k}')
    train.train_and_evaluate(train_seeds.member_config(config, k), folder)
    solo.append(folder)
    member = os.path.join(workdir, 'seeds', str(k))
    mine, theirs = rows_of(member), rows_of(folder)
    assert len(mine) == len(theirs) == 2
    for r, s in zip(mine, theirs):
      assert r.keys() == s.keys() and r['best'] == s['best'] and r['step'] == s['step']
      for name in ('train_loss', 'train_acc', 'grad_norm', 'valid_loss', 'valid_acc', 'lr',
                   'drop_path_rate'):
        np.testing.assert_allclose(r[name], s[name], rtol=1e-4, err_msg=name)
    start = initial_params(folder, train_seeds.member_config(config, k))
    for name in (runs.CHECKPOINTS, runs.BEST):
      (a, meta_a), (b, meta_b) = params_of(member, config, name), params_of(folder, config, name)
      assert meta_a['epoch'] == meta_b['epoch'] and meta_a['config']['seed'] == k
      # Both start from `start` bit for bit: the gap against the solo run's own update.
      gaps = [float(np.linalg.norm(x - y)) for x, y in zip(a, b)]
      updates = [float(np.linalg.norm(y - x0)) for y, x0 in zip(b, start)]
      assert np.linalg.norm(gaps) < 1e-2 * np.linalg.norm(updates), name
      assert all(g < 1e-1 * u for g, u in zip(gaps, updates)), name
    assert json.load(open(os.path.join(member, runs.CONFIG)))['seed'] == k
  # The scale a mix-up would show at: the two seeds' solo runs.
  first, second = params_of(solo[0], config)[0], params_of(solo[1], config)[0]
  assert max(float(np.max(np.abs(x - y))) for x, y in zip(first, second)) > 1e-2
  assert rows_of(solo[0])[0]['train_loss'] != pytest.approx(rows_of(solo[1])[0]['train_loss'],
                                                            rel=1e-3)
  summary = rows_of(workdir, train_seeds.METRICS)
  assert [r['epoch'] for r in summary] == [1, 2]
  losses = [rows_of(os.path.join(workdir, 'seeds', str(k)))[1]['train_loss'] for k in range(2)]
  assert summary[1]['train_loss_mean'] == pytest.approx(np.mean(losses), rel=1e-12)
  assert summary[1]['train_loss_std'] == pytest.approx(np.std(losses), rel=1e-12)


def test_ctrl_c_mid_epoch_and_a_rerun_give_the_uninterrupted_result(seeds_run, tmp_path,
                                                                    monkeypatch):
  config, uninterrupted = seeds_run
  workdir = str(tmp_path / 'stopped')

  def interrupt(state):
    os.kill(os.getpid(), signal.SIGINT)  # handled after this chunk of steps
    return state
  make = loop.make_chunk_fn
  # The 3rd chunk: epoch 2, steps 1-3; saved at step 3 of epoch 2.
  monkeypatch.setattr(loop, 'make_chunk_fn', lambda *a, **k: OnChunk(make(*a, **k), 3,
                                                                     interrupt))
  with pytest.raises(loop.Interrupted, match='SIGINT'):
    train_seeds.train_seeds(config, workdir)
  monkeypatch.undo()
  assert checkpoint.Checkpointer(os.path.join(workdir, 'checkpoints')).latest_step() == 7
  assert [len(rows_of(os.path.join(workdir, 'seeds', str(k)))) for k in range(2)] == [1, 1]
  train_seeds.train_seeds(config, workdir)
  for k in range(2):
    member, want = (os.path.join(d, 'seeds', str(k)) for d in (workdir, uninterrupted))
    assert rows_of(member) == rows_of(want)
    for name in (runs.CHECKPOINTS, runs.BEST):
      for x, y in zip(params_of(member, config, name)[0], params_of(want, config, name)[0]):
        np.testing.assert_array_equal(x, y, err_msg=name)
  assert rows_of(workdir, train_seeds.METRICS) == rows_of(uninterrupted, train_seeds.METRICS)
  # A finished rerun writes nothing (log.txt aside: this process still logs into it).
  def stamps():
    return {os.path.join(r, f): os.stat(os.path.join(r, f)).st_mtime_ns
            for r, _, files in os.walk(workdir) for f in files if f != runs.LOG}
  before = stamps()
  train_seeds.train_seeds(config, workdir)
  assert stamps() == before


def test_test_mode_tests_every_seed_and_writes_the_summary(seeds_run, tmp_path):
  config, trained = seeds_run
  workdir = shutil.copytree(trained, str(tmp_path / 'run'))
  with config.unlocked():
    config.modes = 'test'
  main.run(config, workdir)
  results = json.load(open(os.path.join(workdir, runs.RESULTS)))
  assert results['seed_runs'] == ['seeds/0', 'seeds/1'] and results['n'] == 2
  for k, record in enumerate(results['seeds']):
    own = json.load(open(os.path.join(workdir, 'seeds', str(k), runs.RESULTS)))
    assert record == dict(own, seed=k, folder=f'seeds/{k}')
    assert own['checkpoint'] == 'best' and own['last_checkpoint_epoch'] == 2
  accuracies = [r['test_accuracy'] for r in results['seeds']]
  assert results['mean']['test_accuracy'] == pytest.approx(np.mean(accuracies))
  assert results['std']['test_accuracy'] == pytest.approx(np.std(accuracies))
  assert results['genotype_source'] == 'DARTS_V2' and results['dataset'] == 'cifar10'
  assert os.path.isfile(os.path.join(workdir, 'seeds', '1', 'plots', 'train_curves.png'))


def _fake_member(folder, **results):
  os.makedirs(folder)
  runs.write_json(os.path.join(folder, runs.RESULTS), dict(
      results, genotype_source='DARTS_V2', dataset='cifar10', method='DARTS', epochs=2))


def test_results_hold_each_seed_and_the_mean_and_std(tmp_path):
  config = tiny_config('seeds=3')
  config.seed = 5
  accuracy, loss = [0.5, 0.75, 1.0], [1.0, 2.0, 4.0]
  for k in range(3):
    _fake_member(str(tmp_path / 'seeds' / str(k)), test_accuracy=accuracy[k],
                 test_loss=loss[k], checkpoint='best')
  runs.write_json(str(tmp_path / 'seeds' / '2' / runs.FGSM), {'eps': [0.0, 0.1],
                                                             'accuracy': [0.9, 0.1]})
  results = train_seeds.write_results(config, str(tmp_path))
  assert results == json.load(open(tmp_path / runs.RESULTS))
  assert results['seed_runs'] == ['seeds/0', 'seeds/1', 'seeds/2'] and results['n'] == 3
  assert [(s['seed'], s['folder']) for s in results['seeds']] == [
      (5, 'seeds/0'), (6, 'seeds/1'), (7, 'seeds/2')]
  assert results['seeds'][2]['fgsm_accuracy'] == [0.9, 0.1]
  assert results['mean']['test_accuracy'] == pytest.approx(0.75)
  assert results['std']['test_accuracy'] == pytest.approx(np.std(accuracy))
  assert results['mean']['test_loss'] == pytest.approx(7 / 3)
  assert 'fgsm_accuracy' not in results['mean']  # one seed attacked: no mean over seeds
  # The fields common to all seeds, at the top.
  assert (results['genotype_source'], results['method'], results['checkpoint']) == (
      'DARTS_V2', 'DARTS', 'best')
  assert 'test_accuracy' not in results


@pytest.mark.parametrize('arg, change, modes, message', [
    ('seeds=0', None, 'train,test,fgsm', r'^train\.seeds must be a whole number >= 1, got 0\.$'),
    ('seeds=2', ('weights', 'model.pt'), 'test,fgsm', r'^weights=.* is one network'),
    ('seeds=2', ('num_devices', 2), 'train,test,fgsm',
     r'runs on one device for now: set num_devices=1'),
])
def test_bad_seeds_settings_answer_in_one_line_before_anything_runs(arg, change, modes, message,
                                                                    tmp_path, monkeypatch):
  config = tiny_config(arg)
  if change:
    config[change[0]] = change[1]
  monkeypatch.setattr(jax, 'device_count', lambda: config.num_devices or 1)
  monkeypatch.setattr(train, 'train_and_evaluate', None)  # nothing may start
  for mode in modes.split(','):
    config.modes = mode
    with pytest.raises(ValueError, match=message) as error:
      main.run(config, str(tmp_path / 'run'))
    assert '\n' not in str(error.value)
  assert not os.path.exists(tmp_path / 'run')


def test_the_seeds_argument_and_its_memory():
  with pytest.raises(ValueError, match=r'Config argument seeds must be a whole number >= 1, '
                                       r"got 'two'"):
    tiny_config('seeds=two')
  solo, three = tiny_config('seeds=1'), tiny_config('seeds=3')
  assert (solo.train.seeds, three.train.seeds) == (1, 3)
  assert train_cifar10.get_config().train.seeds == 1
  assert train_seeds.run_folders(three, 'RUN') == [os.path.join('RUN', 'seeds', str(k))
                                                   for k in range(3)]
  assert train_seeds.run_folders(solo, 'RUN') == ['RUN']
  config = train_seeds.member_config(three, 2)
  assert (config.seed, config.train.seeds) == (2, 1)
  three.train.seeds_at_once = 3  # the three seeds' activations at once (an accelerator's way)
  single, triple = memory.train_need(solo), memory.train_need(three)
  assert '3 seeds' in triple.what and 'train.seeds' in triple.fields
  assert triple.bytes > 2 * single.bytes
