"""Test-session setup: CPU only, and a persistent XLA compilation cache shared by the tests
of one session, its pytest-xdist workers and the processes they start (train.py, the
notebook's kernel, benches), so identical programs (the same tiny model trained by several
tests) compile once."""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import jax  # noqa: E402

_CACHE = os.environ.get('FMIR_TEST_JAX_CACHE')
if not _CACHE:     # this session's own folder, removed when the session's process exits;
  _CACHE = tempfile.mkdtemp(prefix='fmir-jax-cache-')     # its xdist workers inherit it
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ['FMIR_TEST_JAX_CACHE'] = _CACHE
jax.config.update('jax_compilation_cache_dir', _CACHE)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)          # child processes
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import pytest  # noqa: E402


@pytest.fixture(scope='session')
def run_dir(tmp_path_factory):
  """The tiny trained run of tests/helpers/tiny_run.py, shared by the register tests (read only)."""
  from tests.helpers import tiny_run
  return tiny_run.build(str(tmp_path_factory.mktemp('data')),
                        str(tmp_path_factory.mktemp('run')))
