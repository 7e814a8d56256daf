"""The package's import arrows point down (README "Code layout").

Read from the source (ast), so it costs no import: every `import` / `from ... import` anywhere in
a module, function-level ones included.
  1. No module of mapkd_jax imports configs/ (configs import the library, never the reverse).
  2. A module inside a subpackage (mapkd_jax/<pkg>/...) imports no top-level module of
     mapkd_jax (those are the entry points and CLIs that sit above the subpackages).
  3. The building blocks (models, losses, data) import none of train/, eval/, convert/.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'mapkd_jax'
BLOCKS = ('models', 'losses', 'data')
ABOVE_BLOCKS = ('train', 'eval', 'convert')


def imported_names(source, module_name):
  """Absolute dotted names a module's source imports (relative imports resolved)."""
  package = module_name.rsplit('.', 1)[0]
  names = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.extend(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ''
      if node.level:
        parts = package.split('.')
        base = '.'.join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      # `from pkg import mod` imports pkg.mod when mod is a module: keep both spellings.
      names.extend(f'{base}.{alias.name}' for alias in node.names)
      names.append(base)
  return names


def modules():
  for path in sorted(PACKAGE.rglob('*.py')):
    rel = path.relative_to(PACKAGE.parent).with_suffix('')
    yield '.'.join(rel.parts), path


def top_level_modules():
  return {p.stem for p in PACKAGE.glob('*.py') if p.stem != '__init__'}


def violations():
  top = top_level_modules()
  found = set()   # `from pkg import mod` is seen as pkg and pkg.mod: report each problem once
  for name, path in modules():
    parts = name.split('.')
    for imported in imported_names(path.read_text(), name):
      head = imported.split('.')
      if head[0] == 'configs':
        found.add((name, 'configs', 'imports configs/'))
      if head[0] != 'mapkd_jax' or len(head) < 2:
        continue
      if len(parts) > 2 and head[1] in top and len(head) == 2:
        found.add((name, imported, 'a subpackage module imports a top-level module'))
      if len(parts) > 2 and parts[1] in BLOCKS and head[1] in ABOVE_BLOCKS:
        found.add((name, head[1], f'{parts[1]}/ imports {head[1]}/'))
  return sorted(found)


def test_import_arrows_point_down():
  assert violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
  # The checker itself: an upward import written into a fake package is reported.
  fake = tmp_path / 'mapkd_jax'
  (fake / 'models').mkdir(parents=True)
  (fake / '__init__.py').write_text('')
  (fake / 'launcher.py').write_text('')
  (fake / 'models' / '__init__.py').write_text('')
  (fake / 'models' / 'net.py').write_text(
      'def f():\n  from mapkd_jax import launcher\n  from mapkd_jax.train import step\n'
      '  import configs.tcs\n')
  monkeypatch.setattr(__import__(__name__), 'PACKAGE', fake)
  reasons = sorted(reason for _, _, reason in violations())
  assert reasons == ['a subpackage module imports a top-level module', 'imports configs/',
                     'models/ imports train/']


@pytest.mark.parametrize('source, expected', [
    ('from . import ap', 'mapkd_jax.eval.ap'),
    ('from ..models import camera', 'mapkd_jax.models.camera'),
    ('import mapkd_jax.bench', 'mapkd_jax.bench'),
])
def test_relative_imports_resolve(source, expected):
  assert expected in imported_names(source, 'mapkd_jax.eval.scoring')
