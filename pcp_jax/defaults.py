"""The shared base of every config (configs/*.py) and the one grammar of config arguments.

A config file builds on `search_config()` or `train_config()` and ends with
`apply_args(config, arg)`. Config arguments follow the file name, comma separated, each
`name` or `name=value` (`--config=configs/ss_pcp.py:ssf=0.5,tiny`):

Search configs:
  ssf=<float>    the self-supervised factor of the architecture loss, in [0, 1];
                 `ssf=0.25:0.5:1.0` a sweep: one member of a population per value.
  seeds=<int>    a population of searches with seeds seed, seed + 1, ... (pcp_jax/population.py),
                 run as one program; with an ssf sweep, every ss_factor with every seed.
  dataset=<name> search on `cifar10` (default) or `cifar100` (the paper's Table III); the
                 classifier follows the dataset.
  warmup=<int>   frozen-architecture (warm-up) epochs of every stage. The paper's text gives 15
                 for "the progressive case" and 10 for the 5/11/17-cell case of its Table I;
                 read literally, `warmup=10` is the 5/11/17-cell reading and `cells8,warmup=15`
                 the 8-cell one. The progressive configs default to 5/11/17 cells with 15 (the
                 labels look swapped: the progressive case is the 5/11/17-cell one).
  cells8         every progressive stage searches an 8-cell network (see `warmup`).
  space=<name>   the search space (pcp_jax/spaces.py): `darts` (default) or RobustDARTS's
                 `s1`..`s4`; stages keep at most the space's ops per edge.
  tiny           a CPU smoke run of a few minutes, nearly all of it XLA compilation (what the
                 tests use): 128 images of the shipped CIFAR-10 subset, 3-cell stages of 8
                 channels, 2 epochs each (1 warm-up), 4 cheap candidate ops (none, max/avg pool,
                 skip) and at most two stages (3 ops kept after the first).
Train configs:
  seeds=<int>    trains with seeds seed, seed + 1, ... as one program (mean and std).
  tiny           a few hundred images, 3 cells of 4 channels, 2 epochs: train, test and FGSM in
                 2-3 minutes on a 2-core CPU, mostly compilation.
  sgd            the DARTS recipe instead of the paper's Adam: SGD lr 0.025, cosine decay to 0
                 over the epochs, momentum 0.9 (weight decay and clip unchanged).
  adam           the paper's recipe (the default): Adam lr 6e-4, betas (0.5, 0.999), constant.
`tiny` is applied last, so that it shrinks whatever the others chose.
"""

import math

import ml_collections

from pcp_jax import data
from pcp_jax import genotypes
from pcp_jax import spaces

SEARCH_DATASETS = ('cifar10', 'cifar100')


def stage(*, layers: int, num_keep: int, epochs: int, warmup_epochs: int,
          skip_dropout: float) -> ml_collections.ConfigDict:
  """One stage of a (progressive) search."""
  return ml_collections.ConfigDict(dict(
      layers=layers,  # cells of this stage's supernet
      num_keep=num_keep,  # candidate ops kept per edge after this stage
      epochs=epochs,
      warmup_epochs=warmup_epochs,  # architecture frozen for these first epochs
      skip_dropout=skip_dropout))  # P-DARTS skip-connect dropout rate of the stage


def optimizer(name: str, lr: float, *, schedule: str = 'constant', lr_min: float = 0.0,
              momentum: float = 0.9, b1: float = 0.9, b2: float = 0.999,
              weight_decay: float = 0.0, grad_clip: float = 0.0) -> ml_collections.ConfigDict:
  """An optimiser sub-dict (pcp_jax/optim.py): gradients clipped to `grad_clip` (global norm;
  0 disables), coupled weight decay (added to the gradient, as PyTorch does), then SGD with
  `momentum` or Adam(`b1`, `b2`); `schedule` 'cosine' decays `lr` to `lr_min` once per epoch."""
  return ml_collections.ConfigDict(dict(
      name=name, lr=lr, schedule=schedule, lr_min=lr_min, momentum=momentum, b1=b1, b2=b2,
      weight_decay=weight_decay, grad_clip=grad_clip))


