"""A population of searches as one program: N seeds and/or ss_factors, one vmapped step.

`search.population.seeds` = n and `search.population.ss_factors` = (f_1, ..., f_m) (config
arguments `seeds=n`, `ssf=f_1:...:f_m`) make n x m members: member j * n + i is the solo
search of seed `seed + i` and ss_factor `f_j` (the ss_factors share their seeds, so a sweep
compares them on the same initialisations and data orders). Every piece of the search state
carries a leading member axis (weights, architecture, projector, optimiser states, BN
statistics, metric sums) and one jitted program steps all members (`loop.run_steps` with
`members`: the search step vmapped, each member with its own batch order and keys).

Progressive stages drop different ops in different members. A stage's supernet is built over
the union of the members' ops on each edge, with a column per op in the alphas
(`supernet.SearchNetwork.wide_arch`) and each member's ops given as data
(`search_step.HParams.op_mask`): a member's other ops get weight exactly 0 and their weights
stay exactly 0, so every member computes what its solo run computes, at the cost of the
union's ops. Each member starts a stage as its solo run does: its own supernet initialised
(one initialisation compile per distinct set of ops) and placed into the union's layout.

Devices (`search.population.devices`): 'members' splits the member axis across the devices,
each member's step whole on one device with no communication between devices, so member k
computes on any device count what it computes on one; 'data' runs every member data-parallel
over all devices, as a solo search does; 'auto' (the default) the first when the member count
is a multiple of the device count.

Outputs: `RUN/members/<k>/` is an ordinary search folder (config.json, metrics, architecture
history, genotype.json, diagrams, search_summary.json); `RUN/population.json` holds each
member's seed, ss_factor and genotype and the members' agreement per edge;
`RUN/search_checkpoints` the population's checkpoints (resume as for a solo search).
"""

import contextlib
import copy
import dataclasses
import functools
import os
import time
from typing import List

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax import checkpoint
from pcp_jax import defaults
from pcp_jax import events
from pcp_jax import genotypes
from pcp_jax import loop
from pcp_jax import monitor
from pcp_jax import parallel
from pcp_jax import runs
from pcp_jax import search
from pcp_jax import search_step
from pcp_jax import spaces
from pcp_jax import union

MEMBERS_DIR = runs.MEMBERS_DIR
POPULATION = runs.POPULATION
METRICS = runs.POPULATION_METRICS  # per epoch: each metric's mean and std over members
HINT = 'Lower search.optim.weights.lr or search.optim.arch.lr (in a new workdir).'
# What a fresh start in a population's folder sets aside (besides a solo search's outputs).
DEVICE_MODES = ('auto', 'members', 'data')
OUTPUTS = runs.SEARCH_OUTPUTS + (MEMBERS_DIR, POPULATION, METRICS)


@dataclasses.dataclass(frozen=True)
class Member:
  index: int
  seed: int
  ss_factor: float


def members(config) -> List[Member]:
  """The population of `config.search.population`: one member per (ss_factor, seed)."""
  pop = config.search.population
  factors = list(pop.ss_factors) or [config.search.ss_factor]
  return [Member(j * pop.seeds + i, config.seed + i, float(f))
          for j, f in enumerate(factors) for i in range(pop.seeds)]


def size(config) -> int:
  """The number of members (1: a solo search)."""
  if 'search' not in config or 'population' not in config.search:
    return 1
  pop = config.search.population
  return pop.seeds * max(len(pop.ss_factors), 1)


