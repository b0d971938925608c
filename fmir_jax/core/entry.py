"""Entry points of the absl scripts (train.py, eval.py).

Flag errors follow the project's rule for user errors: one line ``error: ...`` on stderr and
exit status 2 (absl prints two lines and exits 1). A misspelt config field
(``--config.train.nmu_steps=2``), which ml_collections reports with a traceback, is one such
line too, naming the field and the fields of that name closest to it. Asking for help exits 0.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import sys
from typing import Callable, NoReturn

from absl import app
from absl import flags

_HELP = ('--help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')
_HINT = ' (--helpshort lists the flags)'


def _fail(message: str) -> NoReturn:
  print(f'error: {" ".join(message.split())}', file=sys.stderr)
  sys.exit(2)


def _config_flag_names(fv: flags.FlagValues) -> list[str]:
  """Names of the config-file flags defined (``config_flags.DEFINE_config_file``); none when
  ml_collections is not in use."""
  module = sys.modules.get('ml_collections.config_flags.config_flags')
  if module is None:
    return []
  return sorted({name for name in fv if isinstance(fv[name].parser, module.ConfigFileFlagParser)})


def _argv_value(argv: list[str], name: str) -> str | None:
  """The value of ``--name=VALUE`` / ``--name VALUE`` in argv (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    m = re.fullmatch(rf'--?{re.escape(name)}(=(.*))?', arg)
    if m:
      value = m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _expanded(argv: list[str], fv: flags.FlagValues) -> list[str]:
  """argv with any --flagfile=FILE read in, as ml_collections reads it for its overrides."""
  try:
    return fv.read_flags_from_files(argv, force_gnu=False)
  except flags.Error:       # reported by the parse itself
    return argv


def _missing_config_file(argv: list[str], fv: flags.FlagValues) -> str | None:
  """The error line for a ``--config=PATH`` whose file does not exist (ml_collections defers
  it to a traceback at the first use of the config), or None."""
  names = _config_flag_names(fv)
  argv = _expanded(argv, fv) if names else argv
  for name in names:
    value = _argv_value(argv, name)
    if value is not None and not os.path.isfile(value.split(':', 1)[0]):
      return (f'--{name}={value}: no such config file; give the path of a config file '
              '(configs/*.py)')
  return None


def _field_paths(node, prefix: str = '') -> list[str]:
  """Dotted paths of every field of a ConfigDict (inner nodes included)."""
  out = []
  for key in node.keys():
    path = f'{prefix}{key}'
    out.append(path)
    if hasattr(node[key], 'keys') and callable(node[key].keys):
      out += _field_paths(node[key], path + '.')
  return out


def _field_problem(config, path: str, flag: str) -> str | None:
  """Why ``path`` (``train.nmu_steps``) names no field of ``config`` (the value of ``--flag``),
  or None when it does (or when it cannot tell: the override's own error stands then)."""
  done = []
  node = config
  for part in path.split('.'):
    m = re.fullmatch(r'([A-Za-z_]\w*)((?:\[-?\d+\])*)', part)
    if not m:
      return None
    key, indices = m.group(1), m.group(2)
    if not (hasattr(node, 'keys') and callable(node.keys)):
      return (f'{".".join(done)} is a value ({node!r}), not a group of fields; override '
              f'--{flag}.{".".join(done)} itself')
    if key not in node.keys():
      where = '.'.join(done)
      close = [f'{where}.{k}' if where else k
               for k in difflib.get_close_matches(key, [str(k) for k in node.keys()], n=3)]
      if not close:
        close = difflib.get_close_matches('.'.join(done + [key]), _field_paths(config), n=3)
      if close:
        hint = 'did you mean ' + ' or '.join(f'--{flag}.{c}' for c in close) + '?'
      else:
        hint = (f'the fields of {where} are ' if where else 'its top-level fields are ') + \
            ', '.join(sorted(str(k) for k in node.keys()))
      return f'the config has no field {".".join(done + [key])}; {hint}'
    node = node[key]
    for index in re.findall(r'-?\d+', indices):
      try:
        node = node[int(index)]
      except (TypeError, IndexError, KeyError):
        return None
    done.append(part)
  return None


def _config_override_problem(argv: list[str], fv: flags.FlagValues) -> str | None:
  """The error line for a ``--config.FIELD=...`` override naming no field of the config
  file's config, or None (then the exception raised while parsing is not the user's)."""
  names = _config_flag_names(fv)
  argv = _expanded(argv, fv) if names else argv
  for name in names:
    value = _argv_value(argv, name)
    if not value:
      continue
    overrides = [m.group(1) for a in argv
                 if (m := re.match(rf'--?(?:no)?{re.escape(name)}\.([^=\s]+)', a))]
    if not overrides:
      continue
    try:
      config = fv[name].parser.parse(value)
    except Exception:     # the config file itself fails: its own error stands
      return None
    for path in overrides:
      problem = _field_problem(config, path, name)
      if problem:
        value_of = next((a.split('=', 1)[1] for a in argv
                         if re.match(rf'--?(?:no)?{re.escape(name)}\.{re.escape(path)}=', a)),
                        None)
        shown = f'--{name}.{path}' + (f'={value_of}' if value_of is not None else '')
        return f'{shown}: {problem}'
  return None


def parse_flags(argv: list[str], flag_values: flags.FlagValues | None = None) -> list[str]:
  """``absl.app.parse_flags_with_usage`` with the project's exit statuses: a flag error is
  one line ``error: ...`` and exit 2; help exits 0. Returns the arguments left over.

  flag_values: the flags to parse into (default ``absl.flags.FLAGS``).
  """
  fv = flags.FLAGS if flag_values is None else flag_values
  problem = _missing_config_file(argv, fv)
  if problem:
    _fail(problem)
  try:
    return fv(argv)
  except flags.Error as e:
    message = str(e)
    if 'Traceback (most recent call last)' in message:    # a config file that raises
      print(message, file=sys.stderr)
      _fail(message.split('\n', 1)[0].rstrip(': ') + ' (the traceback above shows where)')
    _fail(message + _HINT)
  except SystemExit as e:
    if e.code == 1 and any(a in _HELP for a in argv[1:]):
      sys.exit(0)
    raise
  except Exception:
    # ml_collections raises KeyError/AttributeError (with a traceback) for an override of a
    # field the config lacks; only that case is the user's, anything else propagates.
    problem = _config_override_problem(argv, fv)
    if problem is None:
      raise
    _fail(problem)


def run_absl(main: Callable) -> None:
  """``absl.app.run(main)`` with ``parse_flags``: flag errors exit 2, help exits 0."""
  app.run(main, flags_parser=parse_flags)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """--help with every option's default: '(default: X)' is added unless the help gives one."""

  def _get_help_string(self, action):
    text = action.help or ''
    if ('(default' in text or 'default:' in text or action.required
        or not action.option_strings or action.default is argparse.SUPPRESS):
      return text
    return f'{text} (default: %(default)s)'
