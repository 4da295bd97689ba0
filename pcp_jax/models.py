"""Where models are built: the kernel set is chosen once here (`config.op_impl`) and bound
into the network, which hands its convolution, batch norm and pools down to every layer."""

import jax
import jax.numpy as jnp

from pcp_jax import genotypes
from pcp_jax import heads
from pcp_jax import kernels as kernels_lib
from pcp_jax import networks
from pcp_jax import parallel
from pcp_jax import supernet
from pcp_jax.cpu import kernels as cpu_kernels


def select_kernels(op_impl: str) -> kernels_lib.Kernels:
  """The kernel set `config.op_impl` names: 'xla', 'cpu', or 'auto' (the CPU wing's on a
  CPU backend, else XLA's)."""
  if op_impl not in kernels_lib.OP_IMPLS:
    raise ValueError(
        f'op_impl must be one of {kernels_lib.OP_IMPLS}, got {op_impl!r} (config.op_impl).')
  if op_impl == 'xla' or (op_impl == 'auto' and jax.default_backend() != 'cpu'):
    return kernels_lib.XLA
  return cpu_kernels.KERNELS


def _config_kernels(config) -> kernels_lib.Kernels:
  return select_kernels(config.get('op_impl', 'auto'))


def search_network(config, layers: int, switches, num_classes: int, num_devices: int = 1,
                   dtype=jnp.float32, members: bool = False) -> supernet.SearchNetwork:
  """A search stage's supernet over the ops `switches` ({'normal', 'reduce'}: (14, NUM_OPS)
  booleans) leaves on; with `num_devices` > 1 its BN averages over the device axis;
  `members`: a population's (`SearchNetwork.wide_arch`, switches the members' union)."""
  cfg = config.search
  kernels = _config_kernels(config)
  return supernet.SearchNetwork(
      num_classes=num_classes, channels=cfg.channels, layers=layers,
      partial_k=cfg.partial_k, channel_mode=cfg.channel_mode, use_betas=cfg.use_betas,
      switches_normal=genotypes.switches_to_tuple(switches['normal'], not members),
      switches_reduce=genotypes.switches_to_tuple(switches['reduce'], not members),
      wide_arch=members,
      bn_axis_name=parallel.axis_name(num_devices), kernels=kernels, dtype=dtype,
      scan_cells=kernels.loops)


def projector(config, num_devices: int = 1) -> heads.Projector:
  """The Barlow Twins projector of `search.projector_sizes`."""
  return heads.Projector(tuple(config.search.projector_sizes),
                         bn_axis_name=parallel.axis_name(num_devices),
                         kernels=_config_kernels(config))


def eval_network(config, genotype: genotypes.Genotype, num_classes: int,
                 num_devices: int = 1) -> networks.EvalNetwork:
  """The evaluation network of `train.*`; with `num_devices` > 1 its BN averages over the
  device axis."""
  t = config.train
  return networks.EvalNetwork(genotype, num_classes=num_classes, channels=t.channels,
                              layers=t.layers, auxiliary=t.auxiliary,
                              bn_axis_name=parallel.axis_name(num_devices),
                              kernels=_config_kernels(config))
