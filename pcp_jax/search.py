"""The architecture search: PC-DARTS, P-DARTS, PCP-DARTS and SS PCP-DARTS in one code path.

A search is a list of stages (`config.search.stages`). Each stage builds a fresh supernet over
the ops still on, trains it with the paper's step (`search_step`: an architecture step on a
validation batch, then a weight step on a training batch) and, at its end, keeps the
`num_keep` strongest ops per edge. `search` reads top to bottom: restore or start, then for
each stage its epochs, then the genotype.
"""

import dataclasses
import functools
import os
import time
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from pcp_jax import checkpoint
from pcp_jax import collapse
from pcp_jax import data as data_lib
from pcp_jax import defaults
from pcp_jax import diagrams
from pcp_jax import genotypes
from pcp_jax import loop
from pcp_jax import models
from pcp_jax import optim
from pcp_jax import parallel
from pcp_jax import runs
from pcp_jax import search_step
from pcp_jax import spaces
from pcp_jax import supernet

# Config fields that may differ between a run and its resumption (everything else must match).
FREE_ON_RESUME = ('checkpoint.', 'num_devices', 'op_impl', 'modes', 'data.dir', 'data.download',
                  'search.log_every_steps', 'method', 'memory_check', 'search.population.devices')


def check_config(config):
  """Validates the search config, naming the option and the allowed values."""
  cfg = config.search
  search_step.check_config(config)
  defaults.check_fields(
      config, whole=(('search.channels', 1), ('search.max_skip_normal', -1),
                     ('search.batch_size', 2), ('search.eval_batch_size', 1),
                     ('search.log_every_steps', 0)),
      booleans=('search.use_betas',))
  if cfg.channel_mode not in supernet.CHANNEL_MODES:
    raise ValueError(f'search.channel_mode must be one of {supernet.CHANNEL_MODES}, '
                     f'got {cfg.channel_mode!r}.')
  if cfg.partial_k < 1 or cfg.channels % cfg.partial_k:
    raise ValueError(f'search.partial_k must be >= 1 and divide search.channels '
                     f'({cfg.channels}), got {cfg.partial_k}.')
  if not cfg.stages:
    raise ValueError('search.stages must list at least one stage.')
  unknown = set(cfg.initial_ops) - set(genotypes.OPS)
  if unknown or not cfg.initial_ops:
    raise ValueError(f'search.initial_ops must be a non-empty subset of '
                     f'{genotypes.OPS}, got {list(cfg.initial_ops)}.')
  ops_on = spaces.ops_per_edge(cfg.space, cfg.initial_ops)
  collapse.check_config(config)
  for i, stage in enumerate(cfg.stages):
    if stage.layers < 3:
      raise ValueError(f'search.stages[{i}].layers must be >= 3, got {stage.layers}.')
    if stage.epochs < 1 or not 0 <= stage.warmup_epochs <= stage.epochs:
      raise ValueError(f'search.stages[{i}]: need epochs >= 1 and 0 <= warmup_epochs <= '
                       f'epochs, got {stage.epochs} and {stage.warmup_epochs}.')
    if not 1 <= stage.num_keep <= ops_on:
      raise ValueError(f'search.stages[{i}].num_keep must be in 1..{ops_on} (the ops on '
                       f'before this stage), got {stage.num_keep}.')
    if not 0.0 <= stage.skip_dropout < 1.0:
      raise ValueError(f'search.stages[{i}].skip_dropout must be in [0, 1), '
                       f'got {stage.skip_dropout}.')
    ops_on = stage.num_keep


@dataclasses.dataclass
class Stage:
  """A search stage built: its step's static pieces, initial state and compiled functions."""
  spec: search_step.StepSpec
  init: Callable  # key -> SearchState, not jitted
  lr_schedule: Callable  # optimiser step -> the weights' learning rate
  chunk_fn: Any  # loop.make_chunk_fn of the search step
  eval_fn: Any  # loop.make_eval_fn of the supernet
  curvature_fn: Any  # collapse.make_curvature_fn of the supernet; None when not measured


