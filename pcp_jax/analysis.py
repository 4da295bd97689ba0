"""Evaluations of a trained run: the `test` mode (the best checkpoint on the test split,
results.json) and the paper's robustness analysis, FGSM attacks swept over eps (the `fgsm`
mode), drawn by `plots.plot_fgsm` (several runs side by side, the paper's Fig. 13:
`reports.fgsm_overlay`).
"""

import functools
import os
from typing import Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from pcp_jax import augment
from pcp_jax import checkpoint
from pcp_jax import data
from pcp_jax import defaults
from pcp_jax import genotypes
from pcp_jax import loop
from pcp_jax import models
from pcp_jax import networks
from pcp_jax import parallel
from pcp_jax import plots
from pcp_jax import runs
from pcp_jax import torch_weights
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
  """A jitted (x, labels, eps) -> (correct, true-class prob, prediction) per example; eps is
  traced."""
  @jax.jit
  def attack_batch(x, labels, eps):
    x_adv = fgsm_perturb(logits_fn, x, labels, eps)
    logits = logits_fn(x_adv).astype(jnp.float32)
    probs = jax.nn.softmax(logits)
    true_prob = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    prediction = jnp.argmax(logits, axis=-1)
    return prediction == labels, true_prob, prediction
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
    A JSON-ready dict: `eps`, `accuracy` and `mean_true_prob` (one value per eps),
    `examples`, mapping str(index) to the true-class probability per eps (string keys,
    so the dict is unchanged by a JSON round trip), and `example_details`: per example its
    label, the predicted class per eps and the clean image (uint8, for the figure).
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

  accuracy, mean_true_prob, true_prob_by_eps, predictions_by_eps = [], [], [], []
  for eps in eps_list:
    parts = ([], [], [])
    for idx, mask in loop.padded_batches(num_examples, batch_size):
      outputs = attack_batch(images[idx], labels[idx], np.float32(eps))
      for part, value in zip(parts, outputs):
        part.append(np.asarray(value)[mask > 0])
    correct, true_prob, predictions = (np.concatenate(part) for part in parts)
    accuracy.append(float(correct.mean()))
    mean_true_prob.append(float(true_prob.mean()))
    true_prob_by_eps.append(true_prob)
    predictions_by_eps.append(predictions)

  return {
      'eps': [float(eps) for eps in eps_list],
      'accuracy': accuracy,
      'mean_true_prob': mean_true_prob,
      'examples': {
          str(int(i)): [float(p[i]) for p in true_prob_by_eps] for i in example_indices},
      'example_details': {str(int(i)): {
          'label': int(labels[i]), 'predictions': [int(p[i]) for p in predictions_by_eps],
          'image': np.round(255 * images[i]).astype(np.uint8).tolist()}
                          for i in example_indices},
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
  state, checkpoint_name, meta = restore_for_eval(config, workdir, model, info)
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
                 checkpoint_epoch=meta.get('epoch'),
                 class_names=data.CLASS_NAMES.get(info.name))
  if parallel.is_main_process():
    runs.write_json(os.path.join(workdir, runs.FGSM), results)
    plots.plot_fgsm({method: results}, workdir, prefix='fgsm')
  logging.info('FGSM accuracy by eps %s: %s', sweep['eps'],
               ', '.join(f'{a:.4f}' for a in sweep['accuracy']))
  return results


# ---------------------------------------------------------------------------
# Test on the best checkpoint.


def restore_for_eval(config, workdir: str, model, info):
  """(state, checkpoint name, metadata): the PyTorch weights of `config.weights` when given,
  else the best checkpoint, else the latest with a warning."""
  weights = config.get('weights', '')
  if weights:
    variables = torch_weights.load_variables(weights, model, train.image_shape(info))
    logging.info('Evaluating the PyTorch weights of %s.', weights)
    state = train.TrainState(step=np.int32(0), params=variables['params'],
                             batch_stats=variables['batch_stats'], opt_state=None)
    return jax.device_put(state), weights, {}
  for name in (runs.BEST, runs.CHECKPOINTS):
    try:
      restored = _restore_newest(config, os.path.join(workdir, name), model, info)
    except IOError as e:
      if name != runs.BEST:
        raise
      logging.warning('%s', e)
      restored = None
    if restored is not None:
      if name != runs.BEST:
        logging.warning('No best checkpoint in %s; using the latest one.', workdir)
      return restored[0], name, restored[1]
  raise FileNotFoundError(f'No checkpoint in {workdir}/best or {workdir}/checkpoints; run the '
                          'train mode first.')


