"""Dependency direction: fmir_jax imports the PyTorch stage only inside the functions that
encode images; the errors and the --layer check both sides use live in fmir_jax.core.errors."""
import os
import subprocess
import sys

import pytest

from fmir_jax import cli
from fmir_jax.core import errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_cli_and_demo_import_without_the_torch_stage():
  code = '\n'.join([
      'import sys',
      'from fmir_jax import cli, demo',
      "cli.build_parser().parse_args(['register', '--fixed', 'f', '--moving', 'm',",
      "                               '--checkpoint', 'c', '--out', 'o', '--layer', '2'])",
      "print(sorted({m.split('.')[0] for m in sys.modules}",
      "             & {'feature_extract', 'torch', 'transformers', 'configs'}))",
  ])
  r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                     timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.strip() == '[]', r.stdout


def test_error_types_are_one_class_under_both_names():
  from feature_extract import backbones
  from feature_extract.datasets import base
  assert backbones.BackboneError is errors.BackboneError
  assert base.DatasetError is errors.DatasetError


@pytest.mark.parametrize('text,expected', [(None, None), ('last', 'last'), ('0', 0), ('2', 2),
                                           (3, 3), ('-1', -1)])
def test_parse_layer_accepts(text, expected):
  assert errors.parse_layer(text) == expected


def test_parse_layer_messages():
  with pytest.raises(errors.BackboneError,
                     match=r'^--layer must be an int or "last", got \'x\'\.$'):
    errors.parse_layer('x')
  with pytest.raises(errors.BackboneError, match=r'^dinov3: --layer must be an int'):
    errors.parse_layer('2.5', 12, 'dinov3')
  with pytest.raises(errors.BackboneError,
                     match=r'^dinov3: --layer 13 out of range; hidden_states has indices '
                           r'0\.\.12 \(0 = embeddings'):
    errors.parse_layer('13', 12, 'dinov3')
  assert errors.parse_layer(12, 12, 'dinov3') == 12


def test_fmir_register_layer_flag(capsys):
  parser = cli.build_parser()
  base = ['register', '--fixed', 'f', '--moving', 'm', '--checkpoint', 'c', '--out', 'o']
  assert parser.parse_args(base + ['--layer', '4']).layer == 4
  assert parser.parse_args(base + ['--layer', 'last']).layer == 'last'
  assert parser.parse_args(base).layer is None
  with pytest.raises(SystemExit) as exit_info:
    parser.parse_args(base + ['--layer', 'x'])
  assert exit_info.value.code == 2
  assert ('argument --layer: --layer must be an int or "last", got \'x\'.'
          in capsys.readouterr().err)


# ----------------------------------------------------------------------------- the layer rule

# Module-level imports go down this list only (a module may import its own layer and the
# ones before it). feature_extract (the PyTorch stage) sits on core alone; nothing but the
# apps imports it at module level (register.encode loads an encoder inside its functions).
# train.loop sits above evaluate: it validates with evaluate's pair scoring.
LAYERS = ('core', 'feature_extract', 'ops', 'model', 'train', 'evaluate', 'loop', 'register',
          'apps')
HEAVY = ('jax', 'flax', 'optax', 'orbax', 'torch', 'transformers', 'grain')
MAX_LOCAL_PROJECT_IMPORTS = 17   # the issue: "at most ~15"; each one says why


def _layer(module: str) -> str:
  parts = module.split('.')
  if parts[0] == 'feature_extract':
    return 'feature_extract'
  if parts[0] == 'configs' or len(parts) < 2:
    return 'apps'
  if module == 'fmir_jax.train.loop':
    return 'loop'
  return parts[1] if parts[1] in LAYERS else 'apps'


def _modules():
  for base in ('fmir_jax', 'feature_extract'):
    for folder, _, names in os.walk(os.path.join(ROOT, base)):
      for name in sorted(names):
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          mod = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
          yield mod.removesuffix('.__init__'), path


def _imports(path: str):
  """(imported module, line, inside a function) of every import in a file."""
  import ast
  out = []

  def visit(node, local):
    for child in ast.iter_child_nodes(node):
      if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
        visit(child, True)
        continue
      if isinstance(child, ast.Import):
        out.extend((a.name, child.lineno, local) for a in child.names)
      elif isinstance(child, ast.ImportFrom) and child.module and not child.level:
        out.extend((_submodule(child.module, a.name), child.lineno, local)
                   for a in child.names)
      visit(child, local)

  visit(ast.parse(open(path).read()), False)
  return out


def _submodule(package: str, name: str) -> str:
  """``from package import name``: the module it names (a submodule or the package)."""
  folder = os.path.join(ROOT, *package.split('.'))
  is_module = (os.path.isfile(os.path.join(folder, name + '.py'))
               or os.path.isdir(os.path.join(folder, name)))
  return f'{package}.{name}' if is_module else package


def _allowed(src: str, dst: str) -> bool:
  a, b = LAYERS.index(_layer(src)), LAYERS.index(_layer(dst))
  if _layer(dst) == 'feature_extract':
    return _layer(src) in ('feature_extract', 'apps')
  return b <= a


def test_module_level_imports_follow_the_layers():
  bad = []
  for mod, path in _modules():
    for name, line, local in _imports(path):
      top = name.split('.')[0]
      if local:
        continue
      if top in ('fmir_jax', 'feature_extract', 'configs') and not _allowed(mod, name):
        bad.append(f'{mod}:{line} imports {name} ({_layer(mod)} -> {_layer(name)})')
      if _layer(mod) == 'core' and top in HEAVY:
        bad.append(f'{mod}:{line} imports {top}: the core is numpy-only')
      if _layer(mod) == 'feature_extract' and top in ('jax', 'flax', 'optax', 'orbax'):
        bad.append(f'{mod}:{line} imports {top}: the PyTorch stage does not use JAX')
      if _layer(mod) in ('ops', 'model') and top in ('torch', 'transformers'):
        bad.append(f'{mod}:{line} imports {top}: the JAX engine does not use PyTorch')
  assert not bad, '\n'.join(bad)


def test_function_local_project_imports_are_few_and_say_why():
  """Imports inside functions only keep torch or jax off a light path (``fmir --help``,
  reading a run's files); each says so on its line or the line above."""
  local = []
  for mod, path in _modules():
    lines = open(path).read().splitlines()
    for name, line, inside in _imports(path):
      if inside and name.split('.')[0] in ('fmir_jax', 'feature_extract', 'configs'):
        assert _allowed(mod, name) or (_layer(mod) == 'register' and
                                       _layer(name) == 'feature_extract'), \
            f'{mod}:{line} imports {name} against the layers'
        local.append(f'{mod}:{line} {name}')
        said = '#' in lines[line - 1] or lines[line - 2].strip().startswith('#')
        assert said, f'{mod}:{line}: a function-local import of {name} needs a reason'
  assert len(local) <= MAX_LOCAL_PROJECT_IMPORTS, '\n'.join(local)


def test_no_library_module_is_over_about_400_lines():
  long = [f'{mod}: {n}' for mod, path in _modules()
          if (n := sum(1 for _ in open(path))) > 450]
  assert not long, long