@parallel.reused  # a stage built again in this process (another seed) is the one built before
def build_stage(config, layers: int, epochs: int, switches, info: data_lib.DatasetInfo,
                image_shape, steps_per_epoch: int, mesh, skip_dropout: bool = True,
                members: bool = False, shard_members: bool = False) -> Stage:
  """A fresh supernet of `layers` cells over the ops `switches` leave on, its Barlow Twins
  projector and optimisers, and the jitted data-parallel chunk and evaluation functions.
  `skip_dropout` False (a stage whose rate is 0) compiles the step without the masks.
  `members`: a population's stage (`population`): the supernet has a column per op
  (`wide_arch`), the chunk and evaluation functions a leading member axis (split across the
  mesh with `shard_members`; `members_at_once` of them together: `loop.make_chunk_fn`)."""
  cfg = config.search
  dtype, devices = jnp.dtype(cfg.dtype), 1 if shard_members else mesh.size
  model = models.search_network(config, layers, switches, info.num_classes, devices, dtype,
                                members)
  projector = models.projector(config, devices)
  tx_weights, lr_schedule = optim.make(cfg.optim.weights, epochs, steps_per_epoch)
  optimizers = (tx_weights, optim.make(cfg.optim.arch)[0], optim.make(cfg.optim.projector)[0])
  spec = search_step.StepSpec.from_config(cfg, model, projector, optimizers, info.mean,
                                          info.std, devices, skip_dropout)
  init = functools.partial(  # the projector on 4 nodes x 4C
      search_step.init_state, model=model, projector=projector, optimizers=optimizers,
      image_shape=tuple(image_shape), projector_inputs=cfg.channels * 16, ss_factor=cfg.ss_factor)
  if dtype != jnp.float32:  # weights start as float32 ones (the same draws), then widen
    init = functools.partial(_widened, init, dtype)
  step_fn = functools.partial(search_step.search_step, spec=spec)
  at_once, member_mesh = cfg.population.members_at_once, mesh if shard_members else None
  eval_fn = loop.make_eval_fn(model, info.mean, info.std, members, member_mesh, at_once)
  return Stage(spec=spec, init=init, lr_schedule=lr_schedule,
               chunk_fn=loop.make_chunk_fn(step_fn, cfg.batch_size, mesh, members,
                                           shard_members, at_once),
               eval_fn=eval_fn if members else parallel.CompiledOnFirstCall(eval_fn),
               curvature_fn=collapse.make_curvature_fn(model, info.mean, info.std,
                                                       cfg.curvature_steps)
               if cfg.curvature_every and not members else None)


def _widened(init, dtype, key):
  return jax.tree_util.tree_map(lambda a: a.astype(dtype) if a.dtype == jnp.float32 else a,
                                init(key))


# ---------------------------------------------------------------------------
# The search driver.


@dataclasses.dataclass
class Setup:
  """What every stage of one search shares: the data on the devices, the step counts, keys."""
  config: Any
  workdir: str
  mesh: Any
  info: data_lib.DatasetInfo
  images: dict  # {'train', 'valid'}: on every device
  labels: dict
  sizes: dict  # {'train', 'valid'}: images per split
  image_shape: tuple
  steps: int  # per epoch
  offsets: list  # global step of each stage's first step
  root: Any  # the run's key
  main_process: bool
  fingerprint: dict  # the config fields a resume must agree with

  @property
  def cfg(self):
    return self.config.search

  def stage_keys(self, s):
    """(init, steps, order, eval) keys of stage `s`."""
    return jax.random.split(jax.random.fold_in(self.root, s), 4)

  def build(self, s, switches) -> Stage:
    stage = self.cfg.stages[s]
    return build_stage(self.config, stage.layers, stage.epochs, switches, self.info,
                       self.image_shape, self.steps, self.mesh, stage.skip_dropout > 0)

  def path(self, name):
    return os.path.join(self.workdir, name)

  def epoch(self, s: int, epoch: int) -> loop.Epoch:
    """Epoch `epoch` of stage `s`, for the loop's messages and global steps."""
    n = len(self.cfg.stages)
    return loop.Epoch(f'stage {s + 1}/{n}', epoch, self.cfg.stages[s].epochs, self.steps,
                      self.offsets[s] + epoch * self.steps, s, n)


