"""The README's Python blocks run as written, and print what their comments say."""

import contextlib
import io
import os
import re

import pytest

from conftest import ROOT


def python_blocks():
  with open(os.path.join(ROOT, 'README.md')) as f:
    return re.findall(r'```python\n(.*?)```', f.read(), re.S)


@pytest.mark.slow
@pytest.mark.parametrize('block', python_blocks())
def test_readme_python_block_runs(block, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # what a block writes (a genotype.json) lands here
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(compile(block, 'README.md', 'exec'), {})  # pylint: disable=exec-used
  printed = out.getvalue()
  # `print(...)  # value`: the value is what the line prints.
  for expected in re.findall(r'^print\(.*\)\s+#\s*(\S+(?:, \S+)*?)(?::|$)', block, re.M):
    assert expected.split(':')[0] in printed, (expected, printed)


def test_the_readme_has_python_blocks():
  assert python_blocks()
