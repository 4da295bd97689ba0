"""The command-line entry point's multi-process start and the launch scripts."""

import importlib.util
import logging as stdlib_logging
import os
import re
import socket
import stat
import subprocess
import sys
import tomllib

import jax
import pytest

import pcp_jax
from pcp_jax import config_files
from pcp_jax import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ['launch/search_then_train.sh', 'launch/single_host.sh', 'launch/slurm_multihost.sbatch',
           'launch/collapse_check.sh']
EXPLICIT = {'PCP_JAX_COORDINATOR': 'node0:1234', 'PCP_JAX_NUM_PROCESSES': '4',
            'PCP_JAX_PROCESS_ID': '3'}


def test_single_process_unless_asked():
  assert main.distributed_arguments(False, {}) is None
  assert main.distributed_arguments(False, {'PCP_JAX_DISTRIBUTED': '0'}) is None


@pytest.mark.parametrize('flag, environ', [(True, {}), (False, {'PCP_JAX_DISTRIBUTED': '1'})])
def test_flag_or_variable_leaves_the_cluster_to_jax(flag, environ):
  assert main.distributed_arguments(flag, environ) == {}


def test_explicit_variables_become_the_arguments():
  assert main.distributed_arguments(True, EXPLICIT) == {
      'coordinator_address': 'node0:1234', 'num_processes': 4, 'process_id': 3}


@pytest.mark.parametrize('changes, message', [
    ({'PCP_JAX_PROCESS_ID': None}, 'without PCP_JAX_PROCESS_ID'),
    ({'PCP_JAX_COORDINATOR': None, 'PCP_JAX_NUM_PROCESSES': None},
     'PCP_JAX_PROCESS_ID set without PCP_JAX_COORDINATOR, PCP_JAX_NUM_PROCESSES'),
    ({'PCP_JAX_NUM_PROCESSES': 'four'}, "PCP_JAX_NUM_PROCESSES must be an integer, got 'four'"),
    ({'PCP_JAX_PROCESS_ID': '1.0'}, "PCP_JAX_PROCESS_ID must be an integer, got '1.0'"),
    ({'PCP_JAX_PROCESS_ID': '4'}, r'PCP_JAX_PROCESS_ID must be in 0\.\.3'),
    ({'PCP_JAX_NUM_PROCESSES': '0', 'PCP_JAX_PROCESS_ID': '0'},
     'PCP_JAX_NUM_PROCESSES must be at least 1'),
    ({'PCP_JAX_COORDINATOR': 'node0'}, 'PCP_JAX_COORDINATOR must be host:port'),
    ({'PCP_JAX_DISTRIBUTED': 'yes'}, "PCP_JAX_DISTRIBUTED must be 1 or 0, got 'yes'"),
])
def test_bad_variables_name_the_variable(changes, message):
  environ = dict(EXPLICIT, **changes)
  environ = {k: v for k, v in environ.items() if v is not None}
  with pytest.raises(ValueError, match=message):
    main.distributed_arguments(True, environ)


def test_variables_without_the_switch_are_refused():
  with pytest.raises(ValueError, match='pass --distributed or set PCP_JAX_DISTRIBUTED=1'):
    main.distributed_arguments(False, EXPLICIT)


