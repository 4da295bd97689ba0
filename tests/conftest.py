"""Test-wide settings: tiny networks compile faster with XLA's optimisations mostly off."""

import os
import sys

import jax
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)


@pytest.fixture(scope='session', autouse=True)
def fast_compiles():
  jax.config.update('jax_disable_most_optimizations', True)
  yield
