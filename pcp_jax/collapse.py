"""Collapse diagnostics: the architecture loss's curvature, two free indicators, stopping rules.

The curvature meter is RobustDARTS's quantity (Zela et al., ICLR 2020): the largest algebraic
eigenvalue of the Hessian of the validation cross-entropy with respect to the architecture
parameters (alphas and, with edge normalisation, betas). RobustDARTS builds the full Hessian
row by row; here a few Lanczos steps on Hessian-vector products (forward-over-reverse with
XLA's kernels, reverse-over-reverse through the CPU wing's custom gradients) give the same
number, in one compiled function. Across the products of one estimate the weights, the
batch, the BN mode (batch statistics, as in the search step) and the partial-channel key are
fixed, so the operator is one symmetric matrix. Skip-connect dropout is off. The Hessian is
the cross-entropy's alone: RobustDARTS adds the architecture weight decay (`wd * I`), which
shifts every eigenvalue by `wd` (1e-3 here), so their number is ours plus
`search.optim.arch.weight_decay`.

Stopping rules (`search.early_stop`): `darts_es`, RobustDARTS's DARTS-ES on the local average
of the eigenvalues, and `skip_count`, DARTS+'s stop once the derived normal cell has
`search.early_stop_skips` skip connections.
"""

import dataclasses
import functools
import math
from typing import Mapping, Optional, Sequence

from absl import logging
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from pcp_jax import augment
from pcp_jax import defaults
from pcp_jax import genotypes
from pcp_jax import kernels as kernels_lib
from pcp_jax import losses

RULES = ('none', 'darts_es', 'skip_count')
ACTIONS = ('stop', 'warn')


def check_config(config) -> None:
  """Validates the `search.curvature_*` and `search.early_stop*` fields."""
  cfg = config.search
  defaults.check_fields(
      config, whole=(('search.curvature_every', 0), ('search.curvature_batch', 1),
                     ('search.curvature_steps', 2), ('search.early_stop_skips', 1),
                     ('search.darts_es.window', 1), ('search.darts_es.delta', 1),
                     ('search.darts_es.start_epoch', 0)),
      at_least_zero=('search.darts_es.factor',))
  if cfg.early_stop not in RULES:
    raise ValueError(f'search.early_stop must be one of {list(RULES)}, got {cfg.early_stop!r}.')
  if cfg.early_stop_action not in ACTIONS:
    raise ValueError(f'search.early_stop_action must be one of {list(ACTIONS)}, '
                     f'got {cfg.early_stop_action!r}.')
  if cfg.early_stop == 'darts_es' and not cfg.curvature_every:
    raise ValueError("search.early_stop='darts_es' reads the curvature: set "
                     'search.curvature_every >= 1 (RobustDARTS: 2).')


def lanczos_max(matvec, v0, steps: int):
  """The largest algebraic eigenvalue of the symmetric operator `matvec` on 1-D vectors, by
  `steps` Lanczos steps from `v0` with full reorthogonalisation (jittable; `steps` static).

  Returns (largest Ritz value, the Ritz values of every step count 1..steps: row k holds the
  estimate after k + 1 products), so the convergence can be read off. A Krylov space that
  closes early (an invariant subspace, e.g. `steps` >= the dimension) ends the iteration:
  later steps repeat the last estimate.
  """
  n = v0.shape[0]
  dtype = v0.dtype
  tiny = jnp.finfo(dtype).eps * 64
  basis = jnp.zeros((steps + 1, n), dtype).at[0].set(v0 / jnp.linalg.norm(v0))
  alphas = jnp.zeros((steps,), dtype)
  betas = jnp.zeros((steps,), dtype)

  def body(i, carry):
    basis, alphas, betas, scale, active = carry
    v = basis[i]
    w = matvec(v)
    a = jnp.vdot(v, w)
    # Full reorthogonalisation, twice ("twice is enough"): rows past i are zero.
    w = w - basis.T @ (basis @ w)
    w = w - basis.T @ (basis @ w)
    b = jnp.linalg.norm(w)
    scale = jnp.maximum(scale, jnp.abs(a) + b)
    active_now = active
    active = active & (b > tiny * scale)
    basis = basis.at[i + 1].set(jnp.where(active, w / jnp.where(active, b, 1), 0))
    alphas = alphas.at[i].set(jnp.where(active_now, a, 0))
    betas = betas.at[i].set(jnp.where(active, b, 0))
    return basis, alphas, betas, scale, active

  init = (basis, alphas, betas, jnp.zeros((), dtype), jnp.ones((), bool))
  _, alphas, betas, _, _ = jax.lax.fori_loop(0, steps, body, init)
  # Steps after a breakdown contribute nothing: their diagonal is set to the first Rayleigh
  # quotient (never above the largest Ritz value) and their couplings are zero.
  done = jnp.cumsum(jnp.concatenate([jnp.zeros((1,), dtype), (betas[:-1] == 0)])) > 0
  diag = jnp.where(done, alphas[0], alphas)

  def ritz_max(k):
    mask = jnp.arange(steps) <= k
    t = (jnp.diag(jnp.where(mask, diag, alphas[0]))
         + jnp.diag(jnp.where(mask[1:], betas[:-1], 0), 1)
         + jnp.diag(jnp.where(mask[1:], betas[:-1], 0), -1))
    return jnp.linalg.eigvalsh(t)[-1]

  history = jax.vmap(ritz_max)(jnp.arange(steps))
  return history[-1], history