def _prepare(config, workdir) -> Setup:
  cfg = config.search
  mesh = parallel.make_mesh(config.num_devices)
  parallel.check_batch(cfg.batch_size, mesh.size, 'search.batch_size')
  os.makedirs(workdir, exist_ok=True)
  (w_x, w_y), (a_x, a_y), info = data_lib.search_splits(config)
  steps = min(len(w_x), len(a_x)) // cfg.batch_size
  if steps < 1:
    raise ValueError(f'search.batch_size ({cfg.batch_size}) is larger than the search '
                     f'splits ({len(w_x)} / {len(a_x)} images).')
  images, labels = parallel.replicate(({'train': w_x, 'valid': a_x}, {
      'train': w_y.astype(np.int32), 'valid': a_y.astype(np.int32)}), mesh)
  offsets = np.cumsum([0] + [st.epochs * steps for st in cfg.stages]).tolist()
  logging.info('Search %s on %s: %d + %d images, %d steps per epoch, %d stage(s), %d '
               'device(s).', config.get('method', 'search'), info.name, len(w_x), len(a_x),
               steps, len(cfg.stages), mesh.size)
  return Setup(config=config, workdir=workdir, mesh=mesh, info=info, images=images,
               labels=labels, sizes={'train': len(w_x), 'valid': len(a_x)},
               image_shape=tuple(w_x.shape[1:]), steps=steps, offsets=offsets,
               root=jax.random.PRNGKey(config.seed), main_process=parallel.is_main_process(),
               fingerprint=checkpoint.fingerprint(config, FREE_ON_RESUME))


@dataclasses.dataclass
class Start:
  """Where a session starts: stage, epoch, step, switches; when resuming, the state and sums."""
  switches: dict  # {'normal', 'reduce'}: (14, NUM_OPS) booleans
  stage: int = 0
  epoch: int = 0
  step: int = 0
  state: Any = None
  sums: Any = None
  elapsed: float = 0.0
  collapse: Any = dataclasses.field(default_factory=lambda: collapse.History())
  finished: bool = False  # the checkpoint is the search's last (or a stopping rule's)
  saved: dict = dataclasses.field(default_factory=dict)  # the checkpoint's metadata

  def step_at(self, s: int, epoch: int) -> int:
    """The step epoch `epoch` of stage `s` starts at in this session."""
    return self.step if (s, epoch) == (self.stage, self.epoch) else 0


def _switches_from(meta):  # (14, 8) ones of earlier runs gain the noise column
  return {c: genotypes.check_switches(meta[f'switches_{c}']) for c in genotypes.CELLS}


def _restore_or_start(setup: Setup, ckpt) -> Start:
  def template(meta):
    init = setup.build(meta['phase'], _switches_from(meta)).init
    shapes = jax.eval_shape(init, setup.stage_keys(meta['phase'])[0])
    return {'state': checkpoint.zeros_like_shapes(shapes),
            'sums': checkpoint.zeros_like_shapes(loop.zero_sums(search_step.METRICS,
                                                           setup.cfg.dtype))}

  restored = checkpoint.restore(ckpt, template, setup.fingerprint, 'search')
  if restored is None:
    return Start(spaces.initial_switches(setup.cfg.space, setup.cfg.initial_ops))
  ckpt_step, tree, meta = restored
  history = collapse.History.from_meta(meta.get('collapse'))
  stages = setup.cfg.stages
  finished = history.stopped or (meta['phase'] == len(stages) - 1
                                 and meta['epoch'] >= stages[-1].epochs)
  logging.info(f'The search in {setup.workdir} is finished (checkpoint {ckpt_step}); its '
               'results stand, nothing to run.' if finished else
               f'Resuming the search from checkpoint {ckpt_step}: stage {meta["phase"] + 1}, '
               f'epoch {meta["epoch"] + 1}, step {meta["step"]}.')
  return Start(_switches_from(meta), meta['phase'], meta['epoch'], meta['step'],
               tree['state'], tree['sums'] if meta['step'] else None, meta['elapsed_seconds'],
               history, finished, meta)


