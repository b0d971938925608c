"""The files of a run folder besides its checkpoints: ``run.json`` (written by train.py,
checked on every load) and the PCA bases (``pca/<tag>.npz``, one per backbone and layer).

Reads and checks files only (no checkpoint restore): commands that read a run check these
before any model is built.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

import numpy as np

from fmir_jax.core import errors
from fmir_jax.core import files
from fmir_jax.core import store as store_lib
from fmir_jax.model import channel_reg
from fmir_jax.model import network as model_lib
from fmir_jax.ops import conv as conv_lib

RUN_FILE = 'run.json'
VAL_LOG = 'val.jsonl'               # train.loop.VAL_LOG: one record per validation
RunError = errors.RunError
RunNotFoundError = errors.RunNotFoundError


def _factors(f) -> Any:
  """Pyramid factors as tuples (run.json holds lists): one triple or one per level."""
  return None if f is None else tuple(tuple(v) if isinstance(v, (list, tuple)) else v for v in f)


@dataclasses.dataclass(frozen=True)
class StoreSetting:
  """How a store's pairs are trained and scored (one ``store_settings`` entry of run.json).

  factors: pyramid factors (one (sx, sy, sz) triple or one per level transition; None: the
    model's own, for runs written before the field).
  num_classes: foreground labels scored (1..num_classes).
  blur_in_plane_only: the label blur of the Dice loss stays in-plane (thick slices).
  spacing_mm: the store's voxel size (evaluation and ``fmir register`` match stores by it).
  """
  factors: tuple | None
  num_classes: int
  blur_in_plane_only: bool = False
  spacing_mm: tuple[float, float, float] | None = None

  def to_json(self) -> dict[str, Any]:
    """The run.json entry (the keys every run folder has had)."""
    out = {'factors': self.factors, 'num_classes': self.num_classes,
           'blur_in_plane_only': self.blur_in_plane_only}
    if self.spacing_mm is not None:
      out['spacing_mm'] = list(self.spacing_mm)
    return out

  @classmethod
  def from_json(cls, entry: dict[str, Any]) -> 'StoreSetting':
    sp = entry.get('spacing_mm')
    return cls(factors=_factors(entry.get('factors')), num_classes=int(entry['num_classes']),
               blur_in_plane_only=bool(entry.get('blur_in_plane_only', False)),
               spacing_mm=None if sp is None else tuple(float(v) for v in sp))


def unwritable_reason(path: str) -> str | None:
  """Why ``path`` cannot be (created as) a writable directory, or None when it can.

  Looks at ``path`` or its nearest existing ancestor; creates nothing.
  """
  p = os.path.abspath(path)
  while not os.path.exists(p):     # also False below a regular file (file.txt/sub)
    p = os.path.dirname(p)
  if not os.path.isdir(p):
    return f'{p} is a file, not a directory'
  if not os.access(p, os.W_OK | os.X_OK):
    return f'{p} is not writable'
  return None


def write_run_info(workdir: str, info: dict[str, Any]) -> None:
  os.makedirs(workdir, exist_ok=True)
  with files.atomic_path(os.path.join(workdir, RUN_FILE)) as tmp, open(tmp, 'w') as f:
    f.write(json.dumps(info, indent=2, sort_keys=True))


def read_run_info(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, RUN_FILE)
  if not os.path.exists(path):
    raise RunNotFoundError(f'{path} not found: {workdir} is not an fmir-jax training run '
                           '(train.py --workdir=... creates it)')
  try:
    with open(path) as f:
      return json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise RunError(f'{path} is not readable JSON ({errors.one_line(e)}); put back the run.json that '
                   'train.py wrote for this run') from e


def _tuples(v):
  return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


def _field_problem(field: dataclasses.Field, v) -> str | None:
  """Why ``v`` (from JSON) cannot be the value of an ``FMIRConfig`` field, or None."""
  default = field.default
  if isinstance(default, bool):
    return None if isinstance(v, bool) else 'must be true or false'
  if isinstance(default, int):
    low = 0 if field.name in ('integration_steps', 'finest_level') else 1
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= low else \
        f'must be an integer >= {low}'
  if isinstance(default, str):
    choices = {'activation': model_lib.ACTIVATIONS, 'kernel_init': model_lib.KERNEL_INITS,
               'flow_init': model_lib.FLOW_INITS, 'conv_impl': conv_lib.IMPLS}.get(field.name)
    if not isinstance(v, str) or (choices is not None and v not in choices):
      return f'must be one of {sorted(choices)}' if choices is not None else 'must be a string'
    return None
  if isinstance(default, tuple):         # factors: one (sx, sy, sz) triple or one per level
    triples = v if isinstance(v, list) and v and isinstance(v[0], list) else [v]
    if not (isinstance(v, list) and v and all(
        isinstance(t, list) and len(t) == 3 and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in t)
        for t in triples)):
      return 'must be one positive integer triple [sx, sy, sz], or a list of them'
  return None


def check_run_info(workdir: str, info: Any) -> None:
  """RunError naming run.json, the key and the fix when ``info`` (its content) cannot describe
  a model: a missing entry, an unknown key under ``model`` or ``config.model``, a value of the
  wrong type, or the two model sections disagreeing (an edited file)."""
  path = os.path.join(workdir, RUN_FILE)
  fix = 'put back the run.json that train.py wrote for this run (or train it again)'

  def bad(what: str):
    raise RunError(f'{path}: {what}; {fix}')

  if not isinstance(info, dict):
    bad('not a JSON object')
  for key, kind in (('config', dict), ('model', dict), ('store_header', dict),
                    ('total_steps', int)):
    if not isinstance(info.get(key), kind) or isinstance(info.get(key), bool):
      bad(f'{key!r} is missing or not a JSON {"object" if kind is dict else "integer"}')
  fields = {f.name: f for f in dataclasses.fields(model_lib.FMIRConfig)}
  config = info['config']
  for name, v in (('store_header.channels', info['store_header'].get('channels')),
                  ('config.feature_channels', config.get('feature_channels'))):
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      bad(f'{name} is {v!r}, must be an integer >= 1')
  if not isinstance(config.get('model'), dict):
    bad("'config.model' is missing or not a JSON object")
  required = ('n', 'levels', 'factors', 'integration_steps', 'activation',
              'head_instance_norm', 'exact_feature_path')     # train_lib.model_config reads
  for section, known in (('model', fields), ('config.model', {
      k: f for k, f in fields.items() if k != 'feature_channels'})):
    values = info['model'] if section == 'model' else config['model']
    for key, v in values.items():
      if key not in known:
        bad(f'unknown key {key!r} under {section!r} (known: {", ".join(sorted(known))})')
      problem = _field_problem(known[key], v)
      if problem:
        bad(f'{section}.{key} is {v!r}: it {problem}')
    if section == 'config.model':
      for key in required:
        if key not in values:
          bad(f'no key {key!r} under {section!r}')
  built = {**{k: f.default for k, f in fields.items()}, **config['model'],
           'feature_channels': config['feature_channels']}
  saved = {**{k: f.default for k, f in fields.items()}, **info['model']}
  for key in fields:
    if _tuples(built[key]) != _tuples(saved[key]):
      where = 'config.feature_channels' if key == 'feature_channels' else f'config.model.{key}'
      bad(f'model.{key} is {saved[key]!r} but {where} is {built[key]!r}')




def backbone_tag(header: dict[str, Any]) -> str:
  """A file-name tag for a store's feature space: backbone name, weights and layer."""
  name = store_lib.backbone_name(header)
  ident = json.dumps({f: store_lib.get_field(header, f) for f in store_lib.COMPAT_FIELDS},
                     sort_keys=True)
  digest = hashlib.sha256(ident.encode()).hexdigest()[:10]
  return re.sub(r'[^A-Za-z0-9._-]', '_', f'{name}-layer{header.get("layer")}-{digest}')


def pca_path(workdir: str, header: dict[str, Any]) -> str:
  return os.path.join(workdir, 'pca', backbone_tag(header) + '.npz')


def save_pca(workdir: str, header: dict[str, Any], basis: channel_reg.PCABasis,
             source: str) -> str:
  path = pca_path(workdir, header)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arrays = {k: np.asarray(v) for k, v in basis.to_dict().items()}
  arrays['header_json'] = np.asarray(json.dumps(header, sort_keys=True))
  arrays['source'] = np.asarray(source)
  with files.atomic_path(path) as tmp:
    np.savez(tmp, **arrays)
  return path


def load_pca(workdir: str, header: dict[str, Any]) -> channel_reg.PCABasis | None:
  """The run's PCA basis for ``header``'s feature space; None when there is none.

  A file that is not a plain-array .npz basis (truncated, pickled, other keys) raises
  RunError naming it and the refit command.
  """
  path = pca_path(workdir, header)
  if not os.path.exists(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      d = {k: z[k] for k in z.files if k not in ('header_json', 'source')}
    return channel_reg.PCABasis.from_dict(d)
  except Exception as e:  # zipfile, pickle, numpy and key errors alike
    raise RunError(
        f'{path} is not a readable PCA basis ({errors.one_line(e)}). Delete it and refit it: '
        f'python eval.py --workdir={workdir} --features=STORE --pca_store=TRAIN_STORE '
        '(TRAIN_STORE: features of this backbone on training data; for the training '
        f'backbone, resuming train.py --workdir={workdir} also refits it)') from e
