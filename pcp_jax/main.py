"""Command-line entry point: `python -m pcp_jax.main --config=configs/ss_pcp.py --workdir=DIR`.

Runs the modes listed in `config.modes` (comma separated) in order: `search` for the search
configs; `train`, `test`, `fgsm` for the train configs.
"""

import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from pcp_jax import search
from pcp_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and results.')
flags.mark_flags_as_required(['config', 'workdir'])

MODES = {'search': search.search, **train.MODES}


def run(config, workdir):
  """Runs every mode of `config.modes` on `workdir` (also callable from a notebook)."""
  modes = [m.strip() for m in config.modes.split(',') if m.strip()]
  unknown = [m for m in modes if m not in MODES]
  if unknown or not modes:
    raise ValueError(f'config.modes must be a comma list of {sorted(MODES)}, '
                     f'got {config.modes!r}.')
  for mode in modes:
    MODES[mode](config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.INFO)
  # Compiling a supernet step takes minutes; reruns and resumes reuse the compiled programs.
  if not jax.config.jax_compilation_cache_dir:
    jax.config.update('jax_compilation_cache_dir',
                      os.path.join(os.path.expanduser('~'), '.cache', 'pcp_jax', 'xla'))
  logging.info('JAX devices: %s', jax.devices())
  run(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  app.run(main)
