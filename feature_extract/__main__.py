"""``python -m feature_extract``: the same command as ``python feature_extract/run.py``."""
import os
import sys

from feature_extract import run

if __name__ == '__main__':
  # argparse names the program after argv[0]: the same usage line as feature_extract/run.py.
  sys.argv[0] = os.path.join(os.path.dirname(os.path.abspath(run.__file__)), 'run.py')
  sys.exit(run.main())
