"""`train.py --help` exits 0 and every config field it names exists in the config."""
import os
import re
import subprocess
import sys

import pytest

from configs import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_train_help_names_real_config_fields():
  r = subprocess.run([sys.executable, 'train.py', '--help'], cwd=ROOT, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr
  block = r.stdout.split('Config fields users override most')[1].split('flags:')[0]
  names = re.findall(r'^  ([a-z_]+(?:\.[a-z_]+)*)\s', block, flags=re.M)
  names += re.findall(r';\s+([a-z_]+\.[a-z_]+)\s', block)
  assert {'mode', 'optim.lr', 'train.num_steps', 'train.batch_size',
          'data.train_stores', 'channel_norm', 'model.flow_init'} <= set(names), names
  config = common.base_config()
  for name in names:
    node = config
    for part in name.split('.'):
      assert part in node, f'train.py --help names {name!r}, which the config lacks'
      node = node[part]


@pytest.mark.slow
def test_help_exits_0_and_a_missing_flag_exits_2():
  for script in ('train.py', 'eval.py'):
    r = subprocess.run([sys.executable, script, '--help'], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and '--workdir' in r.stdout, (script, r.stderr)
    r = subprocess.run([sys.executable, script], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and 'workdir' in r.stderr, (script, r.stderr)


def test_every_fmir_command_in_the_docs_parses():
  """Each `fmir ...` line of a code block in README.md and docs/ names flags that exist
  (synopsis lines, with [optional] parts, aside)."""
  import glob
  import shlex
  from fmir_jax import cli
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser, seen = cli.build_parser(), 0
  for path in [os.path.join(root, 'README.md')] + glob.glob(os.path.join(root, 'docs', '*.md')):
    for block in re.findall(r'```(?:bash|sh)?\n(.*?)```', open(path).read(), re.S):
      for line in block.replace('\\\n', ' ').splitlines():
        line = line.split(' #')[0].strip()
        if not line.startswith('fmir ') or '[' in line:
          continue
        try:
          parser.parse_args(shlex.split(line)[1:])
        except SystemExit:
          raise AssertionError(f'{os.path.relpath(path, root)}: {line}') from None
        seen += 1
  assert seen >= 5