def _base() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0  # drives everything: initialisation, data order, channel samples, augmentation
  config.modes = ''  # comma list run in order by pcp_jax.main
  config.num_devices = 0  # data-parallel over this many devices; 0 = all (of all processes)
  # The kernel set (docs/internals.md, "Op implementations"): 'auto' ('cpu' on a CPU backend,
  # else 'xla'), 'xla' or 'cpu' (pcp_jax/cpu: faster under XLA:CPU); the same function.
  config.op_impl = 'auto'
  # Refuse a step estimated to need clearly more memory than available (pcp_jax/memory.py).
  config.memory_check = True

  config.checkpoint = ml_collections.ConfigDict()
  config.checkpoint.every_steps = 50  # also at every epoch's end; 0 = only there
  config.checkpoint.max_to_keep = 3  # newest checkpoints kept (at least 1)

  config.data = ml_collections.ConfigDict()
  config.data.dataset = 'cifar10'
  config.data.source = 'files'  # 'files' (official files), 'tfds' or 'subset' (shipped)
  config.data.dir = ''  # '' means $PCP_JAX_DATA or ~/.cache/pcp_jax/data
  config.data.download = False
  config.data.pad_to_32 = False
  config.data.train_portion = 0.5  # search: the first part trains the weights, the rest arch
  config.data.max_train = 0  # keep the first N training images; 0 keeps all
  config.data.max_test = 0  # keep the first N test images; 0 keeps all
  return config


def _diagnostics() -> ml_collections.ConfigDict:
  """The search's collapse-diagnostics fields."""
  d = ml_collections.ConfigDict()
  # Collapse diagnostics (pcp_jax/collapse.py; not in the paper). Every curvature_every
  # epochs of a stage (and after its last; 0: never, RobustDARTS: 2) the largest eigenvalue
  # of the validation CE's Hessian in the architecture parameters, by curvature_steps
  # Lanczos products on the first curvature_batch validation images (RobustDARTS: 64).
  d.curvature_every = 0
  d.curvature_batch = 64
  d.curvature_steps = 20
  # Stopping rules: 'none'; 'darts_es' (RobustDARTS's DARTS-ES on the curvature, with their
  # defaults below; needs curvature_every); 'skip_count' (DARTS+: the normal cell has
  # early_stop_skips skip connections, after the warm-up). When a rule fires the search keeps
  # the genotype of the epoch the rule names and stops ('stop') or only logs it ('warn').
  d.early_stop = 'none'
  d.early_stop_action = 'stop'
  d.early_stop_skips = 2
  d.darts_es = ml_collections.ConfigDict(dict(window=5, delta=4, factor=1.3, start_epoch=10))
  return d