def arch_ce(model, variables, arch, images, labels, channel_key, mean, std):
  """The supernet's cross-entropy on a uint8 batch as a function of `arch`, in train mode (batch
  statistics), without skip-connect dropout, partial channels drawn from `channel_key`."""
  x = augment.normalize(augment.to_float(images, kernels_lib.compute_dtype(model.dtype)),
                        mean, std)
  (logits, _), _ = model.apply(dict(variables, arch=arch), x, train=True,
                               rngs={'channels': channel_key, 'noise': channel_key},
                               mutable=['batch_stats'])
  return losses.cross_entropy(logits, labels)


def arch_hvp(model, variables, images, labels, channel_key, mean, std):
  """(flat architecture vector, unravel, v -> H v): Hessian-vector products of `arch_ce` at the
  current architecture; forward-over-reverse, or reverse-over-reverse for a kernel set with
  custom gradients (the CPU wing's, which forward mode cannot go through)."""
  flat, unravel = jax.flatten_util.ravel_pytree(variables['arch'])
  params = {k: v for k, v in variables.items() if k != 'arch'}

  def loss(a):
    return arch_ce(model, params, unravel(a), images, labels, channel_key, mean, std)

  def hvp(v):
    if model.kernels.name == 'xla':
      return jax.jvp(jax.grad(loss), (flat,), (v,))[1]
    return jax.grad(lambda a: jnp.vdot(jax.grad(loss)(a), v))(flat)

  return flat, unravel, hvp


def curvature(variables, images, labels, key, *, model, mean, std, steps: int):
  """The largest eigenvalue of the architecture Hessian of the validation CE (module
  docstring) and the estimate after each product (`lanczos_max`). `key` draws the
  partial-channel sample and the start vector."""
  k_channels, k_start = jax.random.split(key)
  flat, _, hvp = arch_hvp(model, variables, images, labels, k_channels, mean, std)
  v0 = jax.random.normal(k_start, flat.shape, flat.dtype)
  return lanczos_max(hvp, v0, steps)


def make_curvature_fn(model, mean, std, steps: int):
  """`curvature` jitted for `model` (the data-parallel BN axis dropped: the meter runs on one
  replica)."""
  model = model.clone(bn_axis_name=None)
  return jax.jit(functools.partial(curvature, model=model, mean=mean, std=std, steps=steps))


def due(epoch: int, epochs: int, every: int) -> bool:
  """Whether the meter runs after stage epoch `epoch` (0-based): every `every` epochs from the
  first, and after the last (RobustDARTS's cadence)."""
  return every > 0 and (epoch % every == 0 or epoch == epochs - 1)


