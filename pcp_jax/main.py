"""Command-line entry point: `python -m pcp_jax.main --config=configs/ss_pcp.py --workdir=DIR`.

Runs the modes listed in `config.modes` (comma separated) in order: `search` for the search
configs; `train`, `test`, `fgsm` for the train configs. `--distributed` (or
PCP_JAX_DISTRIBUTED=1) joins a multi-process run first; see launch/ and the README.
"""

import contextlib
import logging as stdlib_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pcp_jax import checkpoint
from pcp_jax import config_files
from pcp_jax import defaults
from pcp_jax import loop
from pcp_jax import memory
from pcp_jax import parallel
from pcp_jax import plots
from pcp_jax import population
from pcp_jax import runs
from pcp_jax import train_seeds
from pcp_jax.cpu import host

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.DEFINE_bool(
    'distributed', False,
    'Join a multi-process run with jax.distributed.initialize() before anything else (also on '
    'with PCP_JAX_DISTRIBUTED=1). SLURM, Open MPI and Cloud TPU are detected; elsewhere set '
    'PCP_JAX_COORDINATOR (host:port of process 0), PCP_JAX_NUM_PROCESSES and PCP_JAX_PROCESS_ID.')
flags.mark_flags_as_required(['config', 'workdir'])

MODES = {'search': population.run, 'train': train_seeds.run_train, 'test': train_seeds.test,
         'fgsm': train_seeds.fgsm}
DISTRIBUTED_VARS = ('PCP_JAX_COORDINATOR', 'PCP_JAX_NUM_PROCESSES', 'PCP_JAX_PROCESS_ID')


def _int_var(environ, name):
  value = environ[name].strip()
  try:
    return int(value)
  except ValueError:
    raise ValueError(f'{name} must be an integer, got {value!r}.') from None


def distributed_arguments(flag, environ):
  """The jax.distributed.initialize() arguments asked for by `flag` and `environ`, or None."""
  switch = environ.get('PCP_JAX_DISTRIBUTED', '').strip().lower()
  if switch not in ('', '0', '1', 'false', 'true'):
    raise ValueError(f'PCP_JAX_DISTRIBUTED must be 1 or 0, got {environ["PCP_JAX_DISTRIBUTED"]!r}.')
  given = [name for name in DISTRIBUTED_VARS if environ.get(name, '').strip()]
  if not (flag or switch in ('1', 'true')):
    if given:
      # Otherwise N independent runs would write the same workdir.
      raise ValueError(f'{", ".join(given)} set, but distributed initialisation is off: '
                       'pass --distributed or set PCP_JAX_DISTRIBUTED=1.')
    return None
  if not given:
    return {}  # JAX detects SLURM, Open MPI or a Cloud TPU from their own variables.
  missing = [name for name in DISTRIBUTED_VARS if name not in given]
  if missing:
    raise ValueError(f'{", ".join(given)} set without {", ".join(missing)}: set all three, or '
                     'none to let JAX detect SLURM, Open MPI or a Cloud TPU.')
  coordinator = environ['PCP_JAX_COORDINATOR'].strip()
  host, _, port = coordinator.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'PCP_JAX_COORDINATOR must be host:port of process 0, got {coordinator!r}.')
  num_processes = _int_var(environ, 'PCP_JAX_NUM_PROCESSES')
  process_id = _int_var(environ, 'PCP_JAX_PROCESS_ID')
  if num_processes < 1:
    raise ValueError(f'PCP_JAX_NUM_PROCESSES must be at least 1, got {num_processes}.')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'PCP_JAX_PROCESS_ID must be in 0..{num_processes - 1} '
                     f'(PCP_JAX_NUM_PROCESSES={num_processes}), got {process_id}.')
  return {'coordinator_address': coordinator, 'num_processes': num_processes,
          'process_id': process_id}


def initialize_distributed(flag, environ=None):
  """Calls jax.distributed.initialize() if asked; must run before any other JAX call."""
  arguments = distributed_arguments(flag, os.environ if environ is None else environ)
  if arguments is not None:
    jax.distributed.initialize(**arguments)
  return arguments is not None


