"""The general head shipped in the package (``fmir_jax/weights/general``): where it is, its
card (``general_head.json``: what it is, how it was trained, the sha256 of every shipped
file) and how a shipped copy is sealed. ``python -m fmir_jax.general`` builds and ships it;
``fmir register`` loads it when no --checkpoint is given."""
from __future__ import annotations

import json
import os
from typing import Any

from fmir_jax.core import errors
from fmir_jax.core import files
from fmir_jax.train import digests

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'weights',
                       'general')
CARD = digests.HEAD_CARD


def default_checkpoint() -> str:
  """The general head shipped in the package (``SHIPPED``); RegisterError when missing."""
  if not os.path.isfile(os.path.join(SHIPPED, 'run.json')):
    raise errors.RegisterError(
        f'no --checkpoint given and no general head is installed ({SHIPPED} holds no '
        'run): pass --checkpoint RUN_DIR (a train.py --workdir), or build the general head: '
        f'python -m fmir_jax.general --out general_out --ship {SHIPPED}')
  return SHIPPED


def read_card(checkpoint: str) -> dict[str, Any] | None:
  """A run's head card (``general_head.json``: what it is, how it was trained, the sha256 of
  every shipped file), or None."""
  path = os.path.join(checkpoint, CARD)
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      card = json.load(f)
  except (OSError, ValueError) as e:
    raise errors.RunError(f'{path} is not readable JSON ({" ".join(str(e).split())}); '
                   f'{_reship_fix(checkpoint)}') from e
  if not isinstance(card, dict):
    raise errors.RunError(f'{path} is not a JSON object; {_reship_fix(checkpoint)}')
  return card


def _reship_fix(checkpoint: str) -> str:
  if os.path.abspath(checkpoint) == SHIPPED:
    return ('reinstall fmir-jax (pip install --force-reinstall fmir-jax, or git checkout '
            f'{SHIPPED} in a clone), or rebuild the head: python -m fmir_jax.general --out '
            f'general_out --ship {SHIPPED}')
  return (f'ship it again: python -m fmir_jax.general --out OUT --ship {checkpoint}, or pass '
          '--checkpoint with the training run itself')


def seal(dest: str) -> str:
  """Records the sha256 of every other file of a shipped head in its card (``sha256``;
  ``runs.load_run`` checks them), and of its checkpoint in the step folder
  (``digests.DIGESTS_FILE``) where the run recorded none. Returns the card's path."""
  for folder in sorted(os.listdir(os.path.join(dest, 'best'))):
    step = os.path.join(dest, 'best', folder)
    if os.path.isdir(step) and not os.path.exists(os.path.join(step, digests.DIGESTS_FILE)):
      digests.record_digests(step)
  card_path = os.path.join(dest, CARD)
  with open(card_path) as f:
    card = json.load(f)
  card['sha256'] = digests.folder_digests(dest, skip=(CARD,))
  with files.atomic_path(card_path) as tmp, open(tmp, 'w') as f:
    json.dump(card, f, indent=1)
  return card_path
