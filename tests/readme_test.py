"""The README's code blocks cannot rot: its Python blocks run as written and print what their
comments say; every command of its shell blocks (and of the docs/ pages it links) parses as its
program would parse it (configs and config arguments load, `--config.x` overrides name existing
fields, flags exist, launch scripts exist), and every file, link and config field they name
exists. Nothing is run or compiled but the Python blocks."""

import contextlib
import io
import os
import re
import shlex
import sys
import tomllib

from absl import flags
import ml_collections
from ml_collections import config_flags
from packaging.requirements import Requirement
import pytest

from conftest import ROOT
from pcp_jax import bench
from pcp_jax import config_files
from pcp_jax import defaults
from pcp_jax import main
from pcp_jax import plots
from pcp_jax import reports

# The docs checked with the README (performance.md records history, with earlier flags).
DOCS = ('docs/search.md', 'docs/self_supervision.md', 'docs/internals.md', 'docs/benchmark.md')


def _read(path):
  with open(os.path.join(ROOT, path)) as f:
    return f.read()


def python_blocks():
  return re.findall(r'```python\n(.*?)```', _read('README.md'), re.S)


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


# ---------------------------------------------------------------------------
# The shell blocks.


def shell_commands(text):
  """The commands of the ```bash/```sh blocks of `text` as argument lists: continuation lines
  joined, comments dropped, `&&` and `;` chains split, leading VAR=value assignments dropped."""
  commands = []
  for block in re.findall(r'```(?:bash|sh)\n(.*?)```', text, re.S):
    for line in block.replace('\\\n', ' ').splitlines():
      command = []
      for word in shlex.split(line, comments=True) + [';']:
        if word in ('&&', '||', ';', '|'):
          while command and re.fullmatch(r'[A-Z_]+=\S*', command[0]):
            command.pop(0)
          if command:
            commands.append(command)
          command = []
        else:
          command.append(word)
  return commands


def _program(command):
  """('pcp_jax.main', arguments) for `pcp-jax ...` and `python -m pcp_jax.main ...`, and the
  like; (first word, arguments) otherwise."""
  entry_points = tomllib.loads(_read('pyproject.toml'))['project']['scripts']
  if command[0] in entry_points:
    return entry_points[command[0]].split(':')[0], command[1:]
  if command[0] in ('python', 'python3') and command[1] == '-m':
    return command[2], command[3:]
  return command[0], command[1:]


def _parse_config(args):
  """The config that `--config=...` and `--config.x=...` in `args` name, loaded as the entry
  points load it (a name or path, config arguments, overrides)."""
  argv = ['prog'] + config_files.config_args([a for a in args if a.startswith('--config')],
                                         ('config',))
  fv = flags.FlagValues()
  # The override flags come from the command line it is given (sys.argv by default).
  config_flags.DEFINE_config_file('config', None, '', flag_values=fv, lock_config=True,
                                  sys_argv=argv)
  fv(argv)
  return fv.config


def check_main(args):
  """A `pcp-jax` command: its flags exist, its config loads with its overrides and passes
  the checks the run makes before it starts."""
  assert any(a.startswith('--workdir=') for a in args), 'a run needs --workdir'
  for a in args:
    name = a.lstrip('-').split('=')[0]
    assert a.startswith('-') and (name.startswith('config') or name in main.FLAGS), a
  main.check(_parse_config(args))


def check_bench(args, monkeypatch):
  """A `pcp-jax-bench` command: its flags parse and its cases plan (no compilation)."""
  argv = ['prog'] + config_files.config_args(args)
  monkeypatch.setattr(sys, 'argv', argv)  # where the config flags find their overrides
  fv = flags.FlagValues()
  bench.define_flags(fv)
  fv(argv)
  bench.plan(fv.config, fv.train_config, what=fv.what, batch_size=fv.batch_size,
             stages=fv.stages, steps=fv.steps, warmup=fv.warmup, dtype=fv.dtype,
             compile_only=fv.compile_only, project=fv.project, out='')


def check_plots(args, monkeypatch):
  monkeypatch.setattr(plots, 'plot_run', lambda run_dir: [os.path.join(run_dir, 'plots', 'x')])
  assert plots.main(args) == 0


def check_reports(args, monkeypatch):
  monkeypatch.setattr(reports, 'write_paper_table', lambda *a: [])
  monkeypatch.setattr(reports, 'fgsm_overlay', lambda *a: [])
  assert reports.main(args) == 0


def check_launch(script, args):
  """A launch script exists and is executable; the config it is given loads."""
  assert os.access(os.path.join(ROOT, script), os.X_OK), f'{script} is not an executable file'
  for a in args:
    if a.startswith('configs/'):
      _parse_config([f'--config={os.path.join(ROOT, a)}'])


def check_pip(args):
  """`pip install` of this checkout (its extras exist), of requirements files that exist, or
  of requirement strings."""
  extras = tomllib.loads(_read('pyproject.toml'))['project']['optional-dependencies']
  assert args[0] == 'install', args
  words = iter(args[1:])
  for word in words:
    if word == '-r':
      assert os.path.isfile(os.path.join(ROOT, next(words))), args
    elif word.startswith('.'):
      given = re.fullmatch(r'\.(?:\[(.*)\])?', word).group(1)
      assert set(filter(None, (given or '').split(','))) <= set(extras), (word, sorted(extras))
    elif word != '-e':
      Requirement(word)


