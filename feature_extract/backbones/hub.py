"""Hugging Face checkpoints: where weights come from, what is refused, and their identity.

Rules, in order: a local directory (must hold config.json) is loaded with no network; a Hub id
is looked up in the Hugging Face cache first (no network, no retries) and downloaded only when
HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are unset and the Hub answers. A file instead of a
directory, a pickled checkpoint (torch.save; unpickling runs code) and a checkpoint that
leaves parameters randomly initialised are refused with what to do instead.

The weights' identity in the manifest is ``hash_weights`` (sha256 over the weight files) plus
the cache snapshot ``revision``. Image normalisation comes from ``preprocessor_config.json``;
the published defaults (paper §2.2, the models' cards) are used only when that file is absent,
and the header records which (``normalisation.source``).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import socket
import urllib.parse
import zipfile
from typing import Any

from fmir_jax.core.errors import BackboneError

DEFAULT_WEIGHTS = {
    'dinov3': 'facebook/dinov3-vitb16-pretrain-lvd1689m',
    'dinov2': 'facebook/dinov2-base',
    'sam': 'facebook/sam-vit-base',
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Published fallbacks (paper §2.2), used only when the checkpoint has no
# preprocessor_config.json.
DEFAULT_NORMALISATION = {'dinov3': (IMAGENET_MEAN, IMAGENET_STD),
                         'dinov2': (IMAGENET_MEAN, IMAGENET_STD),
                         'sam': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pt')


def _offline() -> bool:
  # huggingface_hub only once weights are looked up: names and help stay light.
  from huggingface_hub import constants  # pylint: disable=g-import-not-at-top
  env = os.environ.get('HF_HUB_OFFLINE') or os.environ.get('TRANSFORMERS_OFFLINE') or ''
  return constants.HF_HUB_OFFLINE or env.strip().upper() in ('1', 'ON', 'YES', 'TRUE')


def _hub_reachable(timeout_s: float = 5.0) -> bool:
  """Quick TCP probe of the Hub endpoint (skipped, i.e. True, when a proxy is configured)."""
  if any(os.environ.get(v) for v in ('HTTPS_PROXY', 'https_proxy', 'ALL_PROXY', 'all_proxy')):
    return True
  url = urllib.parse.urlparse(os.environ.get('HF_ENDPOINT', 'https://huggingface.co'))
  try:
    with socket.create_connection((url.hostname, url.port or 443), timeout=timeout_s):
      return True
  except OSError:
    return False


def _download_help(name: str, weights: str) -> str:
  """How to get the weights, with the `hf` CLI that huggingface_hub installs."""
  gated = ('The DINOv3 checkpoints are gated: accept the licence on the model page '
           f'(https://huggingface.co/{weights}) and run `hf auth login` first. '
           if name == 'dinov3' else '')
  return (f'{gated}Download with `hf download {weights} --local-dir DIR` on a machine with '
          'internet and pass --weights DIR, or populate the Hugging Face cache.')


def _looks_like_path(weights: str) -> bool:
  """Hub ids are "name" or "org/name"; anything else path-like is a local directory."""
  return (os.path.isabs(weights) or weights.startswith(('.', '~')) or weights.count('/') > 1
          or '\\' in weights)


_CONVERT = ('convert the weights to safetensors on a machine you trust (transformers: '
            'Model.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)) and '
            'pass --weights OUT')


def _is_pickle(path: str) -> bool:
  """A raw pickle, or torch.save's zip with a pickled ``data.pkl``."""
  try:
    with open(path, 'rb') as f:
      if f.read(1) == b'\x80':
        return True
    with zipfile.ZipFile(path) as z:
      return any(n.endswith('data.pkl') for n in z.namelist())
  except (OSError, zipfile.BadZipFile):
    return False


def _from_pretrained(cls: Any, source: str, weights: str, **kwargs: Any) -> Any:
  """from_pretrained that refuses checkpoints leaving parameters randomly initialised, and
  pickled weights that torch's weights-only loader refuses (they would run code)."""
  try:
    model, info = cls.from_pretrained(source, output_loading_info=True, **kwargs)
  except pickle.UnpicklingError as e:
    raise BackboneError(f'--weights {weights}: the weights are a pickle that the safe '
                        'loader refuses (it names code to run), and fmir-jax never unpickles '
                        f'such files: {_CONVERT}.') from e
  missing = sorted(info.get('missing_keys') or [])
  if missing:
    raise BackboneError(f'--weights {weights}: the checkpoint lacks {len(missing)} parameters '
                        f'of {cls.__name__} (e.g. {missing[:3]}); refusing to run with random '
                        'weights. Check that --weights matches --backbone.')
  return model


