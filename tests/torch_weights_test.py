"""Published PyTorch weights: reading `.pt` files without torch and importing the official
NetworkCIFAR into the evaluation network.

The fixtures in tests/data were made by the official PC-DARTS code (yuhuixu1993/PC-DARTS at
b74702f86c70e330ce0db35762cfade9df026bb7: model.py, operations.py, genotypes.py) with torch
2.13.0 (CPU), by a script kept outside the repository:

- `pc_darts_c4_l5.pt`: `NetworkCIFAR(C=4, num_classes=10, layers=5, auxiliary=True,
  genotype=genotypes.PC_DARTS_cifar)` after `torch.manual_seed(0)`, saved as a bare state dict
  with `torch.save(net.state_dict(), path)` (the zip format; as the DARTS family's
  `utils.save` does).
- `every_op_c2_l3_*.pt`: `NetworkCIFAR(C=2, 10, layers=3, auxiliary=False, EVERY_OP)` (below:
  every DARTS op, a stride-2 skip among them), saved twice: as a DataParallel training
  checkpoint `torch.save({'epoch': 600, 'state_dict': nn.DataParallel(net).state_dict(),
  'best_acc_top1': 97.5, 'optimizer': SGD(...).state_dict()}, path)` (P-DARTS's
  `save_checkpoint`) and as a bare state dict in the legacy format of PyTorch < 1.6
  (`_use_new_zipfile_serialization=False`; DARTS's released `cifar10_model.pt`).

Before saving, every BatchNorm2d got weight U(0.5, 1.5) and bias 0.2 N(0, 1) (torch.Generator
seed 1), so that swapped scale and bias cannot pass; the auxiliary head kept a random 10 % of
its 1x1 conv and linear weights and 1 % of its 2x2 conv weights (the rest +0.0), so the file
compresses in git; five train-mode passes over `np.random.RandomState(1).rand(8, 3, 32, 32)`
gave the running statistics. The `.npz` beside each holds `images`
(`RandomState(0).randint(0, 256, (2, 32, 32, 3))`, uint8 NHWC; the network's input is
`(images / 255).astype(float32)` in NCHW) and the logits torch gave: `logits_float32` (eval),
and from a float64 copy (`net.double()`, the same float32 weights) `logits_float64` (eval) and
`train_logits_float64`, `train_aux_logits_float64` (train mode: batch statistics, drop-path 0).
"""

import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import train_cifar10
from pcp_jax import augment
from pcp_jax import data
from pcp_jax import genotypes
from pcp_jax import kernels
from pcp_jax import losses
from pcp_jax import main
from pcp_jax import models
from pcp_jax import networks
from pcp_jax import runs
from pcp_jax import torch_file
from pcp_jax import torch_weights

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data')
PC_DARTS = os.path.join(DATA, 'pc_darts_c4_l5.pt')
EVERY_OP_FILES = [os.path.join(DATA, f'every_op_c2_l3_{form}.pt')
                  for form in ('dataparallel', 'legacy')]
EVERY_OP = genotypes.parse(
    "Genotype(normal=[('sep_conv_3x3', 0), ('sep_conv_5x5', 1), ('dil_conv_3x3', 0), "
    "('dil_conv_5x5', 2), ('skip_connect', 1), ('avg_pool_3x3', 3), ('max_pool_3x3', 2), "
    "('sep_conv_3x3', 4)], normal_concat=[2, 3, 4, 5], reduce=[('skip_connect', 0), "
    "('dil_conv_5x5', 1), ('avg_pool_3x3', 1), ('max_pool_3x3', 0), ('sep_conv_5x5', 2), "
    "('dil_conv_3x3', 3), ('skip_connect', 2), ('sep_conv_3x3', 4)], reduce_concat=[2, 3, 4, 5])")
PC_DARTS_GENOTYPE = genotypes.REFERENCE_GENOTYPES['PC_DARTS_cifar']
# PC_DARTS_cifar with the first normal edge's sep_conv_3x3 made sep_conv_5x5 or dil_conv_3x3.
PC_DARTS_5X5, PC_DARTS_DIL = (PC_DARTS_GENOTYPE._replace(
    normal=((op, 1),) + tuple(PC_DARTS_GENOTYPE.normal[1:])) for op in ('sep_conv_5x5',
                                                                     'dil_conv_3x3'))
SHAPE = (32, 32, 3)


def _network(genotype, channels, layers, auxiliary, dtype=jnp.float32):
  return networks.EvalNetwork(genotype, channels=channels, layers=layers, auxiliary=auxiliary,
                              kernels=kernels.XLA, dtype=dtype)


def _pc_darts(**changes):
  fields = dict(genotype=PC_DARTS_GENOTYPE, channels=4, layers=5, auxiliary=True)
  return _network(**dict(fields, **changes))