def search_config() -> ml_collections.ConfigDict:
  """The progressive partial-channel search (PCP-DARTS) on CIFAR-10."""
  config = _base()
  config.modes = 'search'
  config.method = 'PCP-DARTS'  # name in summaries and tables

  s = config.search = ml_collections.ConfigDict()
  s.channels = 16
  s.partial_k = 4  # 1 = plain DARTS edges
  s.channel_mode = 'random'  # 'random' (sampled per step) or 'shuffle' (reference code)
  s.use_betas = True  # PC-DARTS edge normalisation
  # The search space (pcp_jax/spaces.py): 'darts' puts initial_ops on every edge of both
  # cells; RobustDARTS's 's1'..'s4' set each edge's ops themselves (initial_ops unused).
  s.space = 'darts'
  s.initial_ops = genotypes.PRIMITIVES  # ops on every edge in the first stage ('darts')
  # P-DARTS stages: 5/11/17 cells, 8 -> 5 -> 3 ops; after the last stage the genotype takes
  # the strongest op per edge. Skip dropout 0.1/0.4/0.7 is the P-DARTS CIFAR-10 code
  # (its paper: 0.0/0.4/0.7). The paper freezes the architecture for 15 epochs here.
  s.stages = [stage(layers=5, num_keep=5, epochs=25, warmup_epochs=15, skip_dropout=0.1),
              stage(layers=11, num_keep=3, epochs=25, warmup_epochs=15, skip_dropout=0.4),
              stage(layers=17, num_keep=1, epochs=25, warmup_epochs=15, skip_dropout=0.7)]
  s.max_skip_normal = 2  # P-DARTS limit on skip-connects in the final normal cell; -1: none
  s.batch_size = 256  # the paper (lr 0.025); P-DARTS 96
  s.eval_batch_size = 250
  s.log_every_steps = 50  # progress lines (and chunk ends of the on-device loop); 0: none
  s.optim = ml_collections.ConfigDict()
  # Weights: SGD, momentum, coupled weight decay, per-epoch cosine LR, clipped gradients.
  s.optim.weights = optimizer('sgd', 0.025, schedule='cosine', momentum=0.9,
                              weight_decay=3e-4, grad_clip=5.0)
  # Architecture: Adam(6e-4, 0.5, 0.999), coupled weight decay 1e-3, clip (P-DARTS: 5;
  # PC-DARTS: none).
  s.optim.arch = optimizer('adam', 6e-4, b1=0.5, b2=0.999, weight_decay=1e-3, grad_clip=5.0)
  # The Barlow Twins projector, trained by the BT loss in the architecture step: the
  # architecture's settings.
  s.optim.projector = optimizer('adam', 6e-4, b1=0.5, b2=0.999, weight_decay=1e-3,
                                grad_clip=5.0)
  # Self-supervision: architecture loss = ss_factor * BT + (1 - ss_factor) * CE.
  s.ss_factor = 0.0
  # The step's augmentation (the paper's): random crop and flip of the CE batches (weight
  # step and the architecture step's CE batch), and the two BT views' augmentation. False
  # feeds the images as they are (normalised only), for pre-augmented data and for runs
  # compared step by step.
  s.augment = True
  s.bt_augment = True
  # The supernet's and its state's float type: 'float32' (the paper) or 'float64' (reference
  # runs and decisive comparisons; needs JAX_ENABLE_X64=1).
  s.dtype = 'float32'
  # The CE batch and both BT views go through one channel sample per architecture step (the
  # paper's "two identical networks"); False draws one per forward, so BT also punishes
  # sensitivity to the channel sample.
  s.shared_channels = True
  # BT's scale in the mix: 'none' (the paper: ssf * BT + (1 - ssf) * CE); 'dim' (BT / D);
  # 'balance' (the BT gradient rescaled to the CE gradient's norm every step). At D = 512
  # BT's gradient is orders of magnitude larger than CE's, so under 'none' any ssf in (0, 1)
  # updates the architecture almost purely by BT (docs/self_supervision.md).
  s.bt_scale = 'none'
  # The two BT views: 'asymmetric' (the Barlow Twins recipe: blur and solarisation differ per
  # view, plus a perspective distortion and erasing) or 'symmetric' (identically
  # distributed views without blur, solarisation or distortion).
  s.bt_views = 'asymmetric'
  # Train the projector on BT during the warm-up (architecture frozen), so that the first
  # architecture steps of a stage do not pass through a random projector. Not in the paper.
  s.projector_warmup = False
  # Projector on the 16C = 256 pooled features; D = 512 instead of BT's 8192, so lambda is
  # scaled by 8192 / D to keep the off-diagonal term's weight.
  s.projector_sizes = (512, 512, 512)
  s.bt_lambda = 0.0051 * 8192 / 512
  s.update(_diagnostics())
  # A population of searches in one program (pcp_jax/population.py): `seeds` seeds (seed,
  # seed + 1, ...) times the ss_factors of the sweep (empty: ss_factor alone); not in the
  # paper, which reports single searches; 1 and () run one search. `devices`: 'members' (split
  # across the devices), 'data' (each member data-parallel) or 'auto' (members if they divide).
  # `members_at_once`: how many members a step computes together: k, or 0 for all of them on an
  # accelerator and one after another on a CPU (pcp_jax/members.py).
  s.population = ml_collections.ConfigDict(dict(seeds=1, ss_factors=(), devices='auto',
                                                members_at_once=0))
  return config


