"""Tests of pcp_jax.events: TensorBoard scalars, architecture weights and text, read back."""

import os

import numpy as np
from tensorboardX.proto import layout_pb2

from pcp_jax import curves
from pcp_jax import events
from pcp_jax import genotypes


def test_scalars_read_back(tmp_path):
  with events.Writer(str(tmp_path), 'search') as writer:
    for step in (10, 20, 30):
      writer.write(step, {'train_loss': 1.0 / step, 'best': step == 20, 'lr': np.float32(0.5),
                          'stage': 1, 'genotype': 'text', 'nested': {'x': 1.0},
                          'list': [1.0, 2.0], 'zero_d': np.array(2.5)}, prefix='search/')
  scalars = events.read_scalars(os.path.join(tmp_path, 'tensorboard', 'search'))
  assert set(scalars) == {'search/train_loss', 'search/best', 'search/lr', 'search/stage',
                          'search/zero_d'}
  assert [s for s, _ in scalars['search/train_loss']] == [10, 20, 30]
  np.testing.assert_allclose([v for _, v in scalars['search/train_loss']],
                             [0.1, 0.05, 1 / 30], rtol=1e-6)
  assert scalars['search/best'] == [(10, 0.0), (20, 1.0), (30, 0.0)]
  assert scalars['search/lr'] == [(10, 0.5), (20, 0.5), (30, 0.5)]


def test_purge_step_drops_replayed_steps(tmp_path):
  logdir = os.path.join(tmp_path, 'tensorboard', 'train')
  with events.Writer(str(tmp_path), 'train') as writer:
    for step in range(1, 7):
      writer.write(step, {'loss': float(step), 'acc': 0.1 * step})
  # The checkpoint was at step 4: the resumed session redoes steps 5.. with new values.
  with events.Writer(str(tmp_path), 'train', purge_step=5) as writer:
    for step in range(5, 9):
      writer.write(step, {'loss': 100.0 + step})
  scalars = events.read_scalars(logdir)
  assert len([f for f in os.listdir(logdir) if 'tfevents' in f]) == 2
  assert scalars['loss'] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0),
                             (5, 105.0), (6, 106.0), (7, 107.0), (8, 108.0)]
  # A tag the resumed session does not write again is cut at the purge step too.
  assert [s for s, _ in scalars['acc']] == [1, 2, 3, 4]


def test_arch_weights_written(tmp_path):
  rng = np.random.default_rng(0)
  probs = rng.uniform(size=(genotypes.NUM_EDGES, genotypes.NUM_OPS))
  switches = np.ones_like(probs, bool)
  switches[:, 0] = False  # 'none' is off: skipped
  probs[~switches] = 0
  probs /= probs.sum(axis=1, keepdims=True)
  betas = rng.uniform(size=genotypes.NUM_EDGES)
  row = {'primitives': list(genotypes.OPS),
         'alphas_normal': probs.tolist(), 'switches_normal': switches.tolist(),
         'betas_normal': betas.tolist(),
         'alphas_reduce': probs.tolist(), 'switches_reduce': switches.tolist(),
         'betas_reduce': np.ones(genotypes.NUM_EDGES).tolist()}  # all ones: no betas
  with events.Writer(str(tmp_path), 'search') as writer:
    writer.write_arch(7, row)
    writer.write_arch(8, row)
  scalars = events.read_scalars(os.path.join(tmp_path, 'tensorboard', 'search'))
  op = genotypes.PRIMITIVES[3]
  # Edges named as the figures name them: edge 3 is c_{k-1} -> node 1, edge 13 node 2 -> node 3.
  assert [s for s, _ in scalars[f'arch/normal/c_k-1_to_node_1/{op}']] == [7, 8]
  np.testing.assert_allclose(scalars[f'arch/normal/c_k-1_to_node_1/{op}'][0][1], probs[3, 3],
                             rtol=1e-6)
  np.testing.assert_allclose(scalars['arch/normal/node_2_to_node_3/edge_weight'][0][1],
                             betas[13], rtol=1e-6)
  assert f'arch/normal/c_k-2_to_node_0/{genotypes.PRIMITIVES[0]}' not in scalars
  assert 'arch/reduce/c_k-2_to_node_0/edge_weight' not in scalars
  per_cell = (genotypes.NUM_OPS - 1) * genotypes.NUM_EDGES
  assert len(scalars) == 2 * per_cell + genotypes.NUM_EDGES


def test_the_charts_of_the_edges_carry_the_figures_titles(tmp_path):
  weights = {'alphas_normal': np.full((genotypes.NUM_EDGES, 8), 1 / 8).tolist()}
  with events.Writer(str(tmp_path), 'search') as writer:
    writer.write_arch(1, weights)
  logdir = os.path.join(tmp_path, 'tensorboard', 'search')
  layouts = [layout_pb2.Layout.FromString(value.tensor.string_val[0])
             for event in events.read_events(logdir) for value in event.summary.value
             if value.tag == 'custom_scalars__config__']
  assert len(layouts) == 1
  charts = layouts[0].category[0].chart
  assert [c.title for c in charts] == curves.edge_names()
  assert charts[3].multiline.tag == ['arch/normal/c_k-1_to_node_1/.*']
  assert set(events.read_scalars(logdir)) == {
      f'arch/normal/{genotypes.edge_tag(e)}/{op}'
      for e in range(genotypes.NUM_EDGES) for op in genotypes.PRIMITIVES}


def test_text_reads_back_as_a_preformatted_block(tmp_path):
  text = "Genotype(normal=[('sep_conv_3x3', 0)],\n  reduce=[])"
  with events.Writer(str(tmp_path), 'search') as writer:
    writer.write_text(4, 'genotype', text)
  texts = events.read_texts(os.path.join(tmp_path, 'tensorboard', 'search'))
  assert texts == {'genotype/text_summary': [(4, events.as_markdown(text))]}
  assert all(line.startswith('    ') for line in texts['genotype/text_summary'][0][1].split('\n'))


def test_a_write_error_while_stopping_on_another_error_is_not_the_news(tmp_path, monkeypatch):
  writer = events.Writer(str(tmp_path), 'train')
  writer.write(1, {'loss': 1.0})

  def full(*_):
    raise OSError(28, 'No space left on device')
  monkeypatch.setattr(writer._file, 'flush', full)  # pylint: disable=protected-access
  try:
    with writer:
      raise KeyError('the error the run stops on')
  except KeyError:
    pass
  writer = events.Writer(str(tmp_path), 'train')
  monkeypatch.setattr(writer._file, 'flush', full)  # pylint: disable=protected-access
  try:
    with writer:
      pass
    raise AssertionError('a failed close with no other error must raise')
  except OSError as e:
    assert e.errno == 28