def _restore_newest(config, folder: str, model, info):
  """(state on the device, metadata) of the newest checkpoint in `folder` that restores, or
  None when there is none."""
  if not os.path.isdir(folder):
    return None
  template = train.checkpoint_template(model, train.make_optimizer(config)[0],
                                       train.image_shape(info))
  restored = checkpoint.restore(checkpoint.Checkpointer(folder, max_to_keep=None),
                          lambda meta: template, checkpoint.fingerprint(config, ()), 'training',
                          only=train.STATE_FIELDS)
  return None if restored is None else (jax.device_put(restored[1]['state']), restored[2])


def test(config, workdir: str) -> dict:
  """Evaluates the best checkpoint (or the PyTorch weights of `config.weights`) on the test
  split; writes and returns results.json."""
  train.check_config(config)
  genotype = train.load_genotype(config, workdir)
  splits = data.train_splits(config)
  info = splits.info
  model = models.eval_network(config, genotype, info.num_classes)
  state, checkpoint_name, meta = restore_for_eval(config, workdir, model, info)
  weights = config.get('weights', '')
  eval_fn = loop.make_eval_fn(model, info.mean, info.std)

  def evaluate(state):
    return loop.evaluate(eval_fn, train.eval_variables(state), splits.test_images,
                         splits.test_labels, config.train.eval_batch_size)

  metrics = evaluate(state)
  # The best checkpoint is chosen on the validation split, which is the test set under
  # val_split='test' (as the paper and DARTS do): the last epoch's accuracy is reported beside
  # it, a number no selection has seen.
  # Imported weights have no training run here: no last epoch, no training rows.
  last = None if weights else _restore_newest(
      config, os.path.join(workdir, runs.CHECKPOINTS), model, info)
  last_metrics = last and evaluate(last[0])
  count = functools.partial(networks.count_params, genotype, config.train.channels,
                            config.train.layers, info.num_classes,
                            image_shape=train.image_shape(info))
  rows = [] if weights else runs.Rows(os.path.join(workdir, runs.TRAIN_METRICS)).read()
  results = {
      'test_accuracy': metrics['accuracy'],
      'test_top5_accuracy': metrics['top5_accuracy'],
      'test_loss': metrics['loss'],
      'num_test_examples': len(splits.test_images),
      # The training images a run learnt from (its own validation part left out).
      'num_train_examples': None if weights else len(splits.train_images),
      'data_source': config.data.source,
      'params': count(auxiliary=False),
      'params_with_aux': count(auxiliary=config.train.auxiliary),
      'genotype': genotypes.to_dict(genotype),
      'genotype_source': config.genotype,
      'dataset': info.name,
      'method': runs.method_name(config.genotype, config.train.method),
      'search_cost_days': runs.search_summary(config.genotype).get('search_cost_days'),
      'epochs': rows[-1]['epoch'] if rows else (None if weights else config.train.epochs),
      'checkpoint': checkpoint_name,
      'checkpoint_epoch': meta.get('epoch'),
      'val_split': str(config.train.val_split),
      'last_test_accuracy': last_metrics['accuracy'] if last_metrics else None,
      'last_test_loss': last_metrics['loss'] if last_metrics else None,
      'last_checkpoint_epoch': last[1].get('epoch') if last else None,
      'train_seconds': rows[-1]['elapsed_seconds'] if rows else None,
  }
  if parallel.is_main_process():
    runs.write_json(os.path.join(workdir, runs.RESULTS), results)
  tested = (f'the PyTorch weights of {weights}' if weights
            else f'{checkpoint_name} checkpoint, epoch {meta.get("epoch")}')
  logging.info('Test (%s): accuracy %.4f (top-5 %.4f), loss %.4f on %d images; %d params.',
               tested, metrics['accuracy'], metrics['top5_accuracy'], metrics['loss'],
               len(splits.test_images), results['params'])
  if last_metrics:
    logging.info('Test (last checkpoint, epoch %s): accuracy %.4f, loss %.4f.',
                 results['last_checkpoint_epoch'], last_metrics['accuracy'],
                 last_metrics['loss'])
  return results