def train_config() -> ml_collections.ConfigDict:
  """The paper's evaluation recipe on CIFAR-10: 20 cells, C=36, Adam, 600 epochs."""
  config = _base()
  config.modes = 'train,test,fgsm'
  config.checkpoint.every_steps = 500
  config.checkpoint.max_to_keep = 2
  # A reference name (genotypes.REFERENCE_GENOTYPES), a genotype.json, a search workdir, a
  # pasted Genotype(...) or random:I, the I-th random cell of the space (pcp_jax/random_cells.py).
  config.genotype = 'PC_DARTS_cifar'
  # A PyTorch NetworkCIFAR checkpoint (.pt: DARTS, PC-DARTS, P-DARTS) of that genotype, which
  # the test and fgsm modes evaluate instead of the workdir's best checkpoint; '' for none.
  config.weights = ''

  t = config.train = ml_collections.ConfigDict()
  t.method = ''  # name in the results table; '' derives it from config.genotype
  t.channels = 36
  t.layers = 20
  t.auxiliary = True
  t.auxiliary_weight = 0.4
  t.drop_path_prob = 0.3  # ramped linearly from 0 over the epochs
  t.cutout = True
  t.cutout_length = 16
  t.epochs = 600
  t.batch_size = 96
  t.eval_batch_size = 500
  # The paper: Adam(6e-4, 0.5, 0.999), constant; the `sgd` argument gives DARTS's recipe.
  t.optim = optimizer('adam', 6e-4, b1=0.5, b2=0.999, momentum=0.9, weight_decay=3e-4,
                      grad_clip=5.0)
  # 'test' validates on the test set (as DARTS's train.py does) for the best-checkpoint rule;
  # a fraction such as '0.1' holds out the end of the training set instead.
  t.val_split = 'test'
  t.log_every_steps = 50  # progress lines (and chunk ends of the on-device loop); 0: none
  t.seeds = 1  # trainings with seeds seed, seed + 1, ... as one program (train_seeds.py)
  t.seeds_at_once = 0  # how many seeds a step computes together (pcp_jax/members.py; 0: auto)

  config.fgsm = ml_collections.ConfigDict()
  config.fgsm.eps = (0.0, 1 / 255, 2 / 255, 4 / 255, 8 / 255, 16 / 255)
  config.fgsm.num_examples = 1000  # the first N test images
  config.fgsm.example_indices = (0, 1, 2, 3)  # per-example curves (the paper's Fig. 13)
  config.fgsm.batch_size = 250
  return config


# ---------------------------------------------------------------------------
# Config arguments.


def _number(name, value, kind, allowed):
  try:
    return kind(value)
  except ValueError:
    raise ValueError(f'Config argument {name} must be {allowed}, got {value!r}.') from None


def _ssf(config, value):
  # Ranges are checked with the other fields (search.check_config, population.check_config).
  if ':' not in value:
    config.search.ss_factor = _number('ssf', value, float, 'a number in [0, 1]')
    return
  config.search.population.ss_factors = tuple(
      _number('ssf', v, float, 'numbers in [0, 1] separated by colons (a sweep)')
      for v in value.split(':'))


def _seeds(config, value):
  seeds = _number('seeds', value, int, 'a whole number >= 1')
  (config.search.population if 'search' in config else config.train).seeds = seeds


def _dataset(config, value):
  if value not in SEARCH_DATASETS:
    raise ValueError(f'Config argument dataset must be one of {list(SEARCH_DATASETS)}, '
                     f'got {value!r}.')
  config.data.dataset = value
  if value != 'cifar10' and config.data.source == 'subset':
    config.data.source = 'files'  # the shipped subset is CIFAR-10's


def _warmup(config, value):
  warmup = _number('warmup', value, int, 'a whole number of epochs')
  for st in config.search.stages:
    if not 0 <= warmup <= st.epochs:
      raise ValueError(f'Config argument warmup must be in 0..{st.epochs} (the stage '
                       f'epochs), got {warmup}.')
    st.warmup_epochs = warmup


def _space(config, value):
  if value not in spaces.NAMES:
    raise ValueError(f'Config argument space must be one of {list(spaces.NAMES)}, '
                     f'got {value!r}.')
  config.search.space = value
  ops = spaces.ops_per_edge(value, config.search.initial_ops)
  for st in config.search.stages:
    st.num_keep = min(st.num_keep, ops)


def _cells8(config, _):
  for st in config.search.stages:
    st.layers = 8


def _tiny_search(config, _):
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
  ops = spaces.ops_per_edge(s.space, s.initial_ops)
  keep = [min(3, ops), 1] if len(s.stages) > 1 else [1]
  s.stages = [stage(layers=3, num_keep=k, epochs=2, warmup_epochs=1,
                    skip_dropout=st.skip_dropout) for k, st in zip(keep, s.stages)]