def epoch_order(setup: Setup, s: int, epoch: int):
  """Epoch `epoch` of stage `s`: a permutation of each split and the epoch's step key."""
  _, k_steps, k_order, _ = setup.stage_keys(s)
  k_epoch = jax.random.fold_in(k_order, epoch)
  order = {split: jax.random.permutation(jax.random.fold_in(k_epoch, i), setup.sizes[split])
           for i, split in enumerate(('train', 'valid'))}
  return order, jax.random.fold_in(k_steps, epoch)


def _epoch_inputs(setup: Setup, s: int, epoch: int) -> loop.EpochInputs:
  """Epoch `epoch` of stage `s`: its order and key (`epoch_order`), its hyperparameters."""
  order, key = epoch_order(setup, s, epoch)
  return loop.EpochInputs(setup.images, setup.labels, parallel.replicate(order, setup.mesh),
                          key, search_step.epoch_hparams(setup.cfg.stages[s], epoch))


def _genotype_of(setup: Setup, arch, switches, **kwargs):
  return genotypes.derive_genotype(arch, setup.cfg.use_betas, switches['normal'],
                                   switches['reduce'], **kwargs)


def _save(sess: loop.Session, setup: Setup, s: int, switches, history, epoch: int, state,
          sums, step: int) -> None:
  """The search's checkpoint at step `step` of stage `s`'s epoch `epoch` (step 0 of epoch
  e + 1 after epoch e's end), and genotype_latest.json."""
  genotype = genotypes.to_dict(_genotype_of(setup, loop.host(state.arch), switches))
  if setup.main_process:
    runs.write_json(setup.path(runs.GENOTYPE_LATEST), dict(genotype, stage=s + 1, epoch=epoch,
                                                           step=step))
  sess.save(setup.offsets[s] + epoch * setup.steps + step, state, sums, {
      'config': setup.fingerprint, 'phase': s, 'epoch': epoch,
      'step': step, 'steps_per_epoch': setup.steps, 'genotype': genotype,
      'switches_normal': switches['normal'].tolist(),
      'switches_reduce': switches['reduce'].tolist(), 'collapse': history.to_meta()})


def _epoch_row(setup: Setup, sess: loop.Session, built: Stage, s: int, switches, state,
               means: dict, epoch: int) -> dict:
  """Validates, appends the architecture weights to arch_history.jsonl and TensorBoard, and
  returns the epoch's metric row."""
  cfg, stage = setup.cfg, setup.cfg.stages[s]
  valid = loop.evaluate(built.eval_fn, {'params': state.params, 'arch': state.arch,
                                        'batch_stats': state.batch_stats},
                        setup.images['valid'], setup.labels['valid'], cfg.eval_batch_size,
                        setup.stage_keys(s)[3])
  row = arch_row(setup, sess, sess.tensorboard, s, switches, loop.host(state.arch), means,
                 valid, epoch, float(built.lr_schedule(epoch * setup.steps)))
  if built.curvature_fn is not None and collapse.due(epoch, stage.epochs, cfg.curvature_every):
    row.update(collapse.measure(built.curvature_fn, state, setup.images['valid'],
                                setup.labels['valid'], cfg.curvature_batch,
                                jax.random.fold_in(setup.stage_keys(s)[3], 1_000_000 + epoch)))
  return row


def arch_row(setup: Setup, sess: loop.Session, tensorboard, s: int, switches, arch,
             means: dict, valid: dict, epoch: int, lr: float) -> dict:
  """Epoch `epoch`'s metric row of stage `s` from the step's means, the validation means and
  the architecture weights `arch` (over the ops `switches` leave on); appends the weights to
  arch_history.jsonl (through `sess`, for its checkpoints) and TensorBoard (`tensorboard`)."""
  stage = setup.cfg.stages[s]
  global_step = setup.offsets[s] + (epoch + 1) * setup.steps
  weights = genotypes.arch_weights(arch, switches, setup.cfg.use_betas)
  sess.append(runs.Rows(setup.path(runs.ARCH_HISTORY), setup.main_process),
              dict(stage=s + 1, epoch=epoch + 1, step=global_step, **weights))
  tensorboard.write_arch(global_step, weights)
  genotype = genotypes.to_dict(_genotype_of(setup, arch, switches))
  return dict(stage=s + 1, epoch=epoch + 1, layers=stage.layers,
              ops_per_edge=int(switches['normal'][0].sum()), **means,
              valid_loss=valid['loss'], valid_acc=valid['accuracy'], lr=lr,
              skip_dropout=search_step.skip_dropout_rate(stage.skip_dropout, epoch,
                                                         stage.epochs, stage.warmup_epochs),
              arch_frozen=epoch < stage.warmup_epochs, genotype=genotype,
              **collapse.indicators(weights, genotype))


