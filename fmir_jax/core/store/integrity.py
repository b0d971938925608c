"""Shard integrity: size, header and sha256 checks against the manifest, and the repair hint.

Each shard's sha256 is computed once per process per file state (``_VERIFIED``); a reader may
skip it (``FMIR_SKIP_SHARD_VERIFY=1``). A bad shard's error names its volumes and the command
that repairs the store in place (``REPAIR_HINT``).
"""
from __future__ import annotations

import os
import threading
from typing import Any, Mapping

from fmir_jax.core import files
from fmir_jax.core.store import format as fmt
from fmir_jax.core.store.format import StoreError


SKIP_VERIFY_ENV = 'FMIR_SKIP_SHARD_VERIFY'
REPAIR_HINT = ('Re-run the feature_extract/run.py command that wrote this store, with the same '
               'arguments (then --merge if it used --num-shards): it re-extracts only these '
               'volumes and repairs the store in place.')


# (absolute path, inode, size in bytes, mtime in ns, sha256) of shards hashed in this process.
_VERIFIED: set[tuple[str, int, int, int, str]] = set()
_VERIFY_LOCK = threading.Lock()


def _sha256_problem(path: str, expected_sha256: str) -> str | None:
  """None if the file hashes to `expected_sha256` (hashed once per process per file state)."""
  try:
    st = os.stat(path)
  except FileNotFoundError:
    return f'{path}: shard file is missing'
  token = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns, expected_sha256)
  if token in _VERIFIED:
    return None
  with _VERIFY_LOCK:  # one thread hashes a shard; the others wait for its verdict
    if token not in _VERIFIED:
      if files.file_digest(path) != expected_sha256:
        return f'{path}: sha256 mismatch with the manifest (the bytes changed on disk)'
      _VERIFIED.add(token)
  return None


def shard_problem(path: str, shard: Mapping[str, Any], *, check_sha256: bool = True
                  ) -> str | None:
  """What is wrong with a shard file given its manifest record, or None if it is sound.

  Args:
    path: the shard file.
    shard: its manifest record ({"file", "keys", "bytes", "sha256"}).
    check_sha256: also compare the sha256 (reads the whole file, once per process).

  Returns:
    One sentence naming the file (missing, corrupt header, truncated, sha256 mismatch), or None.
  """
  try:
    _, _, size = fmt._parse_shard_header(path)
  except StoreError as e:
    return str(e).rstrip('.')
  if size != shard['bytes']:
    return (f'{path}: {size} bytes on disk, the manifest says {shard["bytes"]} (truncated, or '
            'written by another run)')
  return _sha256_problem(path, shard['sha256']) if check_sha256 else None


def _bad_shard(problem: str, shard: Mapping[str, Any]) -> StoreError:
  keys = shard['keys']
  return StoreError(f'{problem}; it holds volumes {", ".join(keys[:20])}'
                    f'{" ..." if len(keys) > 20 else ""}. {REPAIR_HINT}')


def _skip_verify_from_env() -> bool:
  return os.environ.get(SKIP_VERIFY_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on')
