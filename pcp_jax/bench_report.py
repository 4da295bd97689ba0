"""What the benchmark's results say (`bench`): the projected search, the collapse meter's cost,
populations against solo runs, the markdown table."""

import numpy as np

from pcp_jax import data


def search_steps_per_epoch(config, batch_size):
  """Steps per search epoch on the configured split of the dataset's full training set."""
  n = config.data.max_train or data.DATASETS[config.data.dataset].train_size
  n_weights = int(config.data.train_portion * n)
  return min(n_weights, n - n_weights) // batch_size


def project_search(search_config, results):
  """Per batch size, the sum over stages of compile + warm-up epochs x steps x frozen step time
  + other epochs x steps x step time: no evaluation, data loading or checkpoints."""
  projections, stages = [], search_config.search.stages
  for b in sorted({r['batch_size'] for r in results if r['what'] == 'search'}):
    timed = {r['stage']: r for r in results if r['what'] == 'search' and r['batch_size'] == b
             and not r.get('population')}
    steps = search_steps_per_epoch(search_config, b)
    seconds = sum(timed[s]['compile_seconds'] + steps * (
        st.warmup_epochs * timed[s]['seconds_per_step_frozen_arch']
        + (st.epochs - st.warmup_epochs) * timed[s]['seconds_per_step'])
                  for s, st in enumerate(stages))
    n = timed[0]['devices']
    projections.append(dict(batch_size=b, steps_per_epoch=steps, devices=n,
                            hours=seconds / 3600, device_days=seconds * n / 86400))
  return projections


def curvature_costs(search_config, results):
  """Per timed search case with a timed curvature case of the same stage (the meter on its
  `search.curvature_batch` images): one estimate in search steps and as a share of the search
  time between two estimates (`search.curvature_every` epochs of the full split at the search
  case's batch, RobustDARTS's 2 when 0)."""
  every = search_config.search.curvature_every or 2
  costs = []
  for step in results:
    meter = next((r for r in results if r['what'] == 'curvature' and 'seconds_per_step' in r
                  and r['stage'] == step['stage']), None)
    if (step['what'] != 'search' or 'seconds_per_step' not in step or meter is None
        or step.get('population')):
      continue
    steps = search_steps_per_epoch(search_config, step['batch_size'])
    history = np.asarray(meter['curvature_history'])
    close = np.abs(history - history[-1]) <= 1e-3 * np.abs(history[-1])
    costs.append(dict(
        case=meter['case'], batch_size=step['batch_size'], meter_batch=meter['batch_size'],
        every_epochs=every, steps_per_epoch=steps, products=len(history),
        estimate_seconds=meter['seconds_per_step'],
        estimate_in_steps=meter['seconds_per_step'] / step['seconds_per_step'],
        share=meter['seconds_per_step'] / (every * steps * step['seconds_per_step']),
        products_to_1e3=int(np.argmax(close)) + 1))
  return costs


def population_gains(results):
  """Per timed population case with its timed solo case (same stage and batch, and config and
  dtype where the results name them): the members' summed img/s against N solo runs one after
  another (the solo case's img/s)."""
  gains, same = [], ('stage', 'batch_size', 'config', 'dtype')
  for r in results:
    solo = next((s for s in results if s.get('what') == 'search' and not s.get('population')
                 and 'seconds_per_step' in s and all(s.get(k) == r.get(k) for k in same)),
                None)
    if r.get('population') and 'seconds_per_step' in r and solo is not None:
      gains.append(dict(case=r['case'], op_impl=r.get('op_impl'), batch_size=r['batch_size'],
                        members=r['population'],
                        images_per_second=r['images_per_second'],
                        solo_images_per_second=solo['images_per_second'],
                        ratio=r['images_per_second'] / solo['images_per_second'],
                        xla_buffer_bytes=r['xla_buffer_bytes'],
                        solo_xla_buffer_bytes=solo['xla_buffer_bytes']))
  return gains


def size(n):
  """Bytes as GiB or MiB ('-' for none)."""
  return '-' if n is None else (f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB')


def markdown_table(results):
  kind = next((r['memory_kind'] for r in results if 'memory_kind' in r), 'RSS')
  rows = [('case', 'batch', 'img/s', 's/step', 'init s', 'compile s', f'peak {kind}',
           'XLA buffers'), ('---',) + ('---:',) * 7]
  for r in results:
    if 'error' in r:
      rows.append((r['case'], r['batch_size'], r['error'][:80]) + ('-',) * 5)
      continue
    timed = 'seconds_per_step' in r
    rows.append((r['case'], r['batch_size'], f"{r['images_per_second']:.1f}" if timed else '-',
                 f"{r['seconds_per_step']:.4g}" if timed else '-', f"{r['init_seconds']:.1f}",
                 f"{r['compile_seconds']:.1f}", size(r['peak_memory_bytes']),
                 size(r['xla_buffer_bytes'])))
  return '\n'.join('| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows)


def population_lines(gains, members: int, factor: float):
  """Markdown of `population_gains`, and whether `members` members reach `factor` times one
  search's img/s (the GPU check's goal)."""
  if not gains:
    return []
  lines = ['', '## Populations', '',
           'N searches as one program (`pcp_jax.bench --population=N`): the img/s summed over the '
           'members against one search, i.e. against N searches run one after another.', '',
           '| case | batch | members | img/s | solo img/s | ratio | XLA buffers | solo buffers |',
           '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |']
  for g in gains:
    kernels = f" ({g['op_impl']} kernels)" if g.get('op_impl') else ''
    lines.append(f"| {g['case']}{kernels} | {g['batch_size']} | {g['members']} | "
                 f"{g['images_per_second']:.1f} | {g['solo_images_per_second']:.1f} | "
                 f"{g['ratio']:.2f}x | {size(g['xla_buffer_bytes'])} | "
                 f"{size(g['solo_xla_buffer_bytes'])} |")
  best = max((g['ratio'] for g in gains if g['members'] == members), default=None)
  lines += ['', f'Goal, {members} members at {factor:g}x one search: ' + (
      'not measured.' if best is None else
      f"**{'met' if best >= factor else 'not met'}** ({best:.2f}x at best).")]
  return lines
