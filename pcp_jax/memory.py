"""What a run's steps will need in memory, said before anything is built or compiled, and a
refusal of what cannot fit (`check`, which `main.run` calls).

A step keeps its activations for the backward pass: they grow with the batch, with the
cells' image volumes and, in the supernet, with the candidate ops on each edge's sampled
channels; in a network of few cells, the stem's (3C channels at the image's full size) weigh
as much. It also holds its networks' weights, their gradients, the optimiser's slots and the
update's temporaries: a convolution's weights grow with the square of its channels (the
separable and dilated convolutions' 1x1 parts, the 1x1 preprocessing and FactorizedReduce
convolutions), so in a wide network of few cells they outgrow the activations. The weights
are counted from the config (`search_weights`, `train_weights`: what the networks would
create, without building them, which takes seconds for a paper-size supernet); a search stage
after the first is counted with its edges' heaviest ops, since which ones stay is learnt.
The factors below are fitted to XLA's own buffer sizes of compiled steps on the CPU
(`python -m pcp_jax.bench --compile_only`; docs/performance.md, "Memory estimates"), so the
figure is an estimate, not a measurement of this machine. A config is refused only when its
estimate exceeds the available memory by `REFUSE_FACTOR` (the host, where the fit was made:
above the estimates' largest excess over the buffers they were fitted to) or
`REFUSE_FACTOR_DEVICE` (an accelerator, where it was not), so that an estimate off by that
much never refuses a run that fits; `memory_check=False` skips it.
"""

from typing import Callable, List, NamedTuple, Optional, Tuple

from absl import logging
import jax

from pcp_jax import data
from pcp_jax import genotypes
from pcp_jax import members as members_lib
from pcp_jax import population
from pcp_jax import random_cells
from pcp_jax import spaces

GIB = 2**30
# Floats a search step keeps per image (per view) per unit of a cell's node volume (a node's
# height x width x channels): a fixed part, and a part per candidate op on an edge that
# shrinks a little faster than the partial channels (ops on / partial_k ** PARTIAL_EXPONENT;
# fitted at K = 1 and K = 4).
SEARCH_FIXED = 20
SEARCH_PER_OP = 52
PARTIAL_EXPONENT = 1.24
# And per image per unit of the stem's volume (the image at 3C channels), once whatever the
# views: the part that dominates a network of few cells.
SEARCH_STEM = 11.3
# A training step of the evaluation network (its auxiliary head included) per image: per unit
# of the stem's volume (the image at 3C channels) and of the cells' node volume.
TRAIN_STEM = 67
TRAIN_CELLS = 22
# The collapse meter per image against a one-view search step: its Hessian-vector products
# keep both passes' activations.
CURVATURE_FACTOR = 4.5
# Floats a step holds per weight of its networks besides the weight and its optimiser slots
# (momentum SGD one, Adam two): its gradient and the update's temporaries; a search step
# (an architecture and a weight step, one of them under a condition) holds more.
SEARCH_WEIGHT_COPIES = 2.9
TRAIN_WEIGHT_COPIES = 1.7
# On the host a process holds its runtime, compiled programs and heap beside XLA's buffers
# (peak RSS minus the buffers, the same at batch 64 and 256).
HOST_RUNTIME = int(2.7 * GIB)
REFUSE_FACTOR = 1.1
REFUSE_FACTOR_DEVICE = 2.0


# A genotype whose cells hold the most weights, for a training whose genotype is not known yet.
HEAVIEST_GENOTYPE = genotypes.Genotype(
    normal=(('sep_conv_5x5', 0), ('sep_conv_5x5', 1)) * genotypes.STEPS,
    normal_concat=tuple(range(2, 2 + genotypes.STEPS)),
    reduce=(('sep_conv_5x5', 0), ('sep_conv_5x5', 1)) * genotypes.STEPS,
    reduce_concat=tuple(range(2, 2 + genotypes.STEPS)))


class Need(NamedTuple):
  """An estimate of one step's memory: its short name, what it is (in a refusal) and the
  fields that drive it."""
  name: str
  bytes: int
  what: str
  fields: str


def cell_volumes(layers: int, channels: int, image_size: int) -> int:
  """The summed node volume (height x width x channels) of a network's cells: the reduction
  cells at 1/3 and 2/3 depth halve the image and double the channels."""
  reductions = genotypes.reduction_indices(layers)
  total, size = 0, image_size
  for i in range(layers):
    if i in reductions:
      size, channels = (size + 1) // 2, 2 * channels
    total += size * size * channels
  return total