def _end_stage(setup: Setup, s: int, arch, switches):
  """Writes stage `s`'s architecture weights; the switches of the next stage (P-DARTS: the
  `num_keep` strongest ops of each edge), logged per edge."""
  if setup.main_process:
    np.savez(setup.path(runs.ARCH_STAGE.format(s + 1)), **arch,
             switches_normal=switches['normal'], switches_reduce=switches['reduce'])
  if s == len(setup.cfg.stages) - 1:
    return switches
  kept = {cell: genotypes.drop_weakest_ops(arch[f'alphas_{cell}'], switches[cell],
                                           setup.cfg.stages[s].num_keep)
          for cell in genotypes.CELLS}
  for cell in genotypes.CELLS:
    logging.info('Stage %d dropped from the %s cell: %s', s + 1, cell,
                 genotypes.describe_dropped(switches[cell], kept[cell]))
  return kept


def _result_genotype(setup: Setup, arch, switches, decision=None):
  """The genotype the search returns: a stopping rule's choice (action 'stop'), else `arch`'s
  with the P-DARTS skip limit applied."""
  if decision is not None and decision['action'] == 'stop':
    return genotypes.from_dict(decision['genotype'])
  max_skip = setup.cfg.max_skip_normal if setup.cfg.max_skip_normal >= 0 else None
  return _genotype_of(setup, arch, switches, max_skip_normal=max_skip)


def _finished(setup: Setup, start: Start):
  """A finished search, rerun: writes nothing, unless an output of its end went missing."""
  arch, outputs = loop.host(start.state.arch), (runs.GENOTYPE, runs.SEARCH_SUMMARY,
                                                 runs.ARCH_WEIGHTS)
  if setup.main_process and not all(os.path.isfile(setup.path(n)) for n in outputs):
    return _finish(setup, arch, start.switches, start.elapsed / 3600, start.collapse.decision)
  genotype = _result_genotype(setup, arch, start.switches, start.collapse.decision)
  logging.info('genotype = %s', genotypes.to_string(genotype))
  return genotype


def _finish(setup: Setup, arch, switches, hours, decision=None):
  """Writes genotype.json, arch.npz, the cell diagrams and search_summary.json."""
  cfg = setup.cfg
  genotype = _result_genotype(setup, arch, switches, decision)
  device = jax.devices()[0]
  if setup.main_process:
    genotypes.save(genotype, setup.path(runs.GENOTYPE))
    np.savez(setup.path(runs.ARCH_WEIGHTS), **arch, switches_normal=switches['normal'],
             switches_reduce=switches['reduce'])
    diagrams.plot_genotype(genotype, setup.workdir)
    runs.write_json(setup.path(runs.SEARCH_SUMMARY), {
        'method': setup.config.get('method', 'search'), 'dataset': setup.info.name,
        'seed': setup.config.seed, 'ss_factor': cfg.ss_factor, 'bt_scale': cfg.bt_scale,
        'genotype': genotypes.to_dict(genotype), 'space': cfg.space, 'early_stop': decision,
        'search_cost_hours': hours, 'search_cost_days': hours / 24,
        'device_count': setup.mesh.size, 'process_count': jax.process_count(),
        'platform': device.platform, 'device_kind': device.device_kind})
  unit = device.platform.upper() if device.platform != 'gpu' else 'GPU'
  logging.info('Search done in %.3f %s-hours (%.4f %s-days). genotype = %s', hours, unit,
               hours / 24, unit, genotypes.to_string(genotype))
  return genotype


