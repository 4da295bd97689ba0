"""The config files by name: `--config=ss_pcp:tiny` for `configs/ss_pcp.py:tiny`, from a
checkout or an installed package (its copy of configs/ as `pcp_jax.configs`)."""

import importlib.util
import os
from typing import Sequence


def configs_dir() -> str:
  """The config files: the checkout's configs/ beside the package, or the copy installed with
  it as `pcp_jax.configs` (pyproject.toml)."""
  here = os.path.dirname(os.path.abspath(__file__))
  checkout = os.path.join(os.path.dirname(here), 'configs')
  return checkout if os.path.isfile(os.path.join(checkout, 'pcp.py')) else os.path.join(
      here, 'configs')


def config_names() -> list:
  return sorted(f[:-3] for f in os.listdir(configs_dir())
                if f.endswith('.py') and not f.startswith('_'))


def config_file(value: str) -> str:
  """A config flag's value with a bare config name (`ss_pcp`, `pc_darts:tiny`) made the path of
  that config file (`configs_dir`); a path (with a `/` or `.py`) is returned as it is."""
  name, colon, arg = value.partition(':')
  if not name or '/' in name or os.sep in name or name.endswith('.py'):
    return value
  if name not in config_names():
    raise ValueError(f'config {name!r} is neither a file nor a config name '
                     f'({", ".join(config_names())}).')
  return os.path.join(configs_dir(), f'{name}.py') + colon + arg


def config_args(argv: Sequence[str], flags=('config', 'train_config')) -> list:
  """`argv` with the config names of `--<flag>=NAME` and `--<flag> NAME` made paths."""
  out = list(argv)
  for i, a in enumerate(out):
    for flag in flags:
      if a.startswith(f'--{flag}='):
        out[i] = f'--{flag}=' + config_file(a.split('=', 1)[1])
      elif a == f'--{flag}' and i + 1 < len(out):
        out[i + 1] = config_file(out[i + 1])
  return out


def load(spec: str):
  """The config a `--config` value names (`pcp:tiny,seeds=2`, `configs/pcp.py:tiny`), loaded
  as `--config` loads it."""
  path, _, arg = config_file(spec).partition(':')
  if not os.path.isfile(path):
    raise ValueError(f'config file {path!r} does not exist.')
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()
