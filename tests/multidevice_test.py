"""Data parallelism on 2 forced CPU devices, in its own process (see multidevice_script.py).

XLA's CPU all-reduce can deadlock and abort when the machine is busy, so the
script runs alone in a subprocess with a timeout, and a run that dies without a failed check
(a hang or an abort, not an AssertionError) is retried once.
"""

import os
import subprocess
import sys

from conftest import subprocess_env
import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multidevice_script.py')
TIMEOUT = 900


def run_script():
  env = subprocess_env(XLA_FLAGS='--xla_force_host_platform_device_count=2')
  try:
    proc = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
  except subprocess.TimeoutExpired as e:
    return None, f'timed out after {TIMEOUT} s\n{e.stdout}\n{e.stderr}'
  # The script's verdict ends its stdout; the runs' log lines go to stderr.
  return proc.returncode, proc.stderr + proc.stdout


@pytest.mark.slow
def test_two_devices_stay_identical_and_match_one_device():
  returncode, output = run_script()
  if returncode != 0 and 'AssertionError' not in output:
    returncode, output = run_script()  # a collective hang or abort under load: once more
  assert returncode == 0, output[-5000:]
  assert output.strip().endswith('OK'), output[-5000:]