def search(config, workdir):
  """Runs the configured search and writes genotype.json, metrics, arch weights, diagrams.

  Checkpoints (`workdir/search_checkpoints`) are written every `config.checkpoint.every_steps`
  steps and at the end of every epoch; rerunning the same config on the same workdir resumes
  from the newest checkpoint that restores and finishes with the same genotype and
  architecture weights as an uninterrupted run (`loop`: signals, non-finite losses).
  """
  check_config(config)
  setup = _prepare(config, workdir)
  cfg = setup.cfg
  ckpt = checkpoint.Checkpointer(setup.path(runs.SEARCH_CHECKPOINTS),
                                 config.checkpoint.max_to_keep)
  start = _restore_or_start(setup, ckpt)
  if start.state is None and setup.main_process:
    runs.set_aside(workdir, runs.SEARCH_OUTPUTS)
  resume_step = setup.offsets[start.stage] + start.epoch * setup.steps + start.step
  rows, _ = files = [runs.Rows(setup.path(name), setup.main_process)
                     for name in (runs.SEARCH_METRICS, runs.ARCH_HISTORY)]
  loop.resume_rows(files, resume_step, start.saved, workdir)
  if start.finished:
    ckpt.close()
    return _finished(setup, start)
  switches, place = start.switches, functools.partial(parallel.replicate, mesh=setup.mesh)
  history, arch = start.collapse, None if start.state is None else loop.host(start.state.arch)
  with loop.session(workdir, config, 'search', ckpt=ckpt, rows=rows, what='the search',
                    hint='Lower search.optim.weights.lr or search.optim.arch.lr (in a new '
                         'workdir).', every_steps=config.checkpoint.every_steps,
                    log_every_steps=cfg.log_every_steps, last_rows=start.saved.get('rows', {}),
                    total_steps=setup.offsets[-1], resume_step=resume_step,
                    resumed=start.state is not None, elapsed=start.elapsed) as sess:
    for s in range(start.stage, len(cfg.stages) * (not history.stopped)):
      stage, t_stage = cfg.stages[s], time.time()
      built = setup.build(s, switches)
      resuming = s == start.stage and start.state is not None
      history = history if resuming else history.next_stage()
      state = place(start.state if resuming else parallel.run_once(built.init,
                                                                   setup.stage_keys(s)[0]))
      sums = place(start.sums) if resuming and start.sums is not None else None
      logging.info('Stage %d/%d: %d cells, %d ops per edge, %d epochs (%d warm-up).', s + 1,
                   len(cfg.stages), stage.layers, int(switches['normal'][0].sum()),
                   stage.epochs, stage.warmup_epochs)
      for epoch in range(start.epoch if s == start.stage else 0, stage.epochs):
        t_epoch, where = time.time(), setup.epoch(s, epoch)
        state, sums = loop.run_epoch(
            sess, built.chunk_fn, state,
            place(loop.zero_sums(search_step.METRICS, cfg.dtype)) if sums is None else sums,
            _epoch_inputs(setup, s, epoch), where, start.step_at(s, epoch),
            save=functools.partial(_save, sess, setup, s, switches, history, epoch))
        row = _epoch_row(setup, sess, built, s, switches, state,
                         loop.means(sums, setup.steps), epoch)
        if epoch == 0:
          row['compile_and_first_epoch_seconds'] = time.time() - t_stage
        row.update(step=where.global_step(setup.steps), epoch_seconds=time.time() - t_epoch,
                   elapsed_seconds=sess.elapsed_seconds())
        search_step.log_row(row, len(cfg.stages), stage.epochs)
        sess.write_row(row)
        history.update(cfg, row, genotypes.to_dict(
            _result_genotype(setup, loop.host(state.arch), switches)), s)
        _save(sess, setup, s, switches, history, epoch + 1, state, sums, 0)
        sess.stop_if_requested()
        sums = None
        if history.stopped:
          break
      arch = loop.host(state.arch)
      if not history.stopped:
        switches = _end_stage(setup, s, arch, switches)
  genotype = _finish(setup, arch, switches, sess.work_seconds() / 3600, history.decision)
  ckpt.close()
  return genotype