def check_config(config) -> None:
  """Validates `search.population` (a solo search passes), naming the option."""
  pop = config.search.population
  seeds = pop.seeds
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise ValueError(f'search.population.seeds must be a whole number >= 1, got {seeds!r}.')
  factors = pop.ss_factors
  if not isinstance(factors, (tuple, list)) or any(
      isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0
      for f in factors):
    raise ValueError('search.population.ss_factors must be numbers in [0, 1] (the sweep; '
                     f'empty: search.ss_factor), got {factors!r}.')
  if len(set(factors)) != len(factors):
    raise ValueError(f'search.population.ss_factors lists a value twice: {list(factors)}.')
  defaults.check_fields(config, whole=[('search.population.members_at_once', 0)])
  if pop.get('devices', 'auto') not in DEVICE_MODES:
    raise ValueError(f'search.population.devices must be one of {list(DEVICE_MODES)}, got '
                     f'{pop.devices!r}.')
  if size(config) == 1:
    return
  cfg, devices = config.search, config.num_devices or jax.device_count()
  if pop.devices == 'members' and size(config) % devices:
    raise ValueError(f'search.population.devices=members splits the {size(config)} members '
                     f'across the {devices} devices: make the member count a multiple of the '
                     'device count, or set it to data (or auto).')
  if cfg.curvature_every or cfg.early_stop != 'none':
    raise ValueError('A population search does not measure curvature or stop early yet: set '
                     'search.curvature_every=0 and search.early_stop=none.')
  first = spaces.initial_switches(cfg.space, cfg.initial_ops)
  if any(first[c][:, genotypes.OPS.index('noise')].any() for c in first) and len(cfg.stages) > 1:
    raise ValueError("A population search's progressive stages cannot hold the 'noise' op "
                     f'(search.space={cfg.space!r}): use one stage.')


def shards_members(config) -> bool:
  """Whether the population's members are split across the devices (module docstring)."""
  devices, mode = config.num_devices or jax.device_count(), config.search.population.devices
  return devices > 1 and (mode == 'members' or mode == 'auto' and size(config) % devices == 0)


def check_search_config(config) -> None:
  """Validates a search config, solo or population (`search.check_config` and the above)."""
  search.check_config(config)
  check_config(config)


def run(config, workdir):
  """The search mode: a solo search (`search.search`) or a population."""
  if size(config) == 1:
    return search.search(config, workdir)
  return search_population(config, workdir)


def run_folders(config, workdir) -> List[str]:
  """The run folders a command on `workdir` wrote: the members' for a population."""
  if size(config) == 1:
    return [workdir]
  return [os.path.join(workdir, MEMBERS_DIR, str(m.index)) for m in members(config)]


def member_config(config, member: Member):
  """The solo search config of `member`."""
  c = copy.deepcopy(config)
  with c.unlocked():
    c.seed = member.seed
    c.search.ss_factor = member.ss_factor
    c.search.population.seeds = 1
    c.search.population.ss_factors = ()
  return c


def _stack(trees):
  return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _member(tree, k):
  return jax.tree_util.tree_map(lambda a: np.asarray(a[k]), tree)


# ---------------------------------------------------------------------------
# The driver.


@dataclasses.dataclass
class Population:
  """The population's shared setup and its members' own (`search.Setup` each)."""
  setup: search.Setup  # the population's: data, mesh, step counts, the run folder
  members: List[Member]
  solo: List[search.Setup]  # each member's, writing into RUN/members/<k>

  @property
  def size(self):
    return len(self.members)

  @property
  def sharded(self) -> bool:
    return shards_members(self.setup.config)

  def place(self, tree):
    """`tree` (a member axis on its arrays) on the devices: split, or on every device."""
    return (parallel.shard_members if self.sharded else parallel.replicate)(tree,
                                                                            self.setup.mesh)

  def hparams(self, s: int, epoch: int, switch_sets) -> search_step.HParams:
    shared = search_step.epoch_hparams(self.setup.cfg.stages[s], epoch)
    dtype = jnp.dtype(self.setup.cfg.dtype)
    return shared.replace(
        ss_factor=jnp.asarray([m.ss_factor for m in self.members], dtype),
        op_mask=union.masks(switch_sets))

  def inputs(self, s: int, epoch: int, switch_sets) -> loop.EpochInputs:
    """Epoch `epoch` of stage `s`: each member's own data order and key (its solo run's)."""
    orders, keys = zip(*[search.epoch_order(m, s, epoch) for m in self.solo])
    return loop.EpochInputs(self.setup.images, self.setup.labels,
                            self.place(jax.tree_util.tree_map(lambda *o: np.stack(o), *orders)),
                            self.place(jnp.stack(keys)),
                            self.place(self.hparams(s, epoch, switch_sets)))

  def build(self, s: int, switch_sets) -> search.Stage:
    stage = self.setup.cfg.stages[s]
    return search.build_stage(self.setup.config, stage.layers, stage.epochs,
                              union.switches(switch_sets), self.setup.info,
                              self.setup.image_shape, self.setup.steps, self.setup.mesh,
                              stage.skip_dropout > 0, members=True, shard_members=self.sharded)

  def init(self, s: int, switch_sets, built: search.Stage):
    """Every member's initial state of stage `s` (its solo run's), stacked."""
    layers = self.setup.cfg.stages[s].layers
    wide = union.switches(switch_sets)
    shapes = jax.eval_shape(built.init, self.setup.stage_keys(s)[0])
    # The projector of a BT population exists in every member (weight 0 where ss_factor 0).
    flag = self.setup.cfg.ss_factor
    states, compiled = [], {}
    for m, sw in zip(self.solo, switch_sets):
      ops = tuple(np.concatenate([sw[c].ravel() for c in genotypes.CELLS]))
      if ops not in compiled:  # one compile per distinct set of ops
        flagged = copy.deepcopy(m.config)
        flagged.search.ss_factor = flag
        init = dataclasses.replace(m, config=flagged).build(s, sw).init
        key = m.stage_keys(s)[0]
        compiled[ops] = parallel.compile_once(init, key)
      solo = compiled[ops](m.stage_keys(s)[0])
      states.append(union.embed(solo, sw, wide, shapes, built.spec, layers))
    return _stack(states)

  def evaluate(self, built: search.Stage, state, s: int, switch_sets) -> List[dict]:
    """Each member's validation means (its solo run's keys)."""
    variables = {'params': state.params, 'arch': state.arch, 'batch_stats': state.batch_stats}
    return loop.evaluate_members(
        built.eval_fn, variables, self.setup.images['valid'], self.setup.labels['valid'],
        self.setup.cfg.eval_batch_size, jnp.stack([m.stage_keys(s)[3] for m in self.solo]),
        union.masks(switch_sets))


