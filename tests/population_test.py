"""Populations of searches (pcp_jax/population.py): the members, the union supernet with a
member's mask, member k equal to its solo run (float64, across a stage boundary) and the
outputs. The float32 genotypes and resume: search_resume_test (beside its solo run)."""

import importlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pcp_jax import genotypes
from pcp_jax import kernels
from pcp_jax import plots
from pcp_jax import population
from pcp_jax import population_plots
from pcp_jax import runs
from pcp_jax import supernet
from pcp_jax import union


def search_config(arg='tiny', dtype='float32', every=0, keep=2):
  """PCP-DARTS's tiny form, leaner: two stages of one epoch of two steps, the architecture
  trained from the first step; `keep` of the 4 ops kept after stage 1."""
  config = importlib.import_module('configs.pcp').get_config(arg)
  if dtype == 'float64':
    config.op_impl, config.search.dtype = 'xla', 'float64'
  config.data.max_train, config.search.batch_size, config.search.eval_batch_size = 32, 8, 16
  config.search.channels = 4
  for stage in config.search.stages:
    stage.epochs, stage.warmup_epochs = 1, 0
  config.search.stages[0].num_keep = keep
  config.checkpoint.every_steps = every
  return config


def test_config_arguments_make_the_members():
  config = search_config('seeds=2,ssf=0.25:0.5,tiny')
  config.seed = 7
  members = population.members(config)
  assert population.size(config) == 4
  assert [(m.index, m.seed, m.ss_factor) for m in members] == [
      (0, 7, 0.25), (1, 8, 0.25), (2, 7, 0.5), (3, 8, 0.5)]
  solo = population.member_config(config, members[3])
  assert (solo.seed, solo.search.ss_factor, population.size(solo)) == (8, 0.5, 1)
  assert population.size(search_config('ssf=0.5,tiny')) == 1
  assert population.size(importlib.import_module('configs.ss_pcp').get_config()) == 1
  assert population.run_folders(config, 'RUN')[-1] == os.path.join('RUN', 'members', '3')


@pytest.mark.parametrize('arg, field, message', [
    ('seeds=0', None, r'search\.population\.seeds must be a whole number >= 1, got 0'),
    ('ssf=0.5:2', None, r'search\.population\.ss_factors must be numbers in \[0, 1\]'),
    ('ssf=0.5:0.5', None, r'search\.population\.ss_factors lists a value twice'),
    ('seeds=2', ('curvature_every', 1), r'does not measure curvature.*curvature_every=0'),
    ('seeds=2,space=s4', ('space', 's4'), r"cannot hold the 'noise' op"),
])
def test_bad_population_settings_answer_in_one_line(arg, field, message):
  config = search_config(f'{arg},tiny')
  if field:
    config.search[field[0]] = field[1]
  with pytest.raises(ValueError, match=message) as error:
    population.check_search_config(config)
  assert '\n' not in str(error.value)


def test_the_devices_field_chooses_how_members_meet_devices():
  config = search_config('seeds=3,tiny')
  config.search.population.devices = 'gpu'
  with pytest.raises(ValueError, match=r"search\.population\.devices must be one of \['auto', "
                     r"'members', 'data'\], got 'gpu'"):
    population.check_search_config(config)
  config.num_devices, config.search.population.devices = 2, 'members'
  with pytest.raises(ValueError, match=r'splits the 3 members across the 2 devices'):
    population.check_search_config(config)
  config.search.population.devices = 'auto'  # 3 members do not split over 2: data-parallel
  population.check_search_config(config)
  assert not population.shards_members(config)
  config.search.population.devices = 'data'
  population.check_search_config(config)
  for seeds, mode, split in ((4, 'auto', True), (4, 'members', True), (4, 'data', False)):
    config.search.population.seeds, config.search.population.devices = seeds, mode
    assert population.shards_members(config) == split, (seeds, mode)
  config.num_devices = 1
  assert not population.shards_members(config)


