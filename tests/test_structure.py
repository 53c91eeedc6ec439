"""The package's structure: no import cycle (top-level or function-level imports alike), the bottom layer imports
nothing above it, no private name imported across modules, importing the package changes nothing process-wide, and
no code points outside the repository. (Modules are split by idea, not by a line count.)"""

import ast
import os
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / 'arreg_jax'


def _module_name(path: pathlib.Path) -> str:
  rel = path.relative_to(PKG.parent).with_suffix('')
  parts = list(rel.parts)
  if parts[-1] == '__init__':
    parts.pop()
  return '.'.join(parts)


def _modules() -> dict[str, pathlib.Path]:
  return {_module_name(p): p for p in PKG.rglob('*.py')}


def _imports(path: pathlib.Path, name: str, known: set[str]) -> set[str]:
  """Every module of the package that ``path`` imports, anywhere in the file (functions included).

  ``from arreg_jax.x import y`` counts as importing ``arreg_jax.x.y`` when that is a module, else ``arreg_jax.x``;
  importing ``a.b.c`` also imports its parent packages ``a.b`` (their ``__init__`` runs first).
  """
  is_pkg = path.name == '__init__.py'
  base = name.split('.') if is_pkg else name.split('.')[:-1]
  found = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    targets = []
    if isinstance(node, ast.Import):
      targets = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
      mod = node.module or ''
      if node.level:
        mod = '.'.join(base[:len(base) - node.level + 1] + ([mod] if mod else []))
      for a in node.names:
        full = f'{mod}.{a.name}'
        targets.append(full if full in known else mod)
    own_packages = {'.'.join(name.split('.')[:i]) for i in range(1, len(name.split('.')) + 1)}
    for t in targets:
      while t:  # importing a.b.c runs a/__init__ and a/b/__init__ first, except the importer's own packages
        if t in known and t not in own_packages:
          found.add(t)
        t = t.rpartition('.')[0]
  return found


def _graph():
  mods = _modules()
  known = set(mods)
  return {m: _imports(p, m, known) for m, p in mods.items()}


def _find_cycle(graph):
  state, stack = {}, []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state:
        c = visit(m)
        if c:
          return c
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state:
      c = visit(n)
      if c:
        return c
  return None


def test_the_import_graph_is_read():
  g = _graph()
  assert 'arreg_jax.rundir' in g['arreg_jax.training.loop']
  assert 'arreg_jax.training.loop' in g['arreg_jax.main']
  assert 'arreg_jax.spectral.power' in g['arreg_jax.models.layers']  # a function-level import is an import


def test_no_import_cycle():
  cycle = _find_cycle(_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def test_cycle_finder_finds_cycles():
  assert _find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c', 'a']
  assert _find_cycle({'a': {'b'}, 'b': set()}) is None


@pytest.mark.parametrize('module,allowed', [
    ('arreg_jax.rundir', {'arreg_jax.errors', 'arreg_jax.distributed'}),
    ('arreg_jax.errors', set()),
    ('arreg_jax.sweep', {'arreg_jax.rundir', 'arreg_jax.config_json', 'arreg_jax.errors', 'arreg_jax.distributed'}),
    ('arreg_jax.config_json', set()),
])
def test_bottom_layers_import_nothing_above_them(module, allowed):
  g = _graph()
  closure, todo = set(), [module]
  while todo:
    for m in g[todo.pop()]:
      if m not in closure:
        closure.add(m)
        todo.append(m)
  assert closure <= allowed | {'arreg_jax'}, closure - allowed


def _private_imports() -> dict[str, list[str]]:
  """``module -> private names it imports from another module of the package`` (``from arreg_jax.x import _y``)."""
  out = {}
  for name, path in _modules().items():
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('arreg_jax'):
        private = [a.name for a in node.names if a.name.startswith('_') and a.name != '__future__']
        if private:
          out.setdefault(name, []).extend(private)
  return out


OWNED_ELSEWHERE = ('arreg_jax.attacks',)  # private imports there are another change's to remove


def test_no_private_name_is_imported_across_modules():
  found = {m: names for m, names in _private_imports().items() if not m.startswith(OWNED_ELSEWHERE)}
  assert not found, found


def test_importing_the_package_changes_nothing_process_wide():
  """Every module of the package imported, after the libraries it uses: the environment, the interpreter's hooks,
  absl's flags and its log handler's filters are as they were."""
  code = (
      'import os, sys, threading, pkgutil, importlib\n'
      'from absl import app, flags, logging\n'
      'import chex, flax.linen, jax, matplotlib, ml_collections.config_flags, numpy, optax, orbax.checkpoint\n'
      'try:\n'
      '  import tensorboardX\n'
      'except ImportError:\n'
      '  pass\n'
      'before = (dict(os.environ), sys.excepthook, sys.unraisablehook, threading.excepthook, set(flags.FLAGS),\n'
      '          list(logging.get_absl_handler().filters))\n'
      'import arreg_jax\n'
      'for m in pkgutil.walk_packages(arreg_jax.__path__, "arreg_jax."):\n'
      '  importlib.import_module(m.name)\n'
      'after = (dict(os.environ), sys.excepthook, sys.unraisablehook, threading.excepthook, set(flags.FLAGS),\n'
      '         list(logging.get_absl_handler().filters))\n'
      'names = ("environment", "sys.excepthook", "sys.unraisablehook", "threading.excepthook", "absl flags",\n'
      '         "absl log filters")\n'
      'print([n for n, a, b in zip(names, before, after) if a != b])\n')
  r = subprocess.run([sys.executable, '-c', code], cwd=PKG.parent, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip().splitlines()[-1] == '[]', r.stdout


def test_nothing_points_outside_the_repository():
  root = PKG.parent
  files = list(PKG.rglob('*.py')) + list((root / 'configs').glob('*.py'))
  files += list((root / 'scripts').glob('*.py')) + list((root / 'benchmarks').glob('*.py'))
  bad = [str(p.relative_to(root)) for p in files if '../shared' in p.read_text() or '/work/shared' in p.read_text()]
  assert not bad, bad
  assert os.path.isdir(PKG)
