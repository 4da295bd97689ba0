"""Shared defaults and config arguments of the search configs (pc_darts, p_darts, pcp, ss_pcp).

Config arguments, comma separated after the file name (`--config=configs/ss_pcp.py:ssf=0.5,tiny`):
  ssf=<float>  the self-supervised factor of the architecture loss, in [0, 1].
  dataset=<name>  search on `cifar10` (the default) or `cifar100` (the paper's Table III);
               the network's classifier follows the dataset.
  warmup=<int> frozen-architecture (warm-up) epochs of every stage. The paper's text gives 15
               for "the progressive case" and 10 for the 5/11/17-cell case of its Table I; read
               literally, `warmup=10` is the 5/11/17-cell reading and `cells8,warmup=15` the
               8-cell one. The progressive configs default to 5/11/17 cells with 15 (the
               labels look swapped: the progressive case is the 5/11/17-cell one).
  tiny         shrink the search to a CPU smoke run of a few minutes, nearly all of it XLA
               compilation (what the tests use):
               128 images (of the shipped CIFAR-10 subset; of data.dir for another
               dataset), 3-cell stages of 8 channels, 2 epochs
               each (1 warm-up), 4 cheap candidate ops (none, max/avg pool, skip) and at
               most two stages (3 ops kept after the first). A smoke test of the code path:
               convolutions in mixed ops multiply the compile time.
  cells8       every progressive stage searches an 8-cell network (the paper's text mentions
               8 search cells for its progressive case; see `warmup`).
"""

import ml_collections

PRIMITIVES = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3',
              'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
ARGS = ('ssf', 'dataset', 'warmup', 'tiny', 'cells8')
DATASETS = ('cifar10', 'cifar100')


def stage(layers, num_keep, epochs, warmup_epochs, skip_dropout):
  s = ml_collections.ConfigDict()
  s.layers = layers  # cells of this stage's supernet
  s.num_keep = num_keep  # candidate ops kept per edge after this stage
  s.epochs = epochs
  s.warmup_epochs = warmup_epochs  # architecture frozen for these first epochs
  s.skip_dropout = skip_dropout  # P-DARTS skip-connect dropout rate r of the stage
  return s