def measure(curvature_fn, state, images, labels, batch: int, key) -> dict:
  """The meter on the first `batch` images of the split (the same batch at every estimate):
  {'curvature': the largest eigenvalue, 'curvature_change': its relative change over the
  last five products (how far Lanczos still moved)}."""
  n = min(batch, images.shape[0])
  variables = {'params': state.params, 'arch': state.arch, 'batch_stats': state.batch_stats}
  _, history = curvature_fn(variables, images[:n], labels[:n], key)
  history = np.asarray(jax.device_get(history), np.float64)
  last, earlier = history[-1], history[max(0, len(history) - 6)]
  return {'curvature': float(last),
          'curvature_change': float(abs(last - earlier) / max(abs(last), 1e-30))}


# ---------------------------------------------------------------------------
# Free indicators.


def skip_count(genotype) -> int:
  """Skip connections in the normal cell of a genotype (dict or Genotype)."""
  normal = genotype['normal'] if isinstance(genotype, Mapping) else genotype.normal
  return sum(op == 'skip_connect' for op, _ in normal)


def mean_entropy(probs) -> float:
  """Mean over edges of the entropy (nats) of each edge's op distribution (rows of `probs`,
  zeros for ops that are off)."""
  p = np.asarray(probs, np.float64)
  logs = np.log(np.where(p > 0, p, 1.0))
  return float(np.mean(-np.sum(p * logs, axis=-1)))


def indicators(weights: Mapping, genotype) -> dict:
  """The free indicators of an epoch: skip connections in the derived normal cell and the
  mean per-edge entropy of each cell's softmaxed alphas (`weights`: a row of
  `genotypes.arch_weights`)."""
  return {'skip_normal': skip_count(genotype),
          'entropy_normal': mean_entropy(weights['alphas_normal']),
          'entropy_reduce': mean_entropy(weights['alphas_reduce'])}


# ---------------------------------------------------------------------------
# Stopping rules. A stage's history is a list of epoch records {'epoch' (0-based in the
# stage), 'curvature' (None when not measured), 'skip_normal', 'genotype'}, oldest first.


def record(row: Mapping, genotype: dict) -> dict:
  """The stage history's record of epoch `row` (a search metrics row, 1-based epoch)."""
  return {'epoch': row['epoch'] - 1, 'curvature': row.get('curvature'),
          'skip_normal': row['skip_normal'], 'genotype': genotype}


@dataclasses.dataclass
class History:
  """A stage's epoch records and the first decision of its stopping rule; kept in the search
  checkpoints' metadata, so a resumed search decides as an uninterrupted one."""
  records: list = dataclasses.field(default_factory=list)
  decision: Optional[dict] = None

  def to_meta(self) -> dict:
    return {'records': self.records, 'decision': self.decision}

  @classmethod
  def from_meta(cls, meta) -> 'History':
    return cls() if not meta else cls(list(meta['records']), meta['decision'])

  @property
  def stopped(self) -> bool:
    """Whether a decision stopped the search (not one that only warned)."""
    return self.decision is not None and self.decision['action'] == 'stop'

  def next_stage(self) -> 'History':
    """A new stage's history: no records, the search's first decision kept."""
    return History(decision=self.decision)

  def update(self, cfg, row: Mapping, genotype: dict, stage: int) -> None:
    """Records epoch `row` of stage `stage` (0-based; a search metrics row) with the genotype
    the search would return then, and applies the rule of `cfg` (`config.search`); its first
    decision is kept and logged (`stopped` says whether it stops the search)."""
    self.records.append(record(row, genotype))
    decision = None if self.decision else decide(cfg, self.records,
                                                  cfg.stages[stage].warmup_epochs)
    if decision is None:
      return
    self.decision = dict(decision, stage=stage + 1, action=cfg.early_stop_action)
    logging.warning(
        'Collapse: %s fired after stage %d epoch %d; the genotype of epoch %d %s: %s',
        decision['rule'], stage + 1, decision['decided_at'] + 1, decision['chosen'] + 1,
        'is the result, the search stops' if self.stopped else
        'would be the result (early_stop_action=warn: the search goes on)',
        genotypes.to_string(genotypes.from_dict(decision['genotype'])))


def local_averages(values: Sequence[float], window: int):
  """DARTS-ES's local averages: from the ceil(window/2)-th estimate on, the mean of the last
  `window` estimates (of all of them while fewer)."""
  first = math.ceil(window / 2)
  return [float(np.mean(values[max(0, n - window):n])) for n in range(first, len(values) + 1)]


