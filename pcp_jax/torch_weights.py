"""Published PyTorch weights: a DARTS / PC-DARTS / P-DARTS `NetworkCIFAR` state dict as the
variables of `networks.EvalNetwork`.

The official network and ours have the same layers in the same order; only names and
layouts differ. A convolution's OIHW weight is our HWIO kernel, a linear layer's (out, in)
weight our (in, out) kernel; batch norms keep their weight (our scale), bias and running
statistics (eps 1e-5 in both), and `num_batches_tracked` is not needed. Every variable of our
network is filled from exactly one tensor and every tensor is used, or the checkpoint is
refused with a line naming what differs.
"""

import re
from typing import Sequence

from flax import traverse_util
import jax
import numpy as np

from pcp_jax import genotypes
from pcp_jax import networks
from pcp_jax import torch_file

CONV, BN, LINEAR = 'conv', 'bn', 'linear'
# kind -> (tensor name, our collection, our variable name, axes that make ours from theirs)
LEAVES = {
    CONV: (('weight', 'params', 'kernel', (2, 3, 1, 0)),),
    BN: (('weight', 'params', 'scale', None), ('bias', 'params', 'bias', None),
         ('running_mean', 'batch_stats', 'mean', None),
         ('running_var', 'batch_stats', 'var', None)),
    LINEAR: (('weight', 'params', 'kernel', (1, 0)), ('bias', 'params', 'bias', None)),
}
# The official modules' layers: (their sub-module, our sub-module path, kind).
RELU_CONV_BN = (('op.1', ('Conv_0',), CONV), ('op.2', ('BatchNorm_0',), BN))
FACTORIZED_REDUCE = (('conv_1', ('Conv_0',), CONV), ('conv_2', ('Conv_1',), CONV),
                     ('bn', ('BatchNorm_0',), BN))
DIL_CONV = (('op.1', ('Conv_0',), CONV), ('op.2', ('Conv_1',), CONV),
            ('op.3', ('BatchNorm_0',), BN))
SEP_CONV = tuple((f'op.{i + shift}', (half,) + path, kind)
                 for shift, half in ((0, 'DilConv_0'), (4, 'DilConv_1'))
                 for i, path, kind in ((1, ('Conv_0',), CONV), (2, ('Conv_1',), CONV),
                                       (3, ('BatchNorm_0',), BN)))
AUXILIARY_HEAD = (('features.2', ('Conv_0',), CONV), ('features.3', ('BatchNorm_0',), BN),
                  ('features.5', ('Conv_1',), CONV), ('features.6', ('BatchNorm_1',), BN),
                  ('classifier', ('Dense_0',), LINEAR))


def _op_layers(name: str, stride: int) -> tuple:
  if name.startswith('sep_conv'):
    return SEP_CONV
  if name.startswith('dil_conv'):
    return DIL_CONV
  if name == 'skip_connect' and stride == 2:
    return FACTORIZED_REDUCE
  return ()  # pools, identity, none: no weights


def module_layout(model: networks.EvalNetwork) -> list:
  """(official module name, our module path, kind) of every weighted layer of `model`."""
  layout = [('stem.0', ('stem_conv',), CONV), ('stem.1', ('stem_bn',), BN)]

  def add(theirs, ours, layers):
    layout.extend((f'{theirs}.{t}', ours + o, kind) for t, o, kind in layers)

  reductions = genotypes.reduction_indices(model.layers)
  for i in range(model.layers):
    reduction, cell = i in reductions, (f'cell{i}',)
    add(f'cells.{i}.preprocess0', cell + ('preprocess0',),
        FACTORIZED_REDUCE if i - 1 in reductions else RELU_CONV_BN)
    add(f'cells.{i}.preprocess1', cell + ('preprocess1',), RELU_CONV_BN)
    edges = model.genotype.reduce if reduction else model.genotype.normal
    for k, (name, j) in enumerate(edges):
      stride = 2 if reduction and j < 2 else 1
      add(f'cells.{i}._ops.{k}', cell + (f'edge{k}_{name}',), _op_layers(name, stride))
  if model.auxiliary:
    add('auxiliary_head', ('auxiliary_head',), AUXILIARY_HEAD)
  layout.append(('classifier', ('classifier',), LINEAR))
  return layout


def _their_shape(shape, axes):
  return tuple(shape) if axes is None else tuple(shape[a] for a in np.argsort(axes))


def _where(key: str, model: networks.EvalNetwork) -> str:
  """Where a tensor name sits in the network, in words (its cell and edge op)."""
  edge = re.match(r'cells\.(\d+)\._ops\.(\d+)\.', key)
  if not edge:
    return key
  i, k = int(edge[1]), int(edge[2])
  if i >= model.layers or k >= len(model.genotype.normal):
    return key
  edges = model.genotype.reduce if i in genotypes.reduction_indices(model.layers) else (
      model.genotype.normal)
  return f'{key} (cell {i}, edge {k}: {edges[k][0]} in the genotype)'


