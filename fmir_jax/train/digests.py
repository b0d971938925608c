"""sha256 records of what a run folder holds: each checkpoint step's files (recorded when
Orbax has finished writing them, checked on every restore) and a shipped head's card."""
from __future__ import annotations

import json
import os

from absl import logging

from fmir_jax.core import errors
from fmir_jax.core import files

DIGESTS_FILE = 'fmir_sha256.json'   # in each step folder: {"sha256": {relative path: hex}}
HEAD_CARD = 'general_head.json'     # general.CARD: a shipped head's card, its files' sha256


def folder_digests(folder: str, skip=(DIGESTS_FILE,)) -> dict[str, str]:
  """{path relative to ``folder`` (with /): sha256} of every file below ``folder`` but
  ``skip`` and hidden ones (temporary files, .gitattributes: not part of the data)."""
  out = {}
  for root, dirs, names in os.walk(folder):
    dirs[:] = sorted(d for d in dirs if not d.startswith('.'))
    for name in sorted(n for n in names if not n.startswith('.')):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, folder).replace(os.sep, '/')
      if rel not in skip:
        out[rel] = files.file_digest(path)
  return out


def record_digests(folder: str) -> str:
  """Writes ``folder/fmir_sha256.json``: the sha256 of every other file of the checkpoint
  folder (after Orbax has finished it). Returns its path."""
  path = os.path.join(folder, DIGESTS_FILE)
  with files.atomic_path(path) as tmp, open(tmp, 'w') as f:
    json.dump({'sha256': folder_digests(folder)}, f, indent=0, sort_keys=True)
  return path


def digest_problem(folder: str, record: str | None = None) -> str | None:
  """None when every file listed in the digest record (default ``folder/fmir_sha256.json``)
  has its recorded sha256; else one sentence naming the first file that does not. A folder
  without a record (written before digests were recorded) passes unchecked."""
  record = record or os.path.join(folder, DIGESTS_FILE)
  if not os.path.exists(record):
    logging.debug('%s: no %s (written before checkpoints recorded digests); not verified',
                  folder, DIGESTS_FILE)
    return None
  try:
    with open(record) as f:
      expected = json.load(f)['sha256']
    expected = {str(k): str(v) for k, v in expected.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return f'{record} is not a readable digest record ({errors.one_line(e)})'
  for rel, sha in sorted(expected.items()):
    path = os.path.join(folder, *rel.split('/'))
    if not os.path.isfile(path):
      return f'{path} is missing (listed in {record})'
    if files.file_digest(path) != sha:
      return (f'{path} does not match its sha256 in {record}, recorded when it was written '
              '(its bytes changed on disk)')
  return None


def shipped_head_problem(folder: str) -> str | None:
  """``digest_problem`` of a shipped head (``python -m fmir_jax.general --ship``) against the
  sha256 its card records; None for a folder without a card, or a card without digests."""
  card = os.path.join(folder, HEAD_CARD)
  if not os.path.isfile(card):
    return None
  try:
    with open(card) as f:
      recorded = 'sha256' in json.load(f)
  except (OSError, ValueError, TypeError) as e:
    return f'{card} is not readable JSON ({errors.one_line(e)})'
  return digest_problem(folder, card) if recorded else None