def darts_es(history, every: int, window: int = 5, delta: int = 4, factor: float = 1.3,
             start_epoch: int = 10) -> Optional[dict]:
  """RobustDARTS's DARTS-ES decision after the newest record, or None.

  The local average of estimate n stands for epoch e_n - every * floor(window/2); the rule
  fires when that epoch minus every * delta is at least `start_epoch` and the newest local
  average exceeds `factor` times the one `delta` estimates earlier. The chosen epoch is that
  epoch minus every * delta, whose genotype the search keeps.
  """
  measured = [r for r in history if r.get('curvature') is not None]
  if not measured or measured[-1] is not history[-1]:
    return None
  epoch = history[-1]['epoch']
  chosen = epoch - every * (window // 2) - every * delta
  averages = local_averages([r['curvature'] for r in measured], window)
  if len(averages) < delta + 1 or chosen < start_epoch:
    return None
  ratio = averages[-1] / averages[-1 - delta]
  if not ratio > factor:
    return None
  record = next((r for r in history if r['epoch'] == chosen), None)
  if record is None:
    return None
  return {'rule': 'darts_es', 'decided_at': epoch, 'chosen': chosen, 'ratio': ratio,
          'genotype': record['genotype']}


def skip_stop(history, skips: int, warmup_epochs: int) -> Optional[dict]:
  """DARTS+'s rule: the newest epoch after the warm-up whose normal cell has `skips` or more
  skip connections, or None."""
  last = history[-1]
  if last['epoch'] < warmup_epochs or last['skip_normal'] < skips:
    return None
  return {'rule': 'skip_count', 'decided_at': last['epoch'], 'chosen': last['epoch'],
          'skip_normal': last['skip_normal'], 'genotype': last['genotype']}


def decide(cfg, history, warmup_epochs: int) -> Optional[dict]:
  """The decision of the configured `cfg.early_stop` rule after the newest record, or None."""
  if cfg.early_stop == 'darts_es':
    es = cfg.darts_es
    return darts_es(history, cfg.curvature_every, es.window, es.delta, es.factor,
                    es.start_epoch)
  if cfg.early_stop == 'skip_count':
    return skip_stop(history, cfg.early_stop_skips, warmup_epochs)
  return None


def trajectory(rows, every: int = 1) -> str:
  """A markdown table of a search's collapse indicators per epoch (`search_metrics.jsonl`
  rows) and what each rule would decide on them: `darts_es` with RobustDARTS's defaults at
  the rows' cadence `every`, `skip_count` at 2 skip connections after the warm-up."""
  lines = ['| stage | epoch | curvature | still moving | skips (normal) | entropy normal | '
           'entropy reduce |', '|---:|---:|---:|---:|---:|---:|---:|']
  decisions, history, stage = [], [], None
  for r in rows:
    if r['stage'] != stage:
      history, stage, warmup, fired = [], r['stage'], None, set()
    warmup = r['epoch'] - 1 if warmup is None and not r.get('arch_frozen') else warmup
    history.append(record(r, r['genotype']))
    curvature = r.get('curvature')
    measured = ('-', '-') if curvature is None else (f'{curvature:.4g}',
                                                     f"{r['curvature_change']:.1e}")
    lines.append(f"| {r['stage']} | {r['epoch']} | {measured[0]} | {measured[1]} | "
                 f"{r['skip_normal']} | {r['entropy_normal']:.4f} | {r['entropy_reduce']:.4f} |")
    after_warmup = 10**9 if warmup is None else warmup
    for rule, decision in (('darts_es', darts_es(history, every)),
                           ('skip_count', skip_stop(history, 2, after_warmup))):
      if decision and rule not in fired:
        fired.add(rule)
        decisions.append(f"{rule}: fires after stage {stage} epoch {decision['decided_at'] + 1}"
                         f", keeps epoch {decision['chosen'] + 1} "
                         f"({skip_count(decision['genotype'])} skip connections)")
  return '\n'.join(lines + [''] + (decisions or ['No rule fires on these epochs.']))