def base_search_config() -> ml_collections.ConfigDict:
  """The progressive partial-channel search (PCP-DARTS) on CIFAR-10."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.modes = 'search'
  config.method = 'PCP-DARTS'
  config.num_devices = 0  # data-parallel over this many devices; 0 = all (of all processes)
  # How convolutions and pools are computed (README, "Op implementations"): 'auto' (= 'cpu'
  # on a CPU backend, 'xla' elsewhere), 'xla' (XLA's own ops) or 'cpu' (shifted slices and
  # matrix products, several times faster under XLA:CPU). Same variables, same function.
  config.op_impl = 'auto'

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 50  # also at every epoch's end; 0 = only there
  config.checkpoint.max_to_keep = 3  # newest search checkpoints kept in workdir

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'cifar10'
  config.data.source = 'files'  # 'files' (official files), 'tfds' or 'subset' (shipped)
  config.data.dir = ''  # '' means $PCP_JAX_DATA or ~/.cache/pcp_jax/data
  config.data.download = False
  config.data.pad_to_32 = False
  config.data.train_portion = 0.5  # first half trains the weights, second the architecture
  config.data.max_train = 0  # keep the first N training images before the split; 0 keeps all
  config.data.max_test = 0

  s = config.search = ml_collections.ConfigDict()
  s.channels = 16
  s.partial_k = 4  # 1 = plain DARTS edges
  s.channel_mode = 'random'  # 'random' (sampled per step) or 'shuffle' (reference code)
  s.use_betas = True  # PC-DARTS edge normalisation
  s.initial_ops = PRIMITIVES  # ops on every edge in the first stage
  # P-DARTS stages: 5/11/17 cells, 8 -> 5 -> 3 ops; after the last stage the genotype takes
  # the strongest op per edge. Skip dropout 0.1/0.4/0.7 is the P-DARTS CIFAR-10 code
  # (its paper: 0.0/0.4/0.7). The paper freezes the architecture for 15 epochs here.
  s.stages = [stage(5, 5, 25, 15, 0.1), stage(11, 3, 25, 15, 0.4), stage(17, 1, 25, 15, 0.7)]
  s.max_skip_normal = 2  # P-DARTS limit on skip-connects in the final normal cell; -1: none
  s.batch_size = 256  # the paper (lr 0.025); P-DARTS 96

  s.eval_batch_size = 250
  # Weights: SGD, momentum, coupled weight decay, per-epoch cosine LR, clipped gradients.
  s.lr = 0.025
  s.lr_min = 0.0
  s.momentum = 0.9
  s.weight_decay = 3e-4
  s.grad_clip = 5.0
  # Architecture: Adam(6e-4, 0.5, 0.999), coupled weight decay 1e-3, clip (P-DARTS: 5).
  s.arch_lr = 6e-4
  s.arch_b1 = 0.5
  s.arch_b2 = 0.999
  s.arch_weight_decay = 1e-3
  s.arch_grad_clip = 5.0  # 0 disables (PC-DARTS)
  # Self-supervision: architecture loss = ss_factor * BT + (1 - ss_factor) * CE.
  s.ss_factor = 0.0
  # The CE batch and both BT views go through one channel sample per architecture step (the
  # paper's "two identical networks"); False draws one per forward (earlier releases).
  s.shared_channels = True
  # BT's scale in the mix: 'none' (the paper: ssf * BT + (1 - ssf) * CE); 'dim' (BT / D);
  # 'balance' (the BT gradient rescaled to the CE gradient's norm every step). At D = 512
  # BT's gradient is orders of magnitude larger than CE's, so under 'none' any ssf in (0, 1)
  # updates the architecture almost purely by BT (README, "Self-supervision").
  s.bt_scale = 'none'
  # The two BT views: 'asymmetric' (the Barlow Twins recipe: blur and solarisation differ per
  # view, plus a perspective distortion and erasing) or 'symmetric' (earlier releases).
  s.bt_views = 'asymmetric'
  # Train the projector on BT during the warm-up (architecture frozen), so that the first
  # architecture steps of a stage do not pass through a random projector. Not in the paper.
  s.projector_warmup = False
  # Projector on the 16C = 256 pooled features; D = 512 instead of BT's 8192, so lambda is
  # scaled by 8192 / D to keep the off-diagonal term's weight. Trained by the BT loss in
  # the architecture step with its own Adam (same settings as the architecture's).
  s.projector_sizes = (512, 512, 512)
  s.bt_lambda = 0.0051 * 8192 / 512
  s.projector_lr = 6e-4
  return config


def apply_args(config, arg=None):
  """Applies the comma-separated config arguments (see the module docstring); `tiny` last,
  so that it shrinks whatever the others chose."""
  items = [a.strip() for a in (arg or '').split(',') if a.strip()]
  for item in sorted(items, key=lambda a: a == 'tiny'):
    name, _, value = item.partition('=')
    if name not in ARGS:
      raise ValueError(f'Unknown config argument {item!r}; allowed: ssf=<float>, '
                       'dataset=<name>, warmup=<int>, tiny, cells8.')
    if name == 'dataset':
      if value not in DATASETS:
        raise ValueError(f'Config argument dataset must be one of {list(DATASETS)}, '
                         f'got {value!r}.')
      config.data.dataset = value
      if value != 'cifar10' and config.data.source == 'subset':
        config.data.source = 'files'  # the shipped subset is CIFAR-10's
    elif name == 'warmup':
      try:
        warmup = int(value)
      except ValueError:
        raise ValueError(f'Config argument warmup must be a whole number of epochs, '
                         f'got {value!r}.')
      for st in config.search.stages:
        if not 0 <= warmup <= st.epochs:
          raise ValueError(f'Config argument warmup must be in 0..{st.epochs} (the stage '
                           f'epochs), got {warmup}.')
        st.warmup_epochs = warmup
    elif name == 'ssf':
      try:
        ssf = float(value)
      except ValueError:
        raise ValueError(f'Config argument ssf must be a number in [0, 1], got {value!r}.')
      if not 0.0 <= ssf <= 1.0:
        raise ValueError(f'Config argument ssf must be in [0, 1], got {ssf}.')
      config.search.ss_factor = ssf
    elif name == 'cells8':
      for s in config.search.stages:
        s.layers = 8
    elif name == 'tiny':
      shrink(config)
  return config


def shrink(config):
  """The `tiny` variant: the same code path at the smallest size that exercises it."""
  if config.data.dataset == 'cifar10':
    config.data.source = 'subset'  # shipped with the package
  config.data.max_train = 128
  s = config.search
  s.channels = 8
  s.batch_size = 16
  s.eval_batch_size = 64
  s.projector_sizes = (32, 32)
  s.bt_lambda = 0.0051 * 8192 / 32
  s.initial_ops = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect')
  keep = [3, 1] if len(s.stages) > 1 else [1]
  s.stages = [stage(3, k, 2, 1, st.skip_dropout) for k, st in zip(keep, s.stages)]