def use_compilation_cache():
  """Keeps compiled programs in ~/.cache/pcp_jax/xla unless $JAX_COMPILATION_CACHE_DIR is set."""
  # Compiling a supernet step takes minutes; reruns and resumes reuse the compiled programs.
  # JAX reads $JAX_COMPILATION_CACHE_DIR into this setting, so a user's choice wins.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.join(os.path.expanduser('~'), '.cache', 'pcp_jax', 'xla'))


# The config section each mode needs, and its validation.
_NEEDS = {'search': ('search', population.check_search_config),
          'train': ('train', train_seeds.check_train_mode),
          'test': ('train', train_seeds.check_test_mode),
          'fgsm': ('train', train_seeds.check_fgsm_mode)}


def check(config) -> list:
  """The modes of `config.modes`, after checking the config for every one of them."""
  modes = [m.strip() for m in config.modes.split(',') if m.strip()]
  unknown = [m for m in modes if m not in MODES]
  if unknown or not modes:
    raise ValueError(f'config.modes must be a comma list of {sorted(MODES)}, '
                     f'got {config.modes!r}.')
  defaults.check_base(config)
  for mode in modes:
    section, check_section = _NEEDS[mode]
    if section not in config:
      raise ValueError(f'config.modes: mode {mode!r} needs a {section} config (configs/'
                       f'{"pcp.py" if section == "search" else "train_cifar10.py"} and the '
                       f'like), got {config.modes!r}.')
    check_section(config)
  return modes


def check_workdir(workdir) -> None:
  """A workdir that can be a folder this run writes, or a ValueError naming --workdir."""
  runs.check_folder(workdir, '--workdir')


def run(config, workdir):
  """Runs every mode of `config.modes` on `workdir` (also callable from a notebook): the
  config is checked for every mode (and what its steps will need in memory, `memory.check`)
  before the first one starts, and the workdir is locked against a second run."""
  modes = check(config)
  check_workdir(workdir)
  memory.check(config, modes)
  lock = (checkpoint.WorkdirLock(workdir) if parallel.is_main_process()
          else contextlib.nullcontext())
  with lock:
    for mode in modes:
      logging.info('Mode %s in %s', mode, workdir)
      MODES[mode](config, workdir)
    if parallel.is_main_process():
      run_folders = population.run_folders if 'search' in config else train_seeds.run_folders
      folders = run_folders(config, workdir)
      # A population's own folder gets the members overlaid (`population_plots`).
      population_run = 'search' in config and folders != [workdir]
      for folder in folders + ([workdir] if population_run else []):
        try:
          paths = plots.plot_run(folder)
          logging.info('Plots: %d pictures in %s', len(paths), os.path.dirname(paths[0]))
        except Exception as e:  # pylint: disable=broad-except
          # The run's results are written; a picture that fails must not turn it into an error.
          logging.warning('Could not draw the plots of %s: %s', folder, e)


class _QuietLibraries(stdlib_logging.Filter):
  """Drops the INFO chatter of Orbax (hundreds of lines per run) and JAX's backend probing
  (a missing TPU library, the first line a newcomer saw) unless -v is given, and the
  tracebacks Orbax's threads and asyncio log for a full disk (`main` says it in one line)."""

  def filter(self, record):
    if ('/orbax/' in record.pathname or record.name == 'asyncio') and runs.disk_full(
        record.exc_info[1] if record.exc_info else Exception(record.getMessage())):
      return False
    return record.levelno >= stdlib_logging.WARNING or not (
        '/orbax/' in record.pathname or record.pathname.endswith('xla_bridge.py'))


# What a user can fix gets one line, not a traceback (-v 1 shows the traceback).
USER_ERRORS = (ValueError, OSError, FloatingPointError, checkpoint.WorkdirBusy)