def _check_outline(state: dict, model: networks.EvalNetwork, image_channels: int,
                   source: str) -> None:
  """Refuses a checkpoint of another network shape, naming the config field to change."""
  if any(k.startswith('stem0.') for k in state):
    raise ValueError(f'{source}: a NetworkImageNet checkpoint; only NetworkCIFAR (the CIFAR '
                     'evaluation network) is read.')
  stem = state.get('stem.0.weight')
  if stem is None or stem.ndim != 4 or 'classifier.weight' not in state:
    raise ValueError(f'{source}: not a NetworkCIFAR state dict (no stem.0.weight and '
                     f'classifier.weight; it holds {", ".join(sorted(state)[:4])}, ...).')
  cells = 1 + max((int(m[1]) for m in map(re.compile(r'cells\.(\d+)\.').match, state) if m),
                  default=-1)
  channels = stem.shape[0] // model.stem_multiplier
  classes = state['classifier.weight'].shape[0]
  auxiliary = any(k.startswith('auxiliary_head.') for k in state)
  for differs, what in (
      (cells != model.layers,
       f'holds {cells} cells; set --config.train.layers={cells} (got {model.layers})'),
      (channels != model.channels,
       f'holds C={channels} (a {stem.shape[0]}-channel stem); set '
       f'--config.train.channels={channels} (got {model.channels})'),
      (stem.shape[1] != image_channels,
       f'takes {stem.shape[1]}-channel images; data.dataset has {image_channels}'),
      (classes != model.num_classes,
       f'has {classes} classes; data.dataset has {model.num_classes}'),
      (auxiliary != model.auxiliary,
       f'has {"an" if auxiliary else "no"} auxiliary head; set '
       f'--config.train.auxiliary={auxiliary}')):
    if differs:
      raise ValueError(f'{source}: the checkpoint {what}.')


def _check_tensors(state: dict, wanted: dict, model: networks.EvalNetwork, source: str):
  """Refuses a checkpoint whose tensors are not `wanted` ({name: shape}), naming the first
  tensor that differs and its edge's op."""
  extra = [k for k in state if k not in wanted and not k.endswith('.num_batches_tracked')]
  hint = 'Pass the genotype it was trained with (config.genotype).'
  for key, shape in wanted.items():
    if key not in state:
      module = re.match(r'cells\.\d+\.(_ops\.\d+|preprocess\d)\.', key)
      near = [k for k in extra if k.startswith(module[0] if module else key)]
      found = f'it has {near[0]} there' if near else 'it has no weights there'
      raise ValueError(f'{source} does not fit the genotype: the network needs '
                       f'{_where(key, model)} of shape {shape}, which the checkpoint lacks '
                       f'({found}). {hint}')
    if tuple(state[key].shape) != shape:
      raise ValueError(f'{source} does not fit the genotype: {_where(key, model)} has shape '
                       f'{tuple(state[key].shape)} in the checkpoint, {shape} in the network. '
                       f'{hint}')
  if extra:
    raise ValueError(f'{source} does not fit the genotype: the checkpoint has '
                     f'{_where(extra[0], model)}, which the network does not use. {hint}')


def network_variables(state: dict, model: networks.EvalNetwork, image_shape: Sequence[int],
                      source: str = 'the checkpoint') -> dict:
  """`model`'s variables ({'params', 'batch_stats'}, float32 numpy) from the official
  NetworkCIFAR state dict `state` ({name: array}); a line naming `source` and what differs
  when the checkpoint is not of this network."""
  _check_outline(state, model, image_shape[-1], source)
  shapes = jax.eval_shape(
      lambda k: networks.init_variables(model.clone(bn_axis_name=None), k, image_shape),
      jax.random.key(0))
  ours = traverse_util.flatten_dict(jax.tree_util.tree_map(lambda s: s.shape, shapes))
  wanted = {}  # their tensor name -> (our variable, axes)
  for theirs, path, kind in module_layout(model):
    for name, collection, variable, axes in LEAVES[kind]:
      wanted[f'{theirs}.{name}'] = ((collection,) + path + (variable,), axes)
  named = [key for key, _ in wanted.values()]
  if sorted(named) != sorted(ours):
    raise AssertionError(f'the NetworkCIFAR layout names {len(named)} variables, the network '
                         f'has {len(ours)}: {sorted(set(ours) ^ set(named))[:3]}')
  _check_tensors(state, {key: _their_shape(ours[ours_key], axes)
                         for key, (ours_key, axes) in wanted.items()}, model, source)
  flat = {ours_key: np.asarray(
      state[key] if axes is None else np.transpose(state[key], axes), np.float32)
          for key, (ours_key, axes) in wanted.items()}
  return traverse_util.unflatten_dict(flat)


def load_variables(path: str, model: networks.EvalNetwork, image_shape: Sequence[int]) -> dict:
  """`model`'s variables from the PyTorch checkpoint file `path` (`torch_file`)."""
  return network_variables(torch_file.state_dict(torch_file.load(path), path), model,
                           image_shape, path)
