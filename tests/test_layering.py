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
