"""A population member's state in the union supernet's layout, and back; the members'
agreement.

A population's stage runs one supernet over the union of its members' ops on each edge
(`supernet.SearchNetwork.wide_arch`). A member enters it from its solo supernet (`embed`): each
mixed op's variables hold one block of channels per edge that has the op, along their last
axis, so a member's blocks are copied to the union's positions and the blocks of edges it does
not have stay zero (weight 0 in the mixture, and gradient 0, so they stay zero); its alphas get a
column per op of `genotypes.OPS`. `narrow` takes a member's alphas back to its own ops.
"""

from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax import genotypes
from pcp_jax import search_step
from pcp_jax import supernet


def switches(switch_sets) -> dict:
  """The ops on in any member, per cell and edge."""
  return {c: np.logical_or.reduce([s[c] for s in switch_sets]) for c in genotypes.CELLS}


def masks(switch_sets) -> dict:
  """The members' op masks, stacked: {'normal', 'reduce'} (members, 14, NUM_OPS)."""
  return {c: jnp.asarray(np.stack([s[c] for s in switch_sets])) for c in genotypes.CELLS}


def narrow(arch: dict, switches: dict) -> dict:
  """A member's architecture weights over its own ops (the solo layout) from the wide one."""
  out = dict(arch)
  for c in genotypes.CELLS:
    on = np.asarray(switches[c])
    out[f'alphas_{c}'] = np.asarray(arch[f'alphas_{c}'])[on].reshape(on.shape[0], -1)
  return out


def _op_blocks(key, switches, layers):
  """(cell type, edges holding the op) of an op module's variable `key` (a path of the
  supernet's variables), or None for a variable outside the mixed ops."""
  if len(key) < 3 or key[1] not in supernet.GROUP_NAMES or key[2] not in genotypes.OPS:
    return None
  first = int(key[0][len('cells' if key[0].startswith('cells') else 'cell'):].split('-')[0])
  cell = 'reduce' if first in genotypes.reduction_indices(layers) else 'normal'
  group = supernet.EDGE_GROUPS[supernet.GROUP_NAMES.index(key[1])]
  column = genotypes.OPS.index(key[2])
  return [e for e in group if switches[cell][e, column]]


def _embed_collection(solo: dict, shapes: dict, solo_switches, union_switches, layers):
  """A solo supernet's variable collection in the union network's layout: each mixed op's
  variables hold one block per edge along their last axis; the blocks of edges the member
  does not have are zeros."""
  solo_flat = traverse_util.flatten_dict(solo)
  out = {}
  for key, shape in traverse_util.flatten_dict(shapes).items():
    target = _op_blocks(key, union_switches, layers)
    if target is None:
      out[key] = np.asarray(solo_flat[key])
      continue
    value = np.zeros(shape.shape, shape.dtype)
    if key in solo_flat:
      have = _op_blocks(key, solo_switches, layers)
      src = np.asarray(solo_flat[key])
      src = src.reshape(src.shape[:-1] + (len(have), -1))
      dst = value.reshape(value.shape[:-1] + (len(target), -1))
      for j, e in enumerate(have):
        dst[..., target.index(e), :] = src[..., j, :]
    out[key] = value
  return traverse_util.unflatten_dict(out)


def _embed_arch(arch: dict, switches: dict) -> dict:
  out = dict(arch)
  for c in genotypes.CELLS:
    alphas = np.asarray(arch[f'alphas_{c}'])
    wide = np.zeros((genotypes.NUM_EDGES, genotypes.NUM_OPS), alphas.dtype)
    wide[np.asarray(switches[c])] = alphas.reshape(-1)
    out[f'alphas_{c}'] = wide
  return out


def embed(solo: search_step.SearchState, solo_switches, union_switches, shapes, spec,
          layers: int) -> search_step.SearchState:
  """A member's initial state (its solo run's, `solo`) in the population supernet's layout
  (`shapes`: its state's `jax.eval_shape`), optimiser states fresh as at any stage start."""
  solo = jax.tree_util.tree_map(np.asarray, jax.device_get(solo))
  params, batch_stats = (
      _embed_collection(getattr(solo, name), getattr(shapes, name), solo_switches,
                        union_switches, layers) for name in ('params', 'batch_stats'))
  arch = _embed_arch(solo.arch, solo_switches)
  return solo.replace(params=params, batch_stats=batch_stats, arch=arch,
                      weight_opt=spec.tx_weights.init(params),
                      arch_opt=spec.tx_arch.init(arch))


def agreement(genotype_list) -> dict:
  """Per cell and edge of the members' genotypes: how many members chose each (op, input),
  and the share of members that agree with the most common choice."""
  out = {}
  for cell in genotypes.CELLS:
    rows = []
    for node in range(genotypes.STEPS):
      for slot in range(2):
        counts = {}
        for g in genotype_list:
          op, inp = getattr(g, cell)[2 * node + slot]
          counts[f'{op} <- {genotypes.state_name(inp)}'] = counts.get(
              f'{op} <- {genotypes.state_name(inp)}', 0) + 1
        rows.append({'node': node + 2, 'slot': slot, 'choices': counts,
                     'agreement': max(counts.values()) / len(genotype_list)})
    out[cell] = rows
  return out
