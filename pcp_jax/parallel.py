"""Data parallelism over a 1-D device mesh, and which process writes files.

The search and train steps take the *global* batch (replicated on every device), augment it,
keep their device's slice (`local_part`) and average gradients, metrics, BN statistics and the
Barlow Twins cross-correlation over the named axis `AXIS` with `lax.pmean`. `data_parallel` runs
such a step under `jax.shard_map` with every input and output replicated, over all the devices
of all processes (multi-host included); the same step runs unchanged under `jax.pmap(...,
axis_name=AXIS)` on stacked replicas (checked once by hand). Every device ends each step with
the same weights and architecture weights. With one device none of this is used: the step runs
under plain `jax.jit` with no collectives.

Augmenting the global batch on every device (rather than each device its slice) costs little
next to the supernet and makes the images, crops and flips independent of the device count;
partial-channel sampling uses the same key on every device, as one large-batch step would.
Only what is drawn per image inside the network (skip-connect dropout, drop-path) uses a
per-device key.
"""

import collections
import functools
import json
from typing import Any, Callable

import jax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np

from pcp_jax.cpu import host

AXIS = 'batch'


def make_mesh(num_devices: int = 0, option: str = 'num_devices') -> Mesh:
  """A 1-D mesh over the first `num_devices` devices of all processes (0: all of them)."""
  available = jax.devices()
  n = num_devices or len(available)
  if not 1 <= n <= len(available):
    raise ValueError(f'{option} must be 0 (all devices) or 1..{len(available)} '
                     f'(the devices JAX sees), got {num_devices}.')
  return Mesh(np.asarray(available[:n]), (AXIS,))


def check_batch(batch_size: int, num_devices: int, option: str) -> None:
  if batch_size % num_devices:
    raise ValueError(f'{option} ({batch_size}) must be divisible by the number of devices '
                     f'({num_devices}); change it or set num_devices.')


def axis_name(num_devices: int):
  """The axis name batch norms and losses reduce over; None on one device."""
  return AXIS if num_devices > 1 else None


def local_part(x, num_devices: int):
  """This device's contiguous slice of a global batch (inside a data-parallel step)."""
  if num_devices == 1:
    return x
  size = x.shape[0] // num_devices
  return lax.dynamic_slice_in_dim(x, lax.axis_index(AXIS) * size, size)


def mean(tree, num_devices: int):
  """The average over devices of per-device values (gradients, metrics)."""
  return tree if num_devices == 1 else lax.pmean(tree, AXIS)


def device_key(key, num_devices: int):
  """A key of this device's own, for randomness drawn per image inside the network."""
  return key if num_devices == 1 else jax.random.fold_in(key, lax.axis_index(AXIS))


def data_parallel(fn: Callable, mesh: Mesh) -> Callable:
  """`fn` run on every device of `mesh`, all inputs and outputs replicated (jit it outside)."""
  if mesh.size == 1:
    return fn
  # check_vma=False: pmap's semantics, gradients are per device until `mean` averages them.
  return jax.shard_map(fn, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places `tree` on every device of `mesh` (every process must pass the same values)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_members(tree: Any, mesh: Mesh) -> Any:
  """Places a population's `tree` with its leading member axis split across `mesh`'s devices
  (scalars on every device; every process must pass the same values)."""
  return jax.tree_util.tree_map(
      lambda a: jax.device_put(a, NamedSharding(mesh, P(AXIS) if np.ndim(a) else P())), tree)


# For programs run once (initialisation): XLA's optimisations would cost far more compile time
# than they save.
_ONE_OFF_COMPILER_OPTIONS = {'xla_backend_optimization_level': 0,
                             'xla_llvm_disable_expensive_passes': True}


def compile_once(fn: Callable, *args):
  """`fn` jit-compiled for `args` without optimisations, for programs run once or a few
  times (initialisation): much faster than running a large network's init op by op, and
  cached by the persistent compilation cache."""
  return jax.jit(fn).lower(*args).compile(_ONE_OFF_COMPILER_OPTIONS)


def run_once(fn: Callable, *args):
  """`fn(*args)` through `compile_once`."""
  out = compile_once(fn, *args)(*args)
  host.trim_heap()
  return out


def compile_lowered(lowered):
  """Compiles a `jit(...).lower(...)` result as the loops' steps are compiled: on a CPU with
  the CPU wing's compiler options; then the compiler's freed heap (host memory on any
  backend) goes back to the system (`cpu.host.trim_heap`)."""
  cpu = jax.default_backend() == 'cpu'
  compiled = lowered.compile(dict(host.COMPILER_OPTIONS) if cpu else None)
  host.trim_heap()
  return compiled


def compile_ahead(jitted: Callable, *args):
  """`jitted` (a `jax.jit` function) compiled for `args` by `compile_lowered` before anything
  runs it. The result takes arguments of exactly these shapes, types and shardings."""
  return compile_lowered(jitted.lower(*args))


class CompiledOnFirstCall:
  """Calls the `jax.jit` function `jitted` through `compile_ahead(jitted, *first_call_args)`:
  for a loop's step, whose every call has the same argument shapes. `lower` is `jitted`'s."""

  def __init__(self, jitted: Callable):
    self.jitted = jitted
    self.lower = jitted.lower
    self._compiled = None

  @property
  def compiled(self) -> bool:
    """Whether the first call (and so the compile) has happened."""
    return self._compiled is not None

  def __call__(self, *args):
    if self._compiled is None:
      self._compiled = compile_ahead(self.jitted, *args)
    return self._compiled(*args)


def is_main_process() -> bool:
  """True on the process that writes logs, metrics, genotypes and figures."""
  return jax.process_index() == 0


# ---------------------------------------------------------------------------
# Builds reused within a process.

REUSED_BUILDS = 8  # the latest builds kept (`reused`)
_builds = collections.OrderedDict()


def _build_key(value):
  """A hashable form of a builder's argument: a config without the fields that never reach a
  program (the seed reaches them as data, in their keys; checkpoints and modes are the
  driver's), arrays by content, containers by their items."""
  if isinstance(value, ml_collections.ConfigDict):
    fields = json.loads(value.to_json_best_effort())
    for name in ('seed', 'checkpoint', 'modes'):
      fields.pop(name, None)
    return json.dumps(fields, sort_keys=True)
  if isinstance(value, np.ndarray):
    return value.shape, value.dtype.str, value.tobytes()
  if isinstance(value, dict):
    return tuple(sorted((k, _build_key(v)) for k, v in value.items()))
  if isinstance(value, list) or type(value) is tuple:  # pylint: disable=unidiomatic-typecheck
    return tuple(_build_key(v) for v in value)
  return value


def reused(build: Callable) -> Callable:
  """`build` (of a stage's model, step and compiled functions) gives what it built for the same
  arguments before in this process, compiled programs included: a sweep, a rerun in a notebook
  or the tests run a stage again (another seed, the same shapes) without tracing and compiling
  it again. Arguments that do not hash build afresh."""

  @functools.wraps(build)
  def wrapper(*args, **kwargs):
    key = (build.__qualname__, _build_key(args), _build_key(kwargs))
    try:
      hash(key)
    except TypeError:
      return build(*args, **kwargs)
    if key not in _builds:
      _builds[key] = build(*args, **kwargs)
      while len(_builds) > REUSED_BUILDS:
        _builds.popitem(last=False)
    _builds.move_to_end(key)
    return _builds[key]

  return wrapper


def forget_builds() -> None:
  """Drops the builds `reused` keeps (a test that changes how stages are built)."""
  _builds.clear()