def _reference(name):
  return np.load(os.path.join(DATA, f'{name}.npz'))


def _float64_logits(model, variables, images):
  """(eval logits, train logits, train auxiliary logits) of `variables`, in float64."""
  variables = jax.tree_util.tree_map(lambda a: a.astype(np.float64), variables)
  x = (images / 255).astype(np.float32).astype(np.float64)
  model = model.clone(dtype=jnp.float64)

  @jax.jit
  def logits(variables, x):
    eval_logits, _ = model.apply(variables, x, train=False)
    (train_logits, aux), _ = model.apply(variables, x, train=True, mutable=['batch_stats'])
    return eval_logits, train_logits, aux

  return logits(variables, x)


@jax.enable_x64()
def test_imported_pc_darts_weights_give_the_official_logits():
  ref = _reference('pc_darts_c4_l5')
  variables = torch_weights.load_variables(PC_DARTS, _pc_darts(), SHAPE)
  eval_logits, train_logits, aux = _float64_logits(_pc_darts(), variables, ref['images'])
  # float64 on both sides: only rounding differs (~1e-16); a misplaced tensor moves the logits
  # (of size ~0.5) by far more.
  np.testing.assert_allclose(eval_logits, ref['logits_float64'], rtol=0, atol=1e-10)
  np.testing.assert_allclose(train_logits, ref['train_logits_float64'], rtol=0, atol=1e-10)
  np.testing.assert_allclose(aux, ref['train_aux_logits_float64'], rtol=0, atol=1e-10)


@pytest.mark.parametrize('path', EVERY_OP_FILES, ids=['dataparallel_zip', 'legacy'])
@jax.enable_x64()
def test_every_op_imports_from_either_format(path):
  ref = _reference('every_op_c2_l3')
  model = _network(EVERY_OP, 2, 3, auxiliary=False)
  variables = torch_weights.load_variables(path, model, SHAPE)
  eval_logits, train_logits, _ = _float64_logits(model, variables, ref['images'])
  np.testing.assert_allclose(eval_logits, ref['logits_float64'], rtol=0, atol=1e-10)
  np.testing.assert_allclose(train_logits, ref['train_logits_float64'], rtol=0, atol=1e-10)


@jax.enable_x64()
def test_the_fixture_catches_a_flipped_kernel():
  # The likeliest slip, a depthwise kernel's height and width swapped (here on one edge of the
  # first cell), moves the logits by orders of magnitude more than the tolerance above.
  ref = _reference('pc_darts_c4_l5')
  variables = torch_weights.load_variables(PC_DARTS, _pc_darts(), SHAPE)
  conv = variables['params']['cell0']['edge0_sep_conv_3x3']['DilConv_0']['Conv_0']
  conv['kernel'] = np.swapaxes(conv['kernel'], 0, 1)
  eval_logits, _, _ = _float64_logits(_pc_darts(), variables, ref['images'])
  assert np.abs(eval_logits - ref['logits_float64']).max() > 1e-6


def test_float32_logits_agree_with_torch_float32():
  # The float32 network on this machine's default kernel set, as the test mode runs it.
  ref = _reference('pc_darts_c4_l5')
  model = _pc_darts().clone(kernels=models.select_kernels('auto'))
  variables = torch_weights.load_variables(PC_DARTS, model, SHAPE)
  x = (ref['images'] / 255).astype(np.float32)
  logits, _ = jax.jit(lambda v: model.apply(v, x, train=False))(variables)
  np.testing.assert_allclose(logits, ref['logits_float32'], rtol=0, atol=1e-5)


def test_both_formats_read_the_same_tensors():
  dataparallel, legacy = (torch_file.load(path) for path in EVERY_OP_FILES)
  assert dataparallel['epoch'] == 600 and dataparallel['optimizer']['param_groups'][0]['lr']
  a = torch_file.state_dict(dataparallel, 'a')
  b = torch_file.state_dict(legacy, 'b')
  assert sorted(a) == sorted(b) and not any(k.startswith('module.') for k in a)
  for key in a:
    assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
  assert b['stem.1.num_batches_tracked'].dtype == np.int64 and b['stem.1.num_batches_tracked'] > 0


def test_state_dict_is_found_under_model_and_without_module_prefixes():
  weights = {'module.stem.0.weight': np.zeros(1), 'module.classifier.bias': np.ones(2)}
  assert sorted(torch_file.state_dict({'model': weights, 'epoch': 3}, 'p')) == [
      'classifier.bias', 'stem.0.weight']
  with pytest.raises(ValueError, match=r"p: holds no state dict .*found \['epoch', 'lr'\]"):
    torch_file.state_dict({'epoch': 3, 'lr': 0.1}, 'p')