def _tiny_train(config, _):
  t = config.train
  t.channels, t.layers, t.epochs = 4, 3, 2
  t.batch_size, t.eval_batch_size, t.log_every_steps = 16, 64, 8
  if config.data.dataset == 'cifar10':
    config.data.source = 'subset'  # shipped with the package: no download needed
  config.data.max_train, config.data.max_test = 256, 128
  config.fgsm.num_examples = config.fgsm.batch_size = 32


def _sgd(config, _):
  config.train.optim.update(name='sgd', lr=0.025, schedule='cosine', lr_min=0.0, momentum=0.9)


def _adam(config, _):
  config.train.optim.update(name='adam', lr=6e-4, schedule='constant', b1=0.5, b2=0.999)


# name -> (takes a value, what it applies to: 'search' or 'train', function)
ARGS = {
    'ssf': (True, 'search', _ssf),
    'seeds': (True, None, _seeds),
    'dataset': (True, 'search', _dataset),
    'warmup': (True, 'search', _warmup),
    'cells8': (False, 'search', _cells8),
    'space': (True, 'search', _space),
    'tiny': (False, None, None),
    'sgd': (False, 'train', _sgd), 'adam': (False, 'train', _adam),
}


def apply_args(config: ml_collections.ConfigDict, arg=None) -> ml_collections.ConfigDict:
  """Applies the comma-separated config arguments (module docstring); `tiny` last."""
  kind = 'search' if 'search' in config else 'train'
  allowed = sorted(n for n, (_, k, _) in ARGS.items() if k in (kind, None))
  items = [a.strip() for a in (arg or '').split(',') if a.strip()]
  for item in sorted(items, key=lambda a: a == 'tiny'):
    name, has_value, value = item.partition('=')
    if name not in allowed:
      raise ValueError(f'Unknown config argument {name!r} for a {kind} config; allowed: '
                       f'{", ".join(allowed)}.')
    takes_value, _, apply = ARGS[name]
    if bool(has_value) != takes_value:
      form = f'{name}=<value>' if takes_value else name
      raise ValueError(f'Config argument {name} is written {form}, got {item!r}.')
    if name == 'tiny':
      apply = _tiny_search if kind == 'search' else _tiny_train
    apply(config, value)
  return config


# ---------------------------------------------------------------------------
# Checks of the shared fields (the search and train modes check their own sections).


def _get(config, name):
  for part in name.split('.'):
    config = config[part]
  return config


def _whole(config, name, minimum):
  value = _get(config, name)
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ValueError(f'{name} must be a whole number >= {minimum}, got {value!r}.')


def check_fields(config, *, whole=(), booleans=(), at_least_zero=()) -> None:
  """Checks `whole` ((name, minimum) pairs: whole numbers), `booleans` and `at_least_zero`
  (finite numbers >= 0) by their dotted names, naming the first bad one."""
  for name, minimum in whole:
    _whole(config, name, minimum)
  for name in booleans:
    if not isinstance(_get(config, name), bool):
      raise ValueError(f'{name} must be True or False, got {_get(config, name)!r}.')
  for name in at_least_zero:
    value = _get(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value >= 0):
      raise ValueError(f'{name} must be a finite number >= 0, got {value!r}.')


def check_base(config) -> None:
  """Validates the fields every config shares, naming the field, the value and what is
  allowed (before any data is loaded or anything compiled)."""
  check_fields(config, whole=(('seed', 0), ('num_devices', 0), ('checkpoint.every_steps', 0),
                              ('checkpoint.max_to_keep', 1), ('data.max_train', 0),
                              ('data.max_test', 0)))
  d = config.data
  if d.dataset not in data.DATASETS:
    raise ValueError(f'data.dataset must be one of {sorted(data.DATASETS)}, got {d.dataset!r}.')
  if d.source not in data.SOURCES:
    raise ValueError(f'data.source must be one of {list(data.SOURCES)}, got {d.source!r}.')
  if not 0 < d.train_portion < 1:
    raise ValueError(f'data.train_portion must be in (0, 1), got {d.train_portion!r}.')
  check_fields(config, booleans=('data.download', 'data.pad_to_32') + (
      ('memory_check',) if 'memory_check' in config else ()))