def ci_commands():
  """The commands .ci/run runs."""
  return shell_commands('```bash\n' + _read('.ci/run') + '```')


def check_command(command, monkeypatch):
  program, args = _program(command)
  if program == 'pcp_jax.main':
    check_main(args)
  elif program == 'pcp_jax.bench':
    check_bench(args, monkeypatch)
  elif program == 'pcp_jax.plots':
    check_plots(args, monkeypatch)
  elif program == 'pcp_jax.reports':
    check_reports(args, monkeypatch)
  elif program.startswith('launch/'):
    check_launch(program, args)
  elif program == 'sbatch':
    scripts = [a for a in args if a.startswith('launch/')]
    assert scripts, command
    check_launch(scripts[0], args)
  elif program == 'pip':
    check_pip(args)
  elif program in ('python', 'python3') and args[:1] == ['-c']:
    compile(args[1], 'README.md', 'exec')
  elif program in ('ruff', 'pytest'):
    assert command in ci_commands(), f'not the test command of .ci/run: {command}'
  else:
    raise AssertionError(f'The README runs {program!r}, which this test does not check: add '
                         'a check.')


def test_every_shell_command_parses(monkeypatch):
  readme = shell_commands(_read('README.md'))
  assert {_program(c)[0] for c in readme} >= {'pcp_jax.main', 'pcp_jax.bench', 'pcp_jax.plots',
                                               'pcp_jax.reports', 'pip', 'ruff', 'pytest'}
  for path in ('README.md',) + DOCS:
    for command in shell_commands(_read(path)):
      try:
        check_command(command, monkeypatch)
      except (Exception, SystemExit) as e:  # pylint: disable=broad-except
        pytest.fail(f'{path}: {shlex.join(command)!r}: {type(e).__name__}: {e}')


def test_the_readme_shows_ci_s_test_command():
  tests = [c for c in ci_commands() if _program(c)[0] in ('ruff', 'pytest')]
  assert len(tests) == 3 and all(c in shell_commands(_read('README.md')) for c in tests)


def test_the_shell_checks_catch_a_wrong_command(monkeypatch):
  """Each check fails on what a README could get wrong."""
  wrong = ['pcp-jax --config=ss_pcp:ssf=2 --workdir=w',  # ssf out of range
           'pcp-jax --config=ss_pcp --workdir=w --config.search.batch_sise=64',  # no such field
           'pcp-jax --config=ss_pcp:fast --workdir=w',  # no such config argument
           'pcp-jax --config=ss_pccp --workdir=w',  # no such config
           'pcp-jax --config=ss_pcp',  # no workdir
           'pcp-jax-bench --what=search --stages=all --project --compile_only',
           'pcp-jax-reports tables runs/a --out r',
           'launch/search_then_trian.sh configs/ss_pcp.py runs/x',
           'pip install ".[cuda13]"',
           'ruff check . && python -m pytest -q tests']
  for line in wrong:
    with pytest.raises((Exception, SystemExit)):
      for command in shell_commands(f'```bash\n{line}\n```'):
        check_command(command, monkeypatch)


# ---------------------------------------------------------------------------
# Files, links and config fields named in the text.


def _slug(heading):
  """GitHub's anchor of a markdown heading."""
  return re.sub(r'[^\w\- ]', '', heading.strip().lower()).replace(' ', '-')


def _anchors(path):
  return {_slug(h) for h in re.findall(r'^#+ (.*)$', _read(path), re.M)}


def test_links_and_paths_exist():
  for page in ('README.md',) + DOCS:
    text = _read(page)
    for target in re.findall(r'\]\(([^)\s]+)\)', text):
      path, _, anchor = target.partition('#')
      if path.startswith('http'):
        continue
      path = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
      assert os.path.isfile(os.path.join(ROOT, path)), (page, target)
      assert not anchor or anchor in _anchors(path), (page, target, sorted(_anchors(path)))
    for path in re.findall(r'`((?:launch|configs|docs|pcp_jax|tests|\.ci)/[\w./-]*)', text):
      assert os.path.exists(os.path.join(ROOT, path)), (page, path)


def _has_field(config, name):
  """Whether the dotted `name` (list items as `[i]`) is a field of `config`."""
  for part in re.sub(r'\[\d+\]', '', name).split('.'):
    if isinstance(config, (list, tuple)) and config:  # the stages: their fields
      config = config[0]
    if not isinstance(config, ml_collections.ConfigDict) or part not in config:
      return False
    config = config[part]
  return True


def test_config_fields_named_in_readme_and_docs_exist():
  configs = (defaults.search_config(), defaults.train_config())
  named = set()
  for path in ('README.md',) + DOCS:
    text = _read(path)
    named |= set(re.findall(r'`(?:--)?(?:config\.)?((?:search|train|data|fgsm|checkpoint)'
                            r'(?:\.\w+|\[\d+\])+)', text))
    named |= set(re.findall(r'`(?:--)?config\.(\w+)', text))
  assert len(named) > 30, sorted(named)
  # config.json and fgsm.json are files.
  named = {n for n in named if n.split('.')[-1] not in ('json', 'jsonl', 'npz', 'png')}
  missing = [name for name in sorted(named) if not any(_has_field(c, name) for c in configs)]
  assert not missing, f'not config fields: {missing}'
