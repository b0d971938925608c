"""Entry points of the absl scripts (train.py, eval.py)."""
from __future__ import annotations

import sys
from typing import Callable

from absl import app

_HELP = ('--help', '-h', '-?', '--helpshort', '--helpfull', '--helpxml')


def run_absl(main: Callable) -> None:
  """``absl.app.run(main)``, except that asking for help exits 0 (absl exits 1)."""

  def parse(argv):
    try:
      return app.parse_flags_with_usage(argv)
    except SystemExit as e:
      if e.code == 1 and any(a in _HELP for a in argv[1:]):
        sys.exit(0)
      raise

  app.run(main, flags_parser=parse)