def test_bad_config_arguments_name_the_argument():
  with pytest.raises(ValueError, match='Config argument seeds must be a whole number'):
    search_config('seeds=two,tiny')
  with pytest.raises(ValueError, match='Config argument ssf must be numbers in'):
    search_config('ssf=0.5:x,tiny')


@pytest.mark.slow  # two float64 compiles of a supernet's gradient
@jax.enable_x64()
def test_a_member_in_the_union_supernet_computes_its_own_supernet():
  """Float64: the wide supernet over a union of ops, with one member's weights placed in it
  and its mask, gives that member's logits and architecture gradient."""
  rng = np.random.default_rng(0)
  ops = ('max_pool_3x3', 'skip_connect', 'sep_conv_3x3')
  columns = [genotypes.OPS.index(o) for o in ops]

  def switches(keep):  # `keep` of the three ops on every edge, chosen per edge
    out = np.zeros((genotypes.NUM_EDGES, genotypes.NUM_OPS), bool)
    for e in range(genotypes.NUM_EDGES):
      out[e, rng.choice(columns, keep, replace=False)] = True
    return out

  member = {c: switches(2) for c in genotypes.CELLS}
  other = {c: switches(2) for c in genotypes.CELLS}
  wide_switches = union.switches([member, other])
  assert (wide_switches['normal'].sum(axis=1) > 2).any()  # the union is wider somewhere

  def network(sw, wide):
    return supernet.SearchNetwork(
        channels=4, layers=3, partial_k=2, switches_normal=genotypes.switches_to_tuple(
            sw['normal'], not wide), switches_reduce=genotypes.switches_to_tuple(
                sw['reduce'], not wide), wide_arch=wide, dtype=jnp.float64,
        kernels=kernels.XLA)

  narrow_net, wide_net = network(member, False), network(wide_switches, True)
  solo = jax.tree_util.tree_map(
      lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a,
      supernet.init_variables(narrow_net, jax.random.PRNGKey(1), (8, 8, 3)))
  shapes = jax.eval_shape(
      lambda k: supernet.init_variables(wide_net, k, (8, 8, 3)), jax.random.PRNGKey(1))
  placed = {
      name: union._embed_collection(solo[name], shapes[name], member, wide_switches, 3)  # pylint: disable=protected-access
      for name in ('params', 'batch_stats')}
  placed['arch'] = union._embed_arch(solo['arch'], member)  # pylint: disable=protected-access
  x = jnp.asarray(rng.normal(size=(4, 8, 8, 3)))
  mask = {c: jnp.asarray(member[c]) for c in genotypes.CELLS}
  keys = {'channels': jax.random.PRNGKey(2), 'dropout': jax.random.PRNGKey(3)}

  def loss(arch, variables, net, **kwargs):
    (logits, _), _ = net.apply(dict(variables, arch=arch), x, train=True, skip_drop_rate=0.3,
                               rngs=keys, mutable=['batch_stats'], **kwargs)
    return jnp.sum(jnp.sin(logits)), logits

  def grad(net, **kwargs):
    return jax.jit(jax.value_and_grad(
        lambda arch, variables: loss(arch, variables, net, **kwargs), has_aux=True))

  (_, want), g_want = grad(narrow_net)(solo['arch'], solo)
  (_, got), g_got = grad(wide_net, op_mask=mask)(placed['arch'], placed)
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
  g_got = union.narrow(jax.device_get(g_got), member)
  for name in g_want:
    np.testing.assert_allclose(g_got[name], g_want[name], rtol=1e-10, atol=1e-14)
  # Back to the member's layout.
  for name, value in union.narrow(placed['arch'], member).items():
    np.testing.assert_array_equal(value, solo['arch'][name])


def test_agreement_counts_the_members_choices():
  a = genotypes.REFERENCE_GENOTYPES['PC_DARTS_cifar']
  b = genotypes.REFERENCE_GENOTYPES['PDARTS']
  out = union.agreement([a, a, b])
  first = out['normal'][0]
  op, inp = a.normal[0]
  assert first['choices'][f'{op} <- {genotypes.state_name(inp)}'] >= 2
  assert sum(first['choices'].values()) == 3
  assert all(1 / 3 <= row['agreement'] <= 1 for c in out for row in out[c])
  assert all(row['agreement'] == 1 for row in union.agreement([a, a])['reduce'])