def _prepare(config, workdir) -> Population:
  setup = search._prepare(config, workdir)  # pylint: disable=protected-access
  pop = members(config)
  solo = []
  for m in pop:
    c = member_config(config, m)
    solo.append(dataclasses.replace(
        setup, config=c, workdir=os.path.join(workdir, MEMBERS_DIR, str(m.index)),
        root=jax.random.PRNGKey(c.seed),
        fingerprint=checkpoint.fingerprint(c, search.FREE_ON_RESUME)))
  with config.unlocked():  # the step's structure: BT in the program if any member uses it
    config.search.ss_factor = max(m.ss_factor for m in pop)
  return Population(setup, pop, solo)


def _restore_or_start(pop: Population, ckpt):
  setup = pop.setup

  def template(meta):
    switch_sets = [search._switches_from(m) for m in meta['members']]  # pylint: disable=protected-access
    built = pop.build(meta['phase'], switch_sets)
    shapes = jax.eval_shape(built.init, setup.stage_keys(meta['phase'])[0])
    stacked = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((pop.size,) + a.shape, a.dtype), shapes)
    sums = loop.zero_sums(search_step.METRICS, setup.cfg.dtype, pop.size)
    return {'state': checkpoint.zeros_like_shapes(stacked),
            'sums': checkpoint.zeros_like_shapes(sums)}

  restored = checkpoint.restore(ckpt, template, setup.fingerprint, 'population search')
  if restored is None:
    first = spaces.initial_switches(setup.cfg.space, setup.cfg.initial_ops)
    return search.Start(first), [first] * pop.size
  ckpt_step, tree, meta = restored
  stages = setup.cfg.stages
  finished = meta['phase'] == len(stages) - 1 and meta['epoch'] >= stages[-1].epochs
  logging.info(f'The population search in {setup.workdir} is finished (checkpoint '
               f'{ckpt_step}); its results stand, nothing to run.' if finished else
               f'Resuming the population search from checkpoint {ckpt_step}: stage '
               f'{meta["phase"] + 1}, epoch {meta["epoch"] + 1}, step {meta["step"]}.')
  switch_sets = [search._switches_from(m) for m in meta['members']]  # pylint: disable=protected-access
  return search.Start(switch_sets[0], meta['phase'], meta['epoch'], meta['step'], tree['state'],
                      tree['sums'] if meta['step'] else None, meta['elapsed_seconds'],
                      finished=finished, saved=meta), switch_sets


