"""Huge pages for XLA:CPU buffers: when the entry points re-run themselves, and that it works."""

import os
import re
import subprocess
import sys

import pytest

from pcp_jax.cpu import host

GLIBC = (2, 36)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_environment_adds_the_tunable_only_where_it_changes_something():
  env = host.environment({'HOME': '/h'}, 'madvise', GLIBC)
  assert env == {'HOME': '/h', 'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=1'}
  # Other tunables are kept.
  env = host.environment({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'madvise', GLIBC)
  assert env['GLIBC_TUNABLES'] == 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1'
  # The user's own setting wins (and is what stops a second re-run).
  assert host.environment({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'madvise',
                               GLIBC) is None
  assert host.environment({'PCP_JAX_HUGE_PAGES': '0'}, 'madvise', GLIBC) is None
  assert host.environment({'PCP_JAX_HUGE_PAGES': '1'}, 'madvise', GLIBC) is not None
  for mode in ('always', 'never', None):
    assert host.environment({}, mode, GLIBC) is None
  assert host.environment({}, 'madvise', (2, 34)) is None
  assert host.environment({}, 'madvise', None) is None


def test_a_bad_switch_names_the_variable():
  with pytest.raises(ValueError, match=r"PCP_JAX_HUGE_PAGES must be 1 .* or 0, got 'yes'"):
    host.environment({'PCP_JAX_HUGE_PAGES': 'yes'}, 'madvise', GLIBC)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='re-runs only on Linux')
def test_an_entry_point_with_a_bad_switch_stops_with_the_message_alone():
  env = dict(os.environ, PCP_JAX_HUGE_PAGES='yes', PYTHONPATH=REPO)
  code = 'from pcp_jax.cpu import host; host.reexec()'
  done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                        timeout=60)
  assert done.returncode == 1
  assert done.stderr.strip() == (
      "Error: PCP_JAX_HUGE_PAGES must be 1 (huge pages for XLA:CPU buffers, the default) or 0, "
      "got 'yes'.")


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert host.thp_mode(str(path)) == 'madvise'
  assert host.thp_mode(str(tmp_path / 'missing')) is None


# A child that re-runs itself as the entry points do, then touches 64 MiB from malloc and
# reports its environment and how much of its memory is on huge pages.
CHILD = r"""
import ctypes, os, re, sys
from pcp_jax.cpu import host
host.reexec()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
size = 64 << 20
pointer = libc.malloc(size)
ctypes.memset(pointer, 1, size)
with open('/proc/self/smaps_rollup') as f:
  huge_kb = int(re.search(r'AnonHugePages:\s+(\d+)', f.read()).group(1))
print(sys.argv[1:], os.environ.get('GLIBC_TUNABLES'), huge_kb)
"""


@pytest.mark.slow
@pytest.mark.skipif(
    not (sys.platform.startswith('linux') and os.path.exists('/proc/self/smaps_rollup')
         and (host.glibc_version() or (0, 0)) >= host.MIN_GLIBC
         and host.thp_mode() == 'madvise'),
    reason='needs Linux, glibc >= 2.35 and transparent huge pages on madvise')
def test_reexec_sets_the_tunable_and_keeps_the_command_line():
  def run(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ('GLIBC_TUNABLES', host.SWITCH)}
    env.update(extra, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, '-c', CHILD, 'arg'], env=env, check=True,
                         capture_output=True, text=True, timeout=60).stdout
    args, tunables, _ = re.fullmatch(r"(\[.*\]) (\S+) (\d+)\n", out).groups()
    assert args == "['arg']"  # the command line survives the re-run
    return tunables

  assert run() == 'glibc.malloc.hugetlb=1'
  assert run(PCP_JAX_HUGE_PAGES='0') == 'None'


def test_status_says_whether_this_process_asked_for_huge_pages(monkeypatch):
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1')
  assert host.status().startswith('huge pages for host buffers: on ')
  monkeypatch.setenv('GLIBC_TUNABLES', 'glibc.malloc.hugetlb=0')
  assert host.status().startswith('huge pages for host buffers: off ')
  assert 'PCP_JAX_HUGE_PAGES=0 turns them off' in host.status()


def test_a_gpu_or_tpu_host_runs_in_one_process():
  installed = lambda *names: (lambda name: object() if name in names else None)
  assert not host.accelerator_backend({}, installed())
  assert host.accelerator_backend({}, installed('jax_cuda12_plugin'))
  assert host.accelerator_backend({}, installed('libtpu'))
  # JAX_PLATFORMS decides when set: a CPU run on a GPU host still gets huge pages.
  assert not host.accelerator_backend({'JAX_PLATFORMS': 'cpu'},
                                           installed('jax_cuda12_plugin'))
  assert host.accelerator_backend({'JAX_PLATFORMS': 'cuda,cpu'}, installed())