def arch_of(folder):
  with np.load(os.path.join(folder, runs.ARCH_WEIGHTS)) as f:
    return {k: f[k] for k in f.files}


def rows_of(folder, name=runs.SEARCH_METRICS):
  timing = ('epoch_seconds', 'elapsed_seconds', 'compile_and_first_epoch_seconds')
  return [{k: v for k, v in r.items() if k not in timing}
          for r in runs.Rows(os.path.join(folder, name), write=False).read()]


@pytest.mark.slow
def test_members_equal_their_solo_runs_in_float64(tmp_path):
  """Three seeds over two stages (each member's stage-2 supernet initialised as its solo
  run's), all members at once (vmapped, an accelerator's default, where batching could mix
  or reorder them): each member's architecture weights and metrics equal its solo run's to
  1e-9 relative. Every op is kept after stage 1, so that the two stages are one program
  (compiled once, here and in the solo runs); members keeping different ops in one union
  supernet: `test_a_member_in_the_union_supernet_computes_its_own_supernet`. One member after
  another (a CPU's default, one member's program): search_resume_test, members_test."""
  with jax.enable_x64():
    config = search_config('seeds=3,tiny', 'float64', keep=4)
    runs_of = {}
    for at_once in (3,):
      config.search.population.members_at_once = at_once
      runs_of[at_once] = population.run(config, str(tmp_path / f'pop{at_once}'))
    for k, member in enumerate(population.members(config)):
      solo_dir = tmp_path / f'solo{k}'
      want = population.run(population.member_config(config, member), str(solo_dir))
      for at_once, got in runs_of.items():
        pop_dir = tmp_path / f'pop{at_once}'
        summary = json.load(open(pop_dir / population.POPULATION))
        assert genotypes.to_dict(got[k]) == genotypes.to_dict(want)
        folder = pop_dir / 'members' / str(k)
        a, b = arch_of(folder), arch_of(solo_dir)
        for name in b:
          np.testing.assert_allclose(a[name], b[name], rtol=1e-9, atol=1e-12, err_msg=name)
        mine, theirs = rows_of(folder), rows_of(solo_dir)
        assert len(mine) == len(theirs) == 2
        for r, s in zip(mine, theirs):
          assert r.pop('member') == k
          for name in ('train_loss', 'valid_loss', 'arch_ce', 'arch_loss', 'train_acc'):
            np.testing.assert_allclose(r[name], s[name], rtol=1e-9, err_msg=name)
          assert r['genotype'] == s['genotype']
        assert summary['members'][k]['seed'] == member.seed
        assert summary['members'][k]['genotype'] == genotypes.to_dict(want)
        assert json.load(open(folder / runs.CONFIG))['seed'] == member.seed
    assert len(rows_of(tmp_path / 'pop3', population.METRICS)) == 2
    assert_population_pictures(str(tmp_path / 'pop3'))


def assert_population_pictures(run_dir):
  """A real population folder's pictures (population_plots): every one is drawn, and the
  curves' mean ± std band is population_metrics.jsonl's."""
  paths = plots.plot_run(run_dir)
  assert sorted(os.path.basename(p) for p in paths) == [
      'population_agreement.png', 'population_curves.png', 'population_op_weights_normal.png',
      'population_op_weights_reduce.png']
  members = population_plots.load_members(run_dir)
  rows = [m.metrics for m in members]
  summary = rows_of(run_dir, population.METRICS)
  for name in ('train_loss', 'valid_acc', 'arch_loss'):
    mean, std, _ = population_plots.band(population_plots.aligned(
        rows, name, population_plots.epochs(rows)))
    np.testing.assert_allclose(mean, [r[f'{name}_mean'] for r in summary], rtol=1e-12)
    np.testing.assert_allclose(std, [r[f'{name}_std'] for r in summary], rtol=1e-9,
                               atol=1e-15)