def _save(sess, pop: Population, s: int, switch_sets, epoch: int, state, sums, step: int):
  setup = pop.setup
  arch = loop.host(state.arch)
  records = []
  for k, (m, sw) in enumerate(zip(pop.solo, switch_sets)):
    own = union.narrow(_member(arch, k), sw)
    genotype = genotypes.to_dict(search._genotype_of(m, own, sw))  # pylint: disable=protected-access
    if setup.main_process:
      runs.write_json(m.path(runs.GENOTYPE_LATEST), dict(genotype, stage=s + 1, epoch=epoch,
                                                         step=step))
    records.append({'seed': pop.members[k].seed, 'ss_factor': pop.members[k].ss_factor,
                    'genotype': genotype, 'switches_normal': sw['normal'].tolist(),
                    'switches_reduce': sw['reduce'].tolist()})
  sess.save(setup.offsets[s] + epoch * setup.steps + step, state, sums, {
      'config': setup.fingerprint, 'phase': s, 'epoch': epoch, 'step': step,
      'steps_per_epoch': setup.steps, 'members': records})


def _member_sums(sums, k, steps):
  return {name: float(np.asarray(v)[k]) / steps for name, v in jax.device_get(sums).items()}


def _summary_row(rows: List[dict]) -> dict:
  """The population's row of an epoch: each numeric metric's mean and std over members."""
  out = {'stage': rows[0]['stage'], 'epoch': rows[0]['epoch'], 'step': rows[0]['step']}
  for name, value in rows[0].items():
    if isinstance(value, (int, float)) and not isinstance(value, bool) and name not in out:
      values = np.asarray([r[name] for r in rows], np.float64)
      out[f'{name}_mean'], out[f'{name}_std'] = float(values.mean()), float(values.std())
  return out


def _epoch_rows(pop: Population, sess, built, state, sums, switch_sets, where: loop.Epoch,
                writers) -> List[dict]:
  """Each member's row of the epoch `where` (validated; its architecture weights appended
  to its arch_history.jsonl and TensorBoard)."""
  s, epoch, steps = where.stage, where.index, pop.setup.steps
  valid = pop.evaluate(built, state, s, switch_sets)
  arch = loop.host(state.arch)
  lr = float(built.lr_schedule(epoch * steps))
  rows = []
  for k, (m, sw) in enumerate(zip(pop.solo, switch_sets)):
    row = search.arch_row(m, sess, writers[k], s, sw, union.narrow(_member(arch, k), sw),
                          _member_sums(sums, k, steps), valid[k], epoch, lr)
    row.update(step=where.global_step(steps), elapsed_seconds=sess.elapsed_seconds(), member=k)
    rows.append(row)
  return rows


def _rows_from(pop: Population, resume_step: int, saved: dict):
  """The population's and the members' metric rows files, resumed at `resume_step` (rows
  after it cut, a row lost after the checkpoint `saved` restored); each member's
  config.json."""
  main = pop.setup.main_process
  rows = runs.Rows(pop.setup.path(METRICS), main)
  member_rows = [runs.Rows(m.path(runs.SEARCH_METRICS), main) for m in pop.solo]
  loop.resume_rows([rows] + member_rows + [runs.Rows(m.path(runs.ARCH_HISTORY), main)
                                           for m in pop.solo],
                   resume_step, saved, pop.setup.workdir)
  for m in pop.solo:
    monitor.write_config(m.workdir, m.config)
  return rows, member_rows


def _finish(pop: Population, archs, switch_sets, hours: float):
  genotype_list = []
  for k, (m, arch, sw) in enumerate(zip(pop.solo, archs, switch_sets)):
    logging.info('member %d (seed %d, ss_factor %g):', k, pop.members[k].seed,
                 pop.members[k].ss_factor)
    genotype_list.append(search._finish(m, arch, sw, hours / pop.size))  # pylint: disable=protected-access
  if pop.setup.main_process:
    runs.write_json(pop.setup.path(POPULATION), {
        'size': pop.size, 'search_cost_hours': hours,
        'members': [{'member': m.index, 'seed': m.seed, 'ss_factor': m.ss_factor,
                     'folder': os.path.join(MEMBERS_DIR, str(m.index)),
                     'genotype': genotypes.to_dict(g)}
                    for m, g in zip(pop.members, genotype_list)],
        'agreement': union.agreement(genotype_list)})
  return genotype_list