def op_weights(name: str, channels: int, stride: int, affine: bool) -> int:
  """The weights of one op on `channels` channels (`ops.make_op`): its convolutions' kernels
  and, in the evaluation flavour (`affine`), its batch norms' scales and biases."""
  norm = 2 * channels if affine else 0
  if name.startswith(('sep_conv', 'dil_conv')):  # [depthwise k x k, 1x1, BN], twice for sep
    k = int(name[-1])
    return (2 if name.startswith('sep') else 1) * (k * k * channels + channels**2 + norm)
  if name == 'skip_connect' and stride == 2:  # FactorizedReduce: two 1x1 convs to C/2 each
    return channels**2 + norm
  return 0


def network_weights(layers: int, channels: int, image_channels: int, num_classes: int,
                    edge_weights: Callable[[int, bool], int], outputs: Callable[[bool], int],
                    affine: bool) -> Tuple[int, int]:
  """(weights, the channels of the second reduction cell's output) of a DARTS network: its
  stem (3C channels, an affine BN), `layers` cells and classifier. A cell of C channels has
  two 1x1 preprocessing convolutions to C (a FactorizedReduce's two halves after a
  reduction), `edge_weights(C, reduction)` on its edges, and concatenates `outputs(reduction)`
  nodes; `affine`: its batch norms have weights (the evaluation network's)."""
  stem = 3 * channels
  total = 9 * image_channels * stem + 2 * stem
  reductions = genotypes.reduction_indices(layers)
  c_pp = c_p = stem
  c = channels
  for i in range(layers):
    reduction = i in reductions
    c *= 2 if reduction else 1
    total += (c_pp + c_p) * c + 4 * c * affine + edge_weights(c, reduction)
    c_pp, c_p = c_p, outputs(reduction) * c
    if i == reductions[1]:
      second = c_p
  return total + (c_p + 1) * num_classes, second