def user_message(error: BaseException, workdir: str) -> str:
  """The one line for an error a user can fix (`USER_ERRORS`, or a full disk anywhere, which
  names what was being written, else the workdir)."""
  code = runs.disk_full(error)
  if code is None:
    return ' '.join(line.strip() for line in str(error).splitlines())
  where = getattr(error, 'filename', None) or os.path.abspath(workdir)
  return (f'{where}: the disk is full ({os.strerror(code)}). Free space on it and rerun the '
          'same command to resume (the checkpoints saved are intact).')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  verbose = FLAGS.verbosity >= 1
  logging.set_verbosity(logging.INFO)
  if not verbose:
    stdlib_logging.getLogger('absl').addFilter(_QuietLibraries())
    logging.get_absl_handler().addFilter(_QuietLibraries())  # JAX logs through its own logger
  initialize_distributed(FLAGS.distributed)
  use_compilation_cache()
  logging.info('JAX process %d of %d; local devices: %s; %d devices in all; compilation cache: %s',
               jax.process_index(), jax.process_count(), jax.local_devices(), jax.device_count(),
               jax.config.jax_compilation_cache_dir)
  if jax.default_backend() == 'cpu':
    logging.info('%s', host.status())
  try:
    run(FLAGS.config, FLAGS.workdir)
  except loop.Interrupted as e:
    logging.warning('%s', e)
    sys.exit(128 + e.signum)
  except Exception as e:  # pylint: disable=broad-except
    if verbose or not (isinstance(e, USER_ERRORS) or runs.disk_full(e)):
      raise
    logging.error('%s', user_message(e, FLAGS.workdir))
    sys.exit(1)


def _plain(error) -> str:
  """An error's own text on one line: ml_collections wraps a KeyError (whose text is a repr,
  quotes and newlines escaped) in an AttributeError."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  text = error.args[0] if error.args and isinstance(error.args[0], str) else str(error)
  lines = [line.strip().strip('"\'') for line in text.splitlines() if line.strip()]
  return ': '.join([lines[0], ' '.join(lines[1:])]) if len(lines) > 1 else ''.join(lines)


def parse_flags(argv):
  """absl's flag parsing; a config file or `--config.*` override that fails (a misspelt field,
  a bad config argument, an unparsable value) is answered in one line. `--config` also takes a
  config by name (`--config=ss_pcp:tiny`, `config_files.config_file`)."""
  if any(a in ('-h', '-?', '--help', '--helpshort', '--helpfull') for a in argv[1:]):
    app.usage(shorthelp='--helpfull' not in argv, writeto_stdout=True)
    print(f'\nConfigs by name or path: {", ".join(config_files.config_names())} '
          f'(--config=ss_pcp, --config=configs/ss_pcp.py).\n\n{defaults.__doc__}')
    sys.exit(0)
  try:
    argv = config_files.config_args(argv, ('config',))
  except ValueError as e:
    sys.exit(f'error: --config: {e}')
  try:
    return FLAGS(argv)
  except flags.IllegalFlagValueError as e:
    # The config file failed to load; absl's message holds its traceback, whose last line is
    # the config's own message.
    sys.exit(f'error: --config: {str(e).strip().splitlines()[-1].strip()}')
  except flags.Error as e:
    sys.exit(f'error: {e} (--helpshort lists the flags)')
  except OSError as e:  # an override of a config file that failed to load (e.g. not found)
    sys.exit(f"error: --config: {' '.join(line.strip() for line in str(e).splitlines())}")
  except (AttributeError, KeyError, TypeError, ValueError, SyntaxError) as e:
    given = ' '.join(a for a in argv[1:] if a.startswith('--config')) or 'none'
    sys.exit(f'error: --config: {_plain(e)} (given: {given}). Overrides name existing fields '
             'and take values of their type, e.g. --config.search.batch_size=64, '
             '--config.search.stages[0].epochs=10, --config.fgsm.eps="(0.0,0.01)".')


def cli():
  """The `pcp-jax` command (`python -m pcp_jax.main`)."""
  host.reexec()  # glibc reads its huge-page tunable only at start-up
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
