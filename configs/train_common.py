"""Shared defaults and config arguments of the train-from-scratch configs (configs/train_*.py).

Config arguments, comma separated after the file name (`--config=configs/train_cifar10.py:tiny`):
  tiny  a few hundred images, 3 cells of 4 channels, 2 epochs: the whole pipeline (train, test,
        FGSM) in 2-3 minutes on a busy 2-core CPU, mostly compilation. The tests start from it.
  sgd   the DARTS recipe instead of the paper's Adam: SGD lr 0.025 with cosine decay to 0 over
        the epochs, momentum 0.9 (weight decay 3e-4 and gradient clip 5 as in the default).
  adam  the paper's recipe (the default): Adam lr 6e-4, betas (0.5, 0.999), constant lr.
"""

import ml_collections

ARGS = ('tiny', 'sgd', 'adam')


def base_train_config() -> ml_collections.ConfigDict:
  """The paper's evaluation recipe on CIFAR-10: 20 cells, C=36, Adam, 600 epochs."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Modes run in order by main.py / train.run_pipeline.
  config.modes = 'train,test,fgsm'
  config.num_devices = 0  # data-parallel over this many devices; 0 = all (of all processes)
  # How convolutions and pools are computed (README, "Op implementations"): 'auto' (= 'cpu'
  # on a CPU backend, 'xla' elsewhere), 'xla' (XLA's own ops) or 'cpu' (shifted slices and
  # matrix products, several times faster under XLA:CPU). Same variables, same function.
  config.op_impl = 'auto'

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'cifar10'
  config.data.source = 'files'  # 'files' (official files), 'tfds' or 'subset' (shipped)
  config.data.dir = ''  # '' means data.default_data_dir(): $PCP_JAX_DATA or ~/.cache
  config.data.download = False
  config.data.pad_to_32 = False
  config.data.train_portion = 0.5  # used by the search only
  config.data.max_train = 0  # keep the first N training images; 0 keeps all
  config.data.max_test = 0  # keep the first N test images; 0 keeps all

  config.train = ml_collections.ConfigDict()
  # A reference name (genotypes.REFERENCE_GENOTYPES), a genotype.json or a search workdir.
  config.genotype = 'PC_DARTS_cifar'
  config.train.method = ''  # name in the results table; '' derives it from config.genotype
  config.train.channels = 36
  config.train.layers = 20
  config.train.auxiliary = True
  config.train.auxiliary_weight = 0.4
  config.train.drop_path_prob = 0.3  # ramped linearly from 0 over the epochs
  config.train.cutout = True
  config.train.cutout_length = 16
  config.train.epochs = 600
  config.train.batch_size = 96
  config.train.eval_batch_size = 500
  config.train.optimizer = 'adam'  # 'adam' (the paper) or 'sgd' (DARTS); see the `sgd` argument
  config.train.lr = 6e-4
  config.train.lr_schedule = 'constant'  # 'constant' or 'cosine' (per epoch, to lr_min)
  config.train.lr_min = 0.0
  config.train.momentum = 0.9  # sgd only
  config.train.weight_decay = 3e-4  # coupled: added to the gradient before the optimizer
  config.train.adam_b1 = 0.5
  config.train.adam_b2 = 0.999
  config.train.grad_clip = 5.0  # global norm; 0 disables
  # 'test' validates on the test set (as DARTS's train.py does) for the best-checkpoint rule;
  # a fraction such as '0.1' holds out the end of the training set instead.
  config.train.val_split = 'test'
  config.train.log_every_steps = 50  # progress lines and non-finite-loss checks

  config.fgsm = ml_collections.ConfigDict()
  config.fgsm.eps = [0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255]
  config.fgsm.num_examples = 1000  # the first N test images
  config.fgsm.example_indices = [0, 1, 2, 3]  # per-example curves (the paper's Fig. 13)
  config.fgsm.batch_size = 250

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.max_to_keep = 2
  config.checkpoint.every_steps = 500  # also at every epoch's end; 0 = only there
  return config


def apply_args(config: ml_collections.ConfigDict, arg=None) -> ml_collections.ConfigDict:
  """Applies the comma-separated config arguments (see the module docstring) to `config`."""
  names = [a.strip() for a in (arg or '').split(',') if a.strip()]
  unknown = [a for a in names if a not in ARGS]
  if unknown:
    raise ValueError(f'Unknown config argument(s) {unknown}; allowed: {list(ARGS)}.')
  for name in names:
    if name == 'tiny':
      config.train.channels = 4
      config.train.layers = 3
      config.train.epochs = 2
      config.train.batch_size = 16
      config.train.eval_batch_size = 64
      config.train.log_every_steps = 8
      if config.data.dataset == 'cifar10':
        config.data.source = 'subset'  # shipped with the package: no download needed
      config.data.max_train = 256
      config.data.max_test = 128
      config.fgsm.num_examples = 32
      config.fgsm.batch_size = 32
    elif name == 'sgd':
      config.train.optimizer = 'sgd'
      config.train.lr = 0.025
      config.train.lr_schedule = 'cosine'
      config.train.lr_min = 0.0
      config.train.momentum = 0.9
    elif name == 'adam':
      config.train.optimizer = 'adam'
      config.train.lr = 6e-4
      config.train.lr_schedule = 'constant'
  return config