def search_population(config, workdir):
  """Runs the configured population of searches (module docstring); returns the members'
  genotypes. Checkpoints, signals and resume as `search.search`."""
  check_search_config(config)
  config = copy.deepcopy(config)
  pop = _prepare(config, workdir)
  setup, cfg = pop.setup, pop.setup.cfg
  ckpt = checkpoint.Checkpointer(setup.path(runs.SEARCH_CHECKPOINTS),
                                 config.checkpoint.max_to_keep)
  start, switch_sets = _restore_or_start(pop, ckpt)
  if start.finished:  # a rerun writes nothing
    ckpt.close()
    arch = loop.host(start.state.arch)
    return [search._result_genotype(m, union.narrow(_member(arch, k), sw), sw)  # pylint: disable=protected-access
            for k, (m, sw) in enumerate(zip(pop.solo, switch_sets))]
  if start.state is None and setup.main_process:
    runs.set_aside(workdir, OUTPUTS)
  resume_step = setup.offsets[start.stage] + start.epoch * setup.steps + start.step
  rows, member_rows = _rows_from(pop, resume_step, start.saved)
  place = pop.place
  archs = None
  with loop.session(workdir, config, 'search', ckpt=ckpt, rows=rows,
                    what='the population search', hint=HINT,
                    every_steps=config.checkpoint.every_steps,
                    log_every_steps=cfg.log_every_steps, total_steps=setup.offsets[-1],
                    resume_step=resume_step, resumed=start.state is not None,
                    last_rows=start.saved.get('rows', {}),
                    elapsed=start.elapsed) as sess, contextlib.ExitStack() as writers:
    writers = [writers.enter_context(events.Writer(
        m.workdir, 'search', purge_step=resume_step + 1 if start.state is not None else 0))
               for m in pop.solo]
    for s in range(start.stage, len(cfg.stages)):
      stage, t_stage = cfg.stages[s], time.time()
      built = pop.build(s, switch_sets)
      resuming = s == start.stage and start.state is not None
      state = place(start.state if resuming else pop.init(s, switch_sets, built))
      sums = place(start.sums) if resuming and start.sums is not None else None
      logging.info('Stage %d/%d: %d members, %d cells, ops per edge %s (the union: %d), '
                   '%d epochs (%d warm-up).', s + 1, len(cfg.stages), pop.size, stage.layers,
                   sorted({int(sw['normal'][0].sum()) for sw in switch_sets}),
                   int(union.switches(switch_sets)['normal'].sum(axis=1).max()), stage.epochs,
                   stage.warmup_epochs)
      for epoch in range(start.epoch if s == start.stage else 0, stage.epochs):
        t_epoch, where = time.time(), setup.epoch(s, epoch)
        if sums is None:
          sums = place(loop.zero_sums(search_step.METRICS, cfg.dtype, pop.size))
        state, sums = loop.run_epoch(
            sess, built.chunk_fn, state, sums,
            pop.inputs(s, epoch, switch_sets), where, start.step_at(s, epoch),
            save=functools.partial(_save, sess, pop, s, switch_sets, epoch))
        rows_now = _epoch_rows(pop, sess, built, state, sums, switch_sets, where, writers)
        if epoch == 0:
          for row in rows_now:
            row['compile_and_first_epoch_seconds'] = time.time() - t_stage
        for k, row in enumerate(rows_now):
          row.update(epoch_seconds=time.time() - t_epoch)
          logging.info('member %d (seed %d, ss_factor %g):', k, pop.members[k].seed,
                       pop.members[k].ss_factor)
          search_step.log_row(row, len(cfg.stages), stage.epochs)
          sess.write_row(row, member_rows[k], writers[k])
        sess.write_row(_summary_row(rows_now))
        _save(sess, pop, s, switch_sets, epoch + 1, state, sums, 0)
        sess.stop_if_requested()
        sums = None
      arch = loop.host(state.arch)
      archs = [union.narrow(_member(arch, k), sw) for k, sw in enumerate(switch_sets)]
      switch_sets = [search._end_stage(m, s, a, sw)  # pylint: disable=protected-access
                     for m, a, sw in zip(pop.solo, archs, switch_sets)]
  genotype_list = _finish(pop, archs, switch_sets, sess.work_seconds() / 3600)
  ckpt.close()
  return genotype_list