@pytest.mark.parametrize('changes, message', [
    (dict(layers=3), r'holds 5 cells; set --config.train.layers=5 \(got 3\)'),
    (dict(channels=8), r'holds C=4 \(a 12-channel stem\); set --config.train.channels=4'),
    (dict(auxiliary=False), 'has an auxiliary head; set --config.train.auxiliary=True'),
    (dict(genotype=PC_DARTS_5X5),
     r'does not fit the genotype: cells\.0\._ops\.0\.op\.1\.weight \(cell 0, edge 0: '
     r'sep_conv_5x5 in the genotype\) has shape \(4, 1, 3, 3\) in the checkpoint, '
     r'\(4, 1, 5, 5\) in the network\. Pass the genotype it was trained with'),
    (dict(genotype=EVERY_OP),
     r'the network needs cells\.0\._ops\.1\.op\.1\.weight \(cell 0, edge 1: sep_conv_5x5 in '
     r'the genotype\) of shape \(4, 1, 5, 5\), which the checkpoint lacks \(it has no weights '
     r'there\)'),
    (dict(genotype=PC_DARTS_DIL),
     r'the checkpoint has cells\.0\._ops\.0\.op\.5\.weight \(cell 0, edge 0: dil_conv_3x3 in '
     r'the genotype\), which the network does not use'),
])
def test_another_network_is_refused_in_one_line(changes, message):
  state = torch_file.state_dict(torch_file.load(PC_DARTS), PC_DARTS)
  with pytest.raises(ValueError, match=message) as error:
    torch_weights.network_variables(state, _pc_darts(**changes), SHAPE, PC_DARTS)
  assert '\n' not in str(error.value) and PC_DARTS in str(error.value)


class Model:
  """Stands for a whole pickled model (torch.save(model))."""


def _write_zip(path, pickled):
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('model/data.pkl', pickled)


@pytest.mark.parametrize('make, message', [
    (lambda p: open(p, 'w').write('not weights'), 'not a PyTorch checkpoint'),
    (lambda p: zipfile.ZipFile(p, 'w').writestr('a.txt', 'x'), r'no <name>/data\.pkl'),
    (lambda p: _write_zip(p, pickle.dumps({'net': Model()})),
     r'holds a torch_weights_test\.Model, .*If it is a whole pickled model, save its state '
     r'dict with torch: torch\.save\(torch\.load\(path'),
    (lambda p: open(p, 'wb').write(pickle.dumps({'a': 1}, protocol=2)),
     'not a PyTorch checkpoint'),
    (lambda p: open(p, 'wb').write(open(EVERY_OP_FILES[1], 'rb').read()[:-1]),
     'is missing or cut short'),
])
def test_a_file_that_is_not_a_state_dict_is_refused_in_one_line(tmp_path, make, message):
  path = str(tmp_path / 'weights.pt')
  make(path)
  with pytest.raises(ValueError, match=message) as error:
    torch_file.state_dict(torch_file.load(path), path)
  assert '\n' not in str(error.value) and path in str(error.value)


def _test_config(weights, **overrides):
  config = train_cifar10.get_config('tiny')
  config.modes, config.weights = 'test', weights
  config.genotype, config.train.channels, config.train.layers = 'PC_DARTS_cifar', 4, 5
  config.data.max_test = 32
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize('weights, overrides, message', [
    ('missing.pt', {}, 'weights: missing.pt: no such file'),
    (__file__, {}, 'weights: .*torch_weights_test.py: not a PyTorch checkpoint'),
    (PC_DARTS, {'modes': 'train,test'}, "the train mode trains from scratch: use "
                                        "--config.modes=test"),
])
def test_a_bad_weights_option_is_refused_before_anything_runs(tmp_path, weights, overrides,
                                                              message):
  with pytest.raises(ValueError, match=message):
    main.run(_test_config(weights, **overrides), str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


def test_the_test_mode_evaluates_imported_weights(tmp_path):
  workdir = str(tmp_path / 'run')
  main.run(_test_config(PC_DARTS), workdir)
  results = runs.load_json(os.path.join(workdir, runs.RESULTS))
  assert results['checkpoint'] == PC_DARTS and results['num_test_examples'] == 32
  assert results['epochs'] is None and results['last_test_accuracy'] is None
  # The same loss computed here from the imported weights: the test mode used them.
  splits = data.train_splits(_test_config(PC_DARTS))
  model = _pc_darts()
  variables = torch_weights.load_variables(PC_DARTS, model, SHAPE)
  x = augment.normalize(augment.to_float(splits.test_images), splits.info.mean, splits.info.std)
  logits, _ = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  loss = float(losses.cross_entropy(logits, splits.test_labels))
  np.testing.assert_allclose(results['test_loss'], loss, rtol=1e-4)