def test_initialize_gets_the_arguments(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  assert not main.initialize_distributed(False, {})
  assert main.initialize_distributed(False, dict(EXPLICIT, PCP_JAX_DISTRIBUTED='1'))
  assert main.initialize_distributed(True, {'SLURM_JOB_ID': '7'})
  assert calls == [{'coordinator_address': 'node0:1234', 'num_processes': 4, 'process_id': 3},
                   {}]


@pytest.mark.slow
def test_help_lists_the_distributed_flag():
  result = subprocess.run([sys.executable, '-m', 'pcp_jax.main', '--help'], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
  assert '--[no]distributed' in result.stdout and 'PCP_JAX_COORDINATOR' in result.stdout
  # Help is no error, and it tells the config arguments and the configs by name.
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'ssf=<float>' in result.stdout and 'space=<name>' in result.stdout
  assert 'Configs by name or path: p_darts, pc_darts, pcp, ' in result.stdout


@pytest.mark.slow
def test_two_processes_join_through_the_command_line(tmp_path):
  """Two CPU processes form one 2-device run, then stop at a bad mode before any compilation."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  cache = str(tmp_path / 'user_cache')
  procs = []
  for process_id in range(2):
    env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
               PCP_JAX_COORDINATOR=f'localhost:{port}', PCP_JAX_NUM_PROCESSES='2',
               PCP_JAX_PROCESS_ID=str(process_id))
    env.pop('XLA_FLAGS', None)  # one CPU device per process
    procs.append(subprocess.Popen(
        [sys.executable, '-m', 'pcp_jax.main', '--distributed', '--config=configs/pcp.py:tiny',
         f'--workdir={tmp_path}', '--config.modes=dance'],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  try:
    outputs = [p.communicate(timeout=240)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  for process_id, output in enumerate(outputs):
    assert f'JAX process {process_id} of 2' in output, output
    assert '2 devices in all' in output, output
    assert f'compilation cache: {cache}' in output, output  # the user's cache dir wins
    assert "got 'dance'" in output, output


@pytest.mark.parametrize('script', SCRIPTS)
def test_launch_scripts_parse_and_are_executable(script):
  path = os.path.join(ROOT, script)
  assert os.stat(path).st_mode & stat.S_IXUSR, f'{script} is not executable'
  result = subprocess.run(['bash', '-n', path], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr


@pytest.mark.parametrize('script', SCRIPTS[:2])
def test_launch_scripts_print_usage_without_arguments(script):
  result = subprocess.run([os.path.join(ROOT, script)], capture_output=True, text=True,
                          timeout=60)
  assert result.returncode != 0 and 'usage:' in result.stderr


@pytest.mark.slow
def test_single_host_script_passes_extra_flags_on(tmp_path):
  def run(config_dir):
    return subprocess.run(
        [os.path.join(ROOT, 'launch/single_host.sh'), f'{config_dir}/pcp.py:tiny', str(tmp_path),
         f'{config_dir}/train_cifar10.py:tiny', '--config.modes=dance'],
        cwd=str(tmp_path), env=dict(os.environ, PATH=os.path.dirname(sys.executable)
                                    + os.pathsep + os.environ['PATH']),
        capture_output=True, text=True, timeout=240)
  # Paths are the caller's: from another folder `configs/` is not the checkout's, said in one
  # line even with an override to apply.
  result = run('configs')
  assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr
  assert "error: --config: " in result.stderr and 'configs/pcp.py' in result.stderr
  result = run(os.path.join(ROOT, 'configs'))
  assert result.returncode != 0
  assert "got 'dance'" in result.stderr, result.stderr


# ---------------------------------------------------------------------------
# Bad input: one line naming the field, before anything is loaded or compiled.


def _config(name):
  import importlib  # pylint: disable=g-import-not-at-top
  return importlib.import_module(f'configs.{name}').get_config('tiny')


@pytest.mark.parametrize('name, field, value, message', [
    ('pcp', 'checkpoint.max_to_keep', 0, 'checkpoint.max_to_keep must be a whole number >= 1'),
    ('pcp', 'search.eval_batch_size', -1, 'search.eval_batch_size must be a whole number >= 1'),
    ('pcp', 'data.max_train', -5, 'data.max_train must be a whole number >= 0'),
    ('pcp', 'search.batch_size', 0, 'search.batch_size must be a whole number >= 2'),
    ('pcp', 'search.optim.arch.name', 'rmsprop', r"search.optim.arch.name must be one of"),
    ('train_cifar10', 'train.eval_batch_size', -1, 'train.eval_batch_size must be a whole'),
    ('train_cifar10', 'train.batch_size', 0, 'train.batch_size must be a whole number >= 1'),
    ('train_cifar10', 'train.epochs', 0, 'train.epochs must be a whole number >= 1'),
    ('train_cifar10', 'data.train_portion', 1.5, r'data.train_portion must be in \(0, 1\)'),
    ('pcp', 'data.dataset', 'mnist', 'data.dataset must be one of'),
    ('pcp', 'search.projector_sizes', (32, 0), 'search.projector_sizes must be whole numbers'),
    ('pcp', 'search.max_skip_normal', -3, 'search.max_skip_normal must be a whole number >= -1'),
    ('train_cifar10', 'train.layers', 2, 'train.layers must be a whole number >= 3'),
    ('train_cifar10', 'train.auxiliary_weight', -0.4,
     'train.auxiliary_weight must be a finite number >= 0'),
    ('train_cifar10', 'train.auxiliary_weight', float('inf'),
     'train.auxiliary_weight must be a finite number >= 0'),
    ('pcp', 'search.bt_lambda', float('nan'), 'search.bt_lambda must be a finite number >= 0'),
    ('pcp', 'search.optim.weights.weight_decay', float('inf'),
     'search.optim.weights.weight_decay must be a finite number >= 0'),
    ('train_cifar10', 'fgsm.eps', (0.0, 8.0), r'fgsm.eps must be numbers in \[0, 1\]'),
    ('train_cifar10', 'fgsm.example_indices', (0, 40), r'fgsm.example_indices must be whole'),
])
def test_bad_values_are_refused_naming_the_field(tmp_path, name, field, value, message):
  config = _config(name)
  section, _, leaf = field.rpartition('.')
  node = config
  for part in section.split('.'):
    node = node[part]
  node[leaf] = value
  with pytest.raises(ValueError, match=message):
    main.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')  # nothing was created


HOLD_LOCK = r'''
import sys, time
from pcp_jax import checkpoint
with checkpoint.WorkdirLock(sys.argv[1]):
  print('locked', flush=True)
  time.sleep(600)
'''


@pytest.mark.slow
def test_a_second_run_on_the_same_workdir_is_refused(tmp_path):
  from pcp_jax import checkpoint  # pylint: disable=g-import-not-at-top
  holder = subprocess.Popen([sys.executable, '-c', HOLD_LOCK, str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == 'locked\n'
    with pytest.raises(checkpoint.WorkdirBusy, match=rf'in use by another run \(pid {holder.pid}'):
      main.run(_config('pcp'), str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  # A killed holder leaves its lock file, but not the lock: the next run goes ahead.
  with checkpoint.WorkdirLock(str(tmp_path)):
    pass
  assert not os.path.exists(tmp_path / checkpoint.WorkdirLock.NAME)


@pytest.mark.slow
def test_command_line_errors_are_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'pcp_jax.main', '--config=configs/pcp.py:tiny',
       f'--workdir={tmp_path}/run', '--config.checkpoint.max_to_keep=0'],
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert result.returncode == 1
  assert 'Traceback' not in result.stderr
  assert result.stderr.strip().splitlines()[-1].endswith(
      'checkpoint.max_to_keep must be a whole number >= 1, got 0.')
  assert 'libtpu' not in result.stderr  # JAX's backend probing is hidden unless -v


def _fake_python(tmp_path):
  """A `python` on PATH that records its working directory and arguments, standing in for
  the two pcp_jax.main commands."""
  calls = tmp_path / 'calls.txt'
  fake = tmp_path / 'bin' / 'python'
  fake.parent.mkdir()
  fake.write_text(f'#!/usr/bin/env bash\necho "$PWD $@" >> {calls}\n')
  fake.chmod(0o755)
  return calls, dict(os.environ, PATH=f'{fake.parent}{os.pathsep}{os.environ["PATH"]}')


@pytest.mark.slow
def test_search_then_train_sends_each_flag_where_it_belongs(tmp_path):
  calls, env = _fake_python(tmp_path)
  subprocess.run(
      [os.path.join(ROOT, 'launch/search_then_train.sh'), 'configs/ss_pcp.py', 'runs/x',
       'configs/train_cifar10.py', '--config.search.optim.weights.lr=0.1',
       '--config.train.epochs=3', '--config.fgsm.num_examples=10', '--config.seed=1'],
      env=env, check=True, timeout=60, cwd=ROOT)
  search_call, train_call = calls.read_text().splitlines()
  assert search_call.split() == [
      ROOT, '-m', 'pcp_jax.main', '--config=configs/ss_pcp.py', '--workdir=runs/x/search',
      '--config.search.optim.weights.lr=0.1', '--config.seed=1']
  assert train_call.split() == [
      ROOT, '-m', 'pcp_jax.main', '--config=configs/train_cifar10.py', '--workdir=runs/x/train',
      '--config.genotype=runs/x/search', '--config.train.epochs=3',
      '--config.fgsm.num_examples=10', '--config.seed=1']


@pytest.mark.slow
def test_search_then_train_without_a_train_config_and_with_spaced_flags(tmp_path):
  # From another directory: paths stay relative to it; a flag in the third place is a flag;
  # `--flag value` travels whole.
  calls, env = _fake_python(tmp_path)
  subprocess.run(
      [os.path.join(ROOT, 'launch/search_then_train.sh'), 'my_configs/pcp.py:tiny', 'run',
       '--config.search.batch_size', '8', '--config.train.epochs', '2', '--config.seed', '3'],
      env=env, check=True, timeout=60, cwd=tmp_path)
  search_call, train_call = calls.read_text().splitlines()
  assert search_call.split() == [
      str(tmp_path), '-m', 'pcp_jax.main', '--config=my_configs/pcp.py:tiny',
      '--workdir=run/search', '--config.search.batch_size', '8', '--config.seed', '3']
  assert train_call.split() == [
      str(tmp_path), '-m', 'pcp_jax.main', f'--config={ROOT}/configs/train_cifar10.py',
      '--workdir=run/train', '--config.genotype=run/search', '--config.train.epochs', '2',
      '--config.seed', '3']


def test_a_run_that_fails_before_writing_anything_leaves_no_workdir(tmp_path):
  config = _config('pcp')
  config.data.source, config.data.dir = 'files', str(tmp_path / 'no_data')
  with pytest.raises(FileNotFoundError, match='cifar-10'):
    main.run(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run')


@pytest.mark.parametrize('override, answer', [
    ('--config.search.nope=1', 'error: --config: nope (given: '),
    ('--config.search.batch_sizes=1',
     'error: --config: batch_sizes: Did you mean "batch_size" instead of "batch_sizes"? (given'),
    ('--config.search.stages[0].epochs=x', 'error: --config: '),
    # Tuples and stage fields are settable: this run gets as far as the modes check.
    ('--config.search.stages[0].epochs=3', "config.modes must be a comma list"),
    ('--config.search.initial_ops=("none","skip_connect")', "config.modes must be a comma list"),
])
@pytest.mark.slow
def test_command_line_overrides_answer_in_one_line(tmp_path, override, answer):
  result = subprocess.run(
      [sys.executable, '-m', 'pcp_jax.main', '--config=configs/pcp.py:tiny',
       f'--workdir={tmp_path}/run', override, '--config.modes=dance'],
      cwd=ROOT, capture_output=True, text=True, timeout=240)
  assert result.returncode == 1 and 'Traceback' not in result.stderr
  assert answer in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]


def test_the_installed_package_includes_every_subpackage():
  # pyproject.toml lists packages by name: a new subpackage (the CPU wing) left out of it
  # would be missing from `pip install .`.
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    listed = set(tomllib.load(f)['tool']['setuptools']['packages'])
  found = {os.path.relpath(d, ROOT).replace(os.sep, '.')
           for d, _, files in os.walk(os.path.join(ROOT, 'pcp_jax')) if '__init__.py' in files}
  assert 'pcp_jax.cpu' in found and listed == found | {'pcp_jax.configs'}


def test_configs_are_reachable_by_name():
  path = config_files.config_file('pcp:tiny,ssf=0.5')
  assert path == os.path.join(ROOT, 'configs', 'pcp.py') + ':tiny,ssf=0.5'
  assert config_files.config_file('configs/pcp.py:tiny') == 'configs/pcp.py:tiny'  # a path
  assert config_files.config_args(['main', '--config=ss_pcp', '--train_config', 'train_cifar10',
                               '--workdir=x']) == [
      'main', f'--config={ROOT}/configs/ss_pcp.py', '--train_config',
      f'{ROOT}/configs/train_cifar10.py', '--workdir=x']
  with pytest.raises(ValueError, match="config 'sspcp' is neither a file nor a config name "
                                       r"\(p_darts, pc_darts, pcp, quickstart, ss_pcp, "):
    config_files.config_file('sspcp')


@pytest.mark.slow
def test_an_installed_package_runs_its_configs_by_name_from_anywhere(tmp_path):
  # `pip install .` without the dependencies (the environment has them) into a folder of its
  # own; run from another folder, with the checkout off the path.
  target, elsewhere = tmp_path / 'site', tmp_path / 'elsewhere'
  elsewhere.mkdir()
  # Without build isolation where setuptools can build a wheel here; else pip fetches them.
  local = all(importlib.util.find_spec(m) for m in ('setuptools', 'wheel'))
  built = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                          *(['--no-build-isolation'] if local else []), f'--target={target}',
                          ROOT], capture_output=True, text=True, timeout=300)
  assert built.returncode == 0, built.stderr[-3000:]
  env = dict(os.environ, PYTHONPATH=str(target))
  code = ('from pcp_jax import config_files, monitor; import importlib.util as u; '
          'p = config_files.config_file("pc_darts:tiny").split(":")[0]; '
          's = u.spec_from_file_location("c", p); m = u.module_from_spec(s); '
          's.loader.exec_module(m); print(p); print(m.get_config("tiny").search.channels); '
          'print(monitor.environment()["pcp_jax"])')
  result = subprocess.run([sys.executable, '-c', code], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-2000:]
  path, channels, version = result.stdout.split()
  assert path.startswith(str(target)) and path.endswith('pcp_jax/configs/pc_darts.py')
  assert channels == '8' and version == pcp_jax.__version__
  result = subprocess.run([sys.executable, '-m', 'pcp_jax.main', '--config=nope',
                           '--workdir=x'], cwd=elsewhere, env=env, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode != 0 and "config 'nope' is neither a file" in result.stderr


def test_a_wrapped_config_error_reads_as_plain_text():
  # ml_collections raises AttributeError(KeyError("'x'\nDid you mean ...")): its str() is a
  # repr with escaped quotes and newlines.
  error = AttributeError(KeyError("'batch_sizes'\nDid you mean \"batch_size\"?"))
  assert '\\' in str(error)
  assert main._plain(error) == 'batch_sizes: Did you mean "batch_size"?'
  assert main._plain(KeyError('nope')) == 'nope'


def test_bad_workdirs_are_named_before_anything_runs(tmp_path):
  afile = tmp_path / 'a_file'
  afile.write_text('x')
  for workdir, message in (('', "--workdir must name a folder, got ''"),
                           ('  ', "--workdir must name a folder"),
                           (str(afile), f'--workdir {afile}: {afile} is a file, not a folder.'),
                           (str(afile / 'run'), f'{afile} is a file, not a folder.')):
    with pytest.raises(ValueError, match=re.escape(message)):
      main.check_workdir(workdir)
  main.check_workdir(str(tmp_path / 'new' / 'run'))  # made later, by the run
  assert os.listdir(tmp_path) == ['a_file']


def test_a_full_disk_anywhere_is_one_line_naming_the_file_or_the_workdir(tmp_path):
  orbax_text = ValueError('RESOURCE_EXHAUSTED: Failed writing: "x": No space left on device '
                          "[os_error_code='28']")
  wrapped = RuntimeError('the save failed')
  wrapped.__cause__ = orbax_text
  for error, where in ((OSError(28, 'No space left on device', '/runs/a/results.json'),
                        '/runs/a/results.json'),
                       (OSError(122, 'Disk quota exceeded'), str(tmp_path)),
                       (wrapped, str(tmp_path))):
    message = main.user_message(error, str(tmp_path))
    assert message.startswith(f'{where}: the disk is full ({os.strerror(error.errno)})'
                              if isinstance(error, OSError) else f'{where}: the disk is full')
    assert message.endswith('rerun the same command to resume (the checkpoints saved are '
                            'intact).')
  assert main.user_message(ValueError('bad\n  value'), str(tmp_path)) == 'bad value'
  # Orbax's and asyncio's tracebacks of the same full disk are not shown besides that line.
  quiet = main._QuietLibraries()  # pylint: disable=protected-access
  for name, path in (('absl', '/site-packages/orbax/checkpoint/future.py'),
                     ('asyncio', '/lib/asyncio/base_events.py')):
    record = stdlib_logging.LogRecord(name, stdlib_logging.ERROR, path, 1, '%s', (orbax_text,),
                                      None)
    assert not quiet.filter(record)
  record = stdlib_logging.LogRecord('absl', stdlib_logging.ERROR, '/pcp_jax/main.py', 1, '%s',
                                    ('No space left on device',), None)
  assert quiet.filter(record)