def search_weights(config, layers: int, ops: int) -> int:
  """The weights of a search stage's supernet (one member's) when each edge keeps `ops` of
  the ops it starts with: the heaviest ones, since which ones stay is learnt."""
  cfg = config.search
  info = data.DATASETS[config.data.dataset]
  switches = spaces.initial_switches(cfg.space, cfg.initial_ops)

  def edge_weights(c, reduction):
    total = 0
    for e, (source, _) in enumerate(genotypes.EDGES):
      names = [n for n, on in zip(genotypes.OPS, switches['reduce' if reduction
                                                          else 'normal'][e]) if on]
      stride = 2 if reduction and source < 2 else 1
      total += sum(sorted((op_weights(n, c // cfg.partial_k, stride, False) for n in names),
                          reverse=True)[:ops])
    return total

  return network_weights(layers, cfg.channels, info.channels, info.num_classes, edge_weights,
                         lambda _: genotypes.STEPS, False)[0]


def projector_weights(config) -> int:
  """The weights of the Barlow Twins projector (`heads.Projector`) on the last cell's
  4 x 4C features."""
  sizes = [config.search.channels * 16] + list(config.search.projector_sizes)
  return sum(a * b for a, b in zip(sizes, sizes[1:])) + 2 * sum(sizes[1:-1])


def weight_bytes(weights: int, optimizer, copies: float, float_bytes: int = 4) -> int:
  """What a step holds for `weights` trained by `optimizer` (a config's optimiser sub-dict):
  the weights, the optimiser's slots and `copies` more."""
  slots = 2 if optimizer.name == 'adam' else 1
  return int(float_bytes * weights * (1 + slots + copies))


def train_weights(config, genotype: genotypes.Genotype) -> int:
  """The weights of the evaluation network of `train.*` on `genotype` (its auxiliary head
  included)."""
  t = config.train
  info = data.DATASETS[config.data.dataset]
  size, _ = _image(config)

  def edge_weights(c, reduction):
    edges = genotype.reduce if reduction else genotype.normal
    return sum(op_weights(n, c, 2 if reduction and j < 2 else 1, True) for n, j in edges)

  def outputs(reduction):
    return len(genotype.reduce_concat if reduction else genotype.normal_concat)

  total, second = network_weights(t.layers, t.channels, info.channels, info.num_classes,
                                  edge_weights, outputs, True)
  if t.auxiliary:  # 1x1 conv to 128, BN, k x k conv to 768, BN, classifier
    pooled = (((size + 1) // 2 + 1) // 2 - 5) // 3 + 1
    k = min(2, pooled)
    total += (second + 2) * 128 + (k * k * 128 + 2) * 768 + 769 * info.num_classes
  return total


def _image(config) -> Tuple[int, int]:
  """(image size, bytes of one uint8 image) of the config's dataset."""
  info = data.DATASETS[config.data.dataset]
  size = 32 if config.data.pad_to_32 else info.image_size
  return size, size * size * info.channels


def _devices(config) -> Tuple[int, bool]:
  """(the devices a data-parallel step splits its batch over, whether they share the host's
  memory)."""
  return config.num_devices or jax.device_count(), jax.default_backend() == 'cpu'


def _per_memory(batch_bytes: float, data_bytes: float, config) -> int:
  """The bytes one memory holds: a device's share of the batch (the whole batch and a copy
  of the data per device when the devices are the host's)."""
  devices, shared = _devices(config)
  local = min(devices, jax.local_device_count())
  return int(batch_bytes * local / devices + data_bytes * local if shared
             else batch_bytes / devices + data_bytes)


def search_needs(config) -> List[Need]:
  """The search step of each stage, and the collapse meter (`search.curvature_every`). A
  population's step holds every member's weights, and the activations of the members it
  computes at once (`members.together`), over the union of their ops (at most the members'
  kept ops together)."""
  cfg = config.search
  size, image_bytes = _image(config)
  images = config.data.max_train or data.DATASETS[config.data.dataset].train_size
  float_bytes = 8 if cfg.dtype == 'float64' else 4
  members = population.members(config)
  # The CE batch and the two Barlow Twins views.
  views = 3 if max(m.ss_factor for m in members) > 0 else 1
  projector = projector_weights(config) if views > 1 else 0
  projector_bytes = weight_bytes(projector, cfg.optim.projector, SEARCH_WEIGHT_COPIES,
                                 float_bytes)
  stem = float_bytes * SEARCH_STEM * size * size * 3 * cfg.channels
  first = ops = spaces.ops_per_edge(cfg.space, cfg.initial_ops)
  needs, n = [], len(members)
  # Members one after another (a CPU's default) hold one member's activations at a time.
  live = members_lib.together(n, cfg.population.get('members_at_once', 0))
  pop = f'{n} members ({live} at once), ' if n > 1 else ''
  for s, stage in enumerate(cfg.stages):
    per_view = float_bytes * cell_volumes(stage.layers, cfg.channels, size) * (
        SEARCH_FIXED + SEARCH_PER_OP * ops / cfg.partial_k ** PARTIAL_EXPONENT)
    per_image = per_view * views + stem
    weights = search_weights(config, stage.layers, ops)
    held = n * (weight_bytes(weights, cfg.optim.weights, SEARCH_WEIGHT_COPIES, float_bytes)
                + projector_bytes)
    activations = per_image * cfg.batch_size * live
    needs.append(Need(
        f'search stage {s + 1}',
        _per_memory(activations, images * image_bytes + held, config),
        f'search.stages[{s}] ({pop}{stage.layers} cells of {cfg.channels} channels, {ops} ops '
        f'per edge, batch {cfg.batch_size}{f" in {views} views" if views > 1 else ""}): its '
        f'step ({_split(activations, n * (weights + projector), held)})',
        f'search.batch_size, search.channels or search.stages[{s}].layers (or raise '
        f'search.partial_k{", or fewer members" if n > 1 else ""}'
        f'{" or search.population.members_at_once" if live > 1 else ""})'))
    if cfg.curvature_every:
      batch = min(cfg.curvature_batch, int(images * (1 - config.data.train_portion)))
      needs.append(Need(
          f'collapse meter, stage {s + 1}',
          int(CURVATURE_FACTOR * (per_view + stem) * batch + images * image_bytes
              + n * (weight_bytes(weights, cfg.optim.weights, 0, float_bytes) + projector_bytes)),
          f'search.curvature_batch={cfg.curvature_batch}: the collapse meter of stage {s + 1}',
          'search.curvature_batch (or set search.curvature_every=0)'))
    ops = min(first, stage.num_keep * n)
  return needs


def _split(activations: float, weights: int, held: int) -> str:
  return (f'{gib(activations)} of activations, {gib(held)} for {weights / 1e6:.3g} M weights, '
          'their gradients and optimiser')


def train_need(config, genotype: Optional[genotypes.Genotype] = None) -> Need:
  """The training step of the evaluation network (of every seed, `train.seeds`) on
  `genotype` (None: every edge a sep_conv_5x5, the heaviest op, as a genotype to come from
  a search may be)."""
  t = config.train
  size, image_bytes = _image(config)
  images = config.data.max_train or data.DATASETS[config.data.dataset].train_size
  per_image = 4 * (TRAIN_STEM * size * size * 3 * t.channels
                   + TRAIN_CELLS * cell_volumes(t.layers, t.channels, size))
  n = t.get('seeds', 1)  # training over seeds: the seeds' activations at once (members.py)
  live = members_lib.together(n, t.get('seeds_at_once', 0))
  weights = train_weights(config, genotype or HEAVIEST_GENOTYPE)
  held = n * weight_bytes(weights, t.optim, TRAIN_WEIGHT_COPIES)
  activations = per_image * t.batch_size * live
  return Need('train', _per_memory(activations, images * image_bytes + held, config),
              f'train ({f"{n} seeds, " if n > 1 else ""}{t.layers} cells of {t.channels} '
              f'channels, batch {t.batch_size}): its step '
              f'({_split(activations, n * weights, held)})',
              'train.batch_size, train.channels or train.layers'
              + (' (or fewer train.seeds)' if n > 1 else '')
              + (' (or a smaller train.seeds_at_once)' if live > 1 else ''))


def _genotype(config) -> Optional[genotypes.Genotype]:
  """The genotype `config.genotype` names; None where it cannot be read yet (a search's
  folder before the search)."""
  try:
    return random_cells.genotype(config)
  except (OSError, ValueError):
    return None


def _host_available() -> Optional[int]:
  """MemAvailable of /proc/meminfo, or less where a cgroup (a container) limits the process."""
  try:
    with open('/proc/meminfo') as f:
      fields = dict(line.split(':', 1) for line in f)
    available = int(fields['MemAvailable'].split()[0]) * 1024
  except (OSError, KeyError, ValueError):
    return None
  try:
    with open('/sys/fs/cgroup/memory.max') as f:
      limit = f.read().strip()
    with open('/sys/fs/cgroup/memory.current') as f:
      used = int(f.read())
    if limit.isdigit():
      available = min(available, int(limit) - used)
  except (OSError, ValueError):
    pass
  return available


def available_bytes() -> Tuple[Optional[int], str]:
  """(bytes free for a step, where: 'host memory' or the accelerator's kind): an
  accelerator's free memory, else the host's; None when neither is known."""
  device = jax.local_devices()[0]
  stats = (device.memory_stats() or {}) if device.platform != 'cpu' else {}
  if 'bytes_limit' in stats:
    return stats['bytes_limit'] - stats.get('bytes_in_use', 0), f'{device.device_kind} memory'
  return _host_available(), 'host memory'


def gib(n: float) -> str:
  return f'{n / GIB:.3g} GiB' if n < 1024 * GIB else f'{n / GIB / 1024:.3g} TiB'


def check(config, modes) -> List[Need]:
  """Logs what the steps of `modes` (search, train) will need against the memory available,
  and refuses (ValueError naming the fields that drive it) a step estimated to need more than
  `REFUSE_FACTOR` (host) or `REFUSE_FACTOR_DEVICE` times that; does nothing with
  `memory_check=False`. Returns the estimates (on the host, the process's runtime added)."""
  if not config.get('memory_check', True):
    return []
  needs = (search_needs(config) if 'search' in modes else []) + (
      [train_need(config, _genotype(config))] if 'train' in modes else [])
  if not needs:
    return needs
  available, where = available_bytes()
  host = where == 'host memory'
  needs = [n._replace(bytes=n.bytes + HOST_RUNTIME * host) for n in needs]
  factor = REFUSE_FACTOR if host else REFUSE_FACTOR_DEVICE
  for need in needs:
    if available and need.bytes > factor * available:
      raise ValueError(
          f'{need.what} needs about {gib(need.bytes)}, more than {factor:g}x the '
          f'{gib(available)} of {where} available: lower {need.fields}, or set '
          '--config.memory_check=False to try anyway.')
  largest = max(needs, key=lambda n: n.bytes)
  if available and largest.bytes > available:
    logging.warning('%s may not fit in memory: it needs about %s, and %s of %s is available '
                    '(an estimate: docs/performance.md).', largest.what, gib(largest.bytes),
                    gib(available), where)
  logging.info('Memory the steps will need (an estimate): %s; %s of %s available.',
               ', '.join(f'{n.name} {gib(n.bytes)}' for n in needs),
               gib(available) if available else 'unknown', where)
  return needs