def load_pretrained(cls: Any, name: str, weights: str) -> tuple[Any, str]:
  """Loads a frozen model from a local dir or a Hub id; returns (model, model directory).

  Args:
    cls: a transformers model class (``from_pretrained``).
    name: the BACKBONES name (for messages and download advice).
    weights: a local model directory or a Hub id.
  """
  # transformers only when a checkpoint is loaded: MIND, names and --help stay light.
  import transformers  # pylint: disable=g-import-not-at-top
  transformers.utils.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  if os.path.isfile(os.path.expanduser(weights)):
    if _is_pickle(os.path.expanduser(weights)):
      raise BackboneError(f'--weights {weights}: a pickled file (torch.save), which fmir-jax '
                          f'does not load (unpickling runs code): {_CONVERT}.')
    raise BackboneError(f'--weights {weights}: a file, not a model directory; pass the '
                        'directory that holds it and its config.json (as save_pretrained or '
                        '`hf download REPO_ID --local-dir DIR` write it).')
  if os.path.isdir(os.path.expanduser(weights)):
    model_dir = os.path.expanduser(weights)
    if not os.path.exists(os.path.join(model_dir, 'config.json')):
      raise BackboneError(f'--weights {weights}: directory has no config.json; point it at a '
                          'directory written by save_pretrained or by '
                          '`hf download REPO_ID --local-dir DIR`.')
    try:
      return _from_pretrained(cls, model_dir, weights, local_files_only=True), model_dir
    except (OSError, ValueError) as e:
      raise BackboneError(f'--weights {weights}: cannot load {name} from this directory: '
                          f'{str(e).splitlines()[0]}') from e
  if _looks_like_path(weights):
    raise BackboneError(f'--weights {weights}: local weights directory does not exist. '
                        + _download_help(name, DEFAULT_WEIGHTS.get(name, weights)))
  try:  # the Hugging Face cache first: no network, no retries
    model = _from_pretrained(cls, weights, weights, local_files_only=True)
  except (OSError, ValueError) as cache_error:
    if _offline():
      raise BackboneError(f'{name}: weights {weights!r} are not in the Hugging Face cache and '
                          'HF_HUB_OFFLINE is set. ' + _download_help(name, weights)
                          ) from cache_error
    if not _hub_reachable():
      raise BackboneError(f'{name}: weights {weights!r} are not cached and the Hugging Face Hub '
                          'cannot be reached. ' + _download_help(name, weights)) from cache_error
    try:
      model = _from_pretrained(cls, weights, weights)
    except (OSError, ValueError) as e:
      raise BackboneError(f'{name}: cannot download {weights!r}: {str(e).splitlines()[0]} '
                          + _download_help(name, weights)) from e
  config_path = transformers.utils.cached_file(weights, 'config.json', local_files_only=True)
  return model, os.path.dirname(config_path)


def hash_weights(model_dir: str) -> str:
  """sha256 over the weight files (*.safetensors, *.bin, ...) of a model directory."""
  digest = hashlib.sha256()
  files = sorted(f for f in os.listdir(model_dir) if f.endswith(_WEIGHT_SUFFIXES))
  if not files:
    raise BackboneError(f'{model_dir}: no weight files ({", ".join(_WEIGHT_SUFFIXES)}) found.')
  for name in files:
    digest.update(name.encode() + b'\0')
    with open(os.path.join(model_dir, name), 'rb') as f:
      for block in iter(lambda: f.read(1 << 22), b''):
        digest.update(block)
  return digest.hexdigest()


def revision(model_dir: str) -> str | None:
  """The Hugging Face cache snapshot (commit) a model directory is, else None."""
  parts = os.path.normpath(model_dir).split(os.sep)
  return parts[-1] if len(parts) > 1 and parts[-2] == 'snapshots' else None


def normalisation(name: str, model_dir: str) -> tuple[tuple, tuple, str]:
  """(mean, std, source) from preprocessor_config.json, else the published default for `name`."""
  path = os.path.join(model_dir, 'preprocessor_config.json')
  if os.path.exists(path):
    with open(path, encoding='utf-8') as f:
      proc = json.load(f)
    if 'image_mean' in proc and 'image_std' in proc:
      mean, std = proc['image_mean'], proc['image_std']
      if isinstance(mean, (int, float)):
        mean, std = [mean] * 3, [std] * 3
      return tuple(map(float, mean)), tuple(map(float, std)), 'preprocessor_config.json'
  mean, std = DEFAULT_NORMALISATION[name]
  return mean, std, 'published default (no preprocessor_config.json with image_mean/std)'
