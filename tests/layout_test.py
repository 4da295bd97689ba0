"""How the package is laid out (STYLE.md): small modules and functions, imports that form
floors (no cycle, and no import inside a function to hide one)."""

import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'pcp_jax')
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _modules():
  found = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        module = os.path.relpath(path[:-3], os.path.dirname(PACKAGE)).replace(os.sep, '.')
        found[module.removesuffix('.__init__')] = path
  return found


MODULES = _modules()


def _imports(tree, module):
  """(pcp_jax modules imported at the top level, those imported inside functions)."""
  top, inner = set(), set()
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('pcp_jax'):
      names = [f'{node.module}.{a.name}' for a in node.names]
      targets = {n if n in MODULES else node.module for n in names}
    elif isinstance(node, ast.Import):
      targets = {a.name for a in node.names if a.name.startswith('pcp_jax')}
    else:
      continue
    (top if node in tree.body else inner).update(t for t in targets if t != module)
  return top, inner


@pytest.mark.parametrize('module', sorted(MODULES))
def test_modules_and_functions_are_small(module):
  source = open(MODULES[module]).read()
  assert len(source.splitlines()) <= MAX_MODULE_LINES, module
  long = [f'{node.name} ({node.end_lineno - node.lineno + 1} lines)'
          for node in ast.walk(ast.parse(source))
          if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
          and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
  assert not long, f'{module}: {long}'


def test_imports_form_floors():
  graph = {}
  for module, path in MODULES.items():
    top, inner = _imports(ast.parse(open(path).read()), module)
    graph[module] = top | inner
    assert not inner, f'{module} imports {sorted(inner)} inside a function'
  state = {}

  def visit(module, path):
    state[module] = 'open'
    for target in sorted(graph.get(module, ())):
      assert state.get(target) != 'open', f'import cycle: {" -> ".join(path + [target])}'
      if target not in state:
        visit(target, path + [target])
    state[module] = 'done'

  for module in sorted(graph):
    if module not in state:
      visit(module, [module])
