"""Shared defaults and config arguments of the search configs (pc_darts, p_darts, pcp, ss_pcp).

Config arguments, comma separated after the file name (`--config=configs/ss_pcp.py:ssf=0.5,tiny`):
  ssf=<float>  the self-supervised factor of the architecture loss, in [0, 1].
  tiny         shrink the search to a CPU smoke run of a few minutes, nearly all of it XLA
               compilation (what the tests use):
               the shipped CIFAR-10 subset (128 images), 3-cell stages of 8 channels, 2 epochs
               each (1 warm-up), 4 cheap candidate ops (none, max/avg pool, skip) and at
               most two stages (3 ops kept after the first). A smoke test of the code path:
               convolutions in mixed ops multiply the compile time.
  cells8       every progressive stage searches an 8-cell network (the paper's Table I variant).
"""

import ml_collections

PRIMITIVES = ('none', 'max_pool_3x3', 'avg_pool_3x3', 'skip_connect', 'sep_conv_3x3',
              'sep_conv_5x5', 'dil_conv_3x3', 'dil_conv_5x5')
ARGS = ('ssf', 'tiny', 'cells8')


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
  s.batch_size = 96
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
  # Projector on the 16C = 256 pooled features; D = 512 instead of BT's 8192, so lambda is
  # scaled by 8192 / D to keep the off-diagonal term's weight. Trained by the BT loss in
  # the architecture step with its own Adam (same settings as the architecture's).
  s.projector_sizes = (512, 512, 512)
  s.bt_lambda = 0.0051 * 8192 / 512
  s.projector_lr = 6e-4
  return config


def apply_args(config, arg=None):
  """Applies the comma-separated config arguments (see the module docstring)."""
  for item in [a.strip() for a in (arg or '').split(',') if a.strip()]:
    name, _, value = item.partition('=')
    if name not in ARGS:
      raise ValueError(f'Unknown config argument {item!r}; allowed: ssf=<float>, tiny, cells8.')
    if name == 'ssf':
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
  config.data.source = 'subset'
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
