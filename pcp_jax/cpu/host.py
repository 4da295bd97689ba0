"""Host memory for XLA:CPU's buffers (Linux, glibc): transparent huge pages, heap trimming,
the memory-optimised scheduler.

Huge pages (glibc >= 2.35):

XLA:CPU maps each call's scratch buffer (gigabytes for a search step) fresh from the kernel
and unmaps it when the call ends, so every call faults it in again, 4 KiB page by page: a
large part of a CPU step. Where transparent
huge pages are on `madvise` (a common default), glibc asks for 2 MiB pages for its large
allocations when started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: 512 times fewer faults.
glibc reads the tunable only when a process starts, so the command-line entry points re-run
themselves with it (`reexec`). PCP_JAX_HUGE_PAGES=0 turns this off; a glibc.malloc.hugetlb
already in GLIBC_TUNABLES is left as it is. A host whose JAX backend will be a GPU or TPU (a
JAX plugin for one installed, unless JAX_PLATFORMS says cpu) runs in one process: its
buffers live on the device, where the tunable changes nothing.
"""

import ctypes
import ctypes.util
import importlib.util
import os
import platform
import re
import sys
from typing import Mapping, Optional

# XLA:CPU's memory-optimised scheduler needs less scratch per call than the default
# (concurrency-optimised) one, at the same speed.
COMPILER_OPTIONS = {'xla_cpu_scheduler_type': 'CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED'}
THP_MODE_PATH = '/sys/kernel/mm/transparent_hugepage/enabled'
TUNABLE = 'glibc.malloc.hugetlb'
SWITCH = 'PCP_JAX_HUGE_PAGES'
MIN_GLIBC = (2, 35)  # the first glibc with the tunable
# Packages that give JAX a GPU or TPU backend.
ACCELERATOR_PLUGINS = ('jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin',
                       'jax_rocm7_plugin', 'libtpu')


def accelerator_backend(environ: Mapping[str, str], find_spec=importlib.util.find_spec) -> bool:
  """Whether JAX will run on a GPU or TPU here, judged without importing JAX:
  JAX_PLATFORMS if set, else whether a GPU/TPU plugin is installed."""
  platforms = environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    return platforms.split(',')[0].strip() not in ('cpu', '')
  return any(find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def thp_mode(path: str = THP_MODE_PATH) -> Optional[str]:
  """The kernel's transparent-huge-page mode ('always', 'madvise', 'never'); None if unknown."""
  try:
    with open(path) as f:
      match = re.search(r'\[(\w+)\]', f.read())
  except OSError:
    return None
  return match.group(1) if match else None


def glibc_version() -> Optional[tuple]:
  """(major, minor) of the C library when it is glibc, else None."""
  name, version = platform.libc_ver()
  numbers = re.match(r'(\d+)\.(\d+)', version or '')
  return (int(numbers.group(1)), int(numbers.group(2))) if name == 'glibc' and numbers else None


def _tunable(environ: Mapping[str, str]) -> Optional[str]:
  """The value of glibc.malloc.hugetlb in `environ`'s GLIBC_TUNABLES, None if not there."""
  for entry in environ.get('GLIBC_TUNABLES', '').split(':'):
    name, _, value = entry.partition('=')
    if name == TUNABLE:
      return value
  return None


def environment(environ: Mapping[str, str], mode: Optional[str],
                glibc: Optional[tuple]) -> Optional[dict]:
  """The environment to re-run with for huge pages, or None when that would change nothing:
  switched off, not glibc >= 2.35, the kernel not on `madvise` (`always` needs no asking,
  `never` cannot be asked), or the tunable already set."""
  switch = environ.get(SWITCH, '1').strip()
  if switch not in ('0', '1'):
    raise ValueError(f'{SWITCH} must be 1 (huge pages for XLA:CPU buffers, the default) or 0, '
                     f'got {environ[SWITCH]!r}.')
  if switch == '0' or glibc is None or glibc < MIN_GLIBC or mode != 'madvise':
    return None
  if _tunable(environ) is not None:
    return None
  tunables = [t for t in environ.get('GLIBC_TUNABLES', '').split(':') if t]
  return dict(environ, GLIBC_TUNABLES=':'.join(tunables + [TUNABLE + '=1']))


def reexec() -> None:
  """Re-runs this process's command line with huge pages where they help (see the module
  docstring); returns where nothing would change. Call it first thing in `__main__`."""
  if not sys.platform.startswith('linux'):
    return
  try:
    env = environment(os.environ, thp_mode(), glibc_version())
  except ValueError as e:
    raise SystemExit(f'Error: {e}') from None
  if env is None or accelerator_backend(os.environ):
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, sys.orig_argv, env)


def status() -> str:
  """A line for the logs: whether this process runs with huge pages asked for."""
  on = _tunable(os.environ) == '1'
  return (f'huge pages for host buffers: {"on" if on else "off"} (transparent huge pages: '
          f'{thp_mode() or "unknown"}; GLIBC_TUNABLES={os.environ.get("GLIBC_TUNABLES", "")!r}; '
          f'{SWITCH}=0 turns them off)')


def trim_heap() -> bool:
  """Hands the C heap's free memory back to the kernel (glibc's `malloc_trim`); False where
  the C library is not glibc.

  Compiling a large program leaves gigabytes of freed heap memory resident, and every call's
  scratch buffer would come on top of it. `parallel.compile_lowered` trims after compiling.
  """
  if glibc_version() is None:
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
  except OSError:
    return False
  libc.malloc_trim(0)
  return True
