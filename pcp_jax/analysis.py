"""The paper's robustness analysis: FGSM attacks swept over eps and the `fgsm` mode on a
trained run, drawn by `plots.plot_fgsm` (several runs side by side, the paper's Fig. 13:
`reports.fgsm_overlay`).
"""

import os
from typing import Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcp_jax import augment
from pcp_jax import data
from pcp_jax import defaults
from pcp_jax import loop
from pcp_jax import models
from pcp_jax import parallel
from pcp_jax import plots
from pcp_jax import runs
from pcp_jax import train

LogitsFn = Callable[[jax.Array], jax.Array]


def fgsm_perturb(logits_fn: LogitsFn, x_pixels, labels, eps, clip: bool = True):
  """FGSM: x + eps * sign(grad_x CE(logits_fn(x), labels)), clipped to [0, 1] by default.

  `logits_fn` takes images in pixel space [0, 1] (it normalises inside), so the attack
  moves pixels. It must treat examples independently (eval mode), so that each example's
  gradient comes from its own loss only.
  """
  def total_loss(x):
    logits = logits_fn(x).astype(jnp.float32)
    # The sum, not the mean: each example's gradient keeps its own scale, so small
    # per-example gradients do not underflow to a sign of 0 in large batches.
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

  grad = jax.grad(total_loss)(x_pixels)
  x_adv = x_pixels + jnp.asarray(eps, x_pixels.dtype) * jnp.sign(grad)
  return jnp.clip(x_adv, 0.0, 1.0) if clip else x_adv


def _make_attack_batch(logits_fn: LogitsFn):
  """A jitted (x, labels, eps) -> (correct, true-class prob) per example; eps is traced."""
  @jax.jit
  def attack_batch(x, labels, eps):
    x_adv = fgsm_perturb(logits_fn, x, labels, eps)
    logits = logits_fn(x_adv).astype(jnp.float32)
    probs = jax.nn.softmax(logits)
    true_prob = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    return jnp.argmax(logits, axis=-1) == labels, true_prob
  return attack_batch


def fgsm_sweep(logits_fn: LogitsFn, images, labels, eps_list: Sequence[float],
               batch_size: int = 256, example_indices: Sequence[int] = (0, 1, 2, 3)) -> dict:
  """Attacks every image with FGSM at each eps and summarises the results.

  Args:
    logits_fn: pixel-space images [0, 1] -> logits, in eval mode (see `fgsm_perturb`).
    images: (N, H, W, C) pixels in [0, 1].
    labels: (N,) integer labels.
    eps_list: the attack strengths; 0 gives the clean accuracy.
    batch_size: examples per jitted call. The last partial batch is padded to this size
      (`loop.padded_batches`; the padding ignored), so the function compiles once for all
      batches and eps.
    example_indices: images whose true-class probability is recorded for every eps
      (the paper's per-example curves, Fig. 13).

  Returns:
    A JSON-ready dict: `eps`, `accuracy` and `mean_true_prob` (one value per eps) and
    `examples`, mapping str(index) to the true-class probability per eps (string keys,
    so the dict is unchanged by a JSON round trip).
  """
  images = np.asarray(images, dtype=np.float32)
  labels = np.asarray(labels, dtype=np.int32)
  num_examples = len(images)
  if num_examples == 0 or len(labels) != num_examples:
    raise ValueError(
        f'fgsm_sweep needs as many labels as images (> 0), got {len(labels)} labels for '
        f'{num_examples} images.')
  bad = [i for i in example_indices if not 0 <= i < num_examples]
  if bad:
    raise ValueError(f'example_indices {bad} are out of range for {num_examples} images.')
  # A set smaller than one batch is run as a single unpadded batch.
  batch_size = min(batch_size, num_examples)
  attack_batch = _make_attack_batch(logits_fn)

  accuracy, mean_true_prob, true_prob_by_eps = [], [], []
  for eps in eps_list:
    correct_parts, prob_parts = [], []
    for idx, mask in loop.padded_batches(num_examples, batch_size):
      correct, true_prob = attack_batch(images[idx], labels[idx], np.float32(eps))
      keep = mask > 0
      correct_parts.append(np.asarray(correct)[keep])
      prob_parts.append(np.asarray(true_prob)[keep])
    correct = np.concatenate(correct_parts)
    true_prob = np.concatenate(prob_parts)
    accuracy.append(float(correct.mean()))
    mean_true_prob.append(float(true_prob.mean()))
    true_prob_by_eps.append(true_prob)

  return {
      'eps': [float(eps) for eps in eps_list],
      'accuracy': accuracy,
      'mean_true_prob': mean_true_prob,
      'examples': {
          str(int(i)): [float(p[i]) for p in true_prob_by_eps] for i in example_indices},
  }


def check_config(config) -> None:
  """Validates the train config and its `fgsm` section, naming the field."""
  train.check_config(config)
  f = config.fgsm
  defaults.check_fields(config, whole=(('fgsm.num_examples', 0), ('fgsm.batch_size', 1)))
  eps = list(f.eps)
  if not eps or any(isinstance(e, bool) or not isinstance(e, (int, float)) or not 0 <= e <= 1
                    for e in eps):
    raise ValueError(f'fgsm.eps must be numbers in [0, 1] (pixel scale), got {f.eps!r}.')
  limit = f.num_examples or None
  for i in f.example_indices:
    if isinstance(i, bool) or not isinstance(i, int) or i < 0 or (limit and i >= limit):
      raise ValueError(f'fgsm.example_indices must be whole numbers in '
                       f'0..{(limit or 1) - 1 if limit else "the test set size - 1"}, '
                       f'got {list(f.example_indices)}.')


def fgsm(config, workdir: str) -> dict:
  """The `fgsm` mode: an FGSM sweep of a trained run's best checkpoint on the first
  `fgsm.num_examples` test images; writes fgsm.json and plots."""
  check_config(config)
  genotype = train.load_genotype(config, workdir)
  splits = data.train_splits(config)
  info = splits.info
  model = models.eval_network(config, genotype, info.num_classes)
  state, checkpoint_name, meta = train.restore_for_eval(config, workdir, model, info)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}

  def logits_fn(x_pixels):
    logits, _ = model.apply(variables, augment.normalize(x_pixels, info.mean, info.std),
                            train=False)
    return logits

  num = config.fgsm.num_examples or len(splits.test_images)
  images = np.asarray(augment.to_float(splits.test_images[:num]))
  sweep = fgsm_sweep(logits_fn, images, splits.test_labels[:num], list(config.fgsm.eps),
                     batch_size=config.fgsm.batch_size,
                     example_indices=list(config.fgsm.example_indices))
  method = runs.method_name(config.genotype, config.train.method)
  results = dict(sweep, method=method, dataset=info.name, genotype_source=config.genotype,
                 num_examples=len(images), checkpoint=checkpoint_name,
                 checkpoint_epoch=meta.get('epoch'))
  if parallel.is_main_process():
    runs.write_json(os.path.join(workdir, runs.FGSM), results)
    plots.plot_fgsm({method: sweep}, workdir, prefix='fgsm')
  logging.info('FGSM accuracy by eps %s: %s', sweep['eps'],
               ', '.join(f'{a:.4f}' for a in sweep['accuracy']))
  return results
