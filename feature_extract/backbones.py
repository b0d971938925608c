"""Frozen 2D encoders: a batch of K x K slices -> patch-grid features.

Backbones (all frozen, eval mode, no_grad):

* ``dinov3``: DINOv3 ViT (default facebook/dinov3-vitb16-pretrain-lvd1689m, gated),
  transformers ``DINOv3ViTModel``.
* ``dinov2``: DINOv2 ViT (default facebook/dinov2-base), ``Dinov2Model`` (or the -reg variant).
* ``sam``: SAM image encoder (default facebook/sam-vit-base), ``SamVisionModel``; output is the
  neck (256 channels). transformers' SAM requires K = the config's image_size (1024).
* ``mind``: an offline, weight-free 2D MIND-SSC-style self-similarity descriptor. It is NOT a
  foundation model and is labelled so everywhere.

Aliases (``ALIASES``): ``dino`` = ``dinov3``, ``sam-b`` = ``sam``; ``canonical_name`` resolves
them and suggests the closest valid name for a typo.

Patch size, hidden size, the number of CLS + register tokens, and the image normalisation come
from the model config and its ``preprocessor_config.json``; the published defaults (paper §2.2, the models' cards) are used only
when that file is absent, and the header records which (``normalisation.source``).

``layer``: an int indexes ``hidden_states`` (0 = embeddings, i = output of block i; blocks after
i are not run), "last" = ``last_hidden_state`` (after the final norm).

Precision: ``float32`` everywhere; ``bfloat16`` autocast on CUDA and on CPU; ``float16``
autocast on CUDA only (refused on CPU, where half matmuls are slow or unsupported).
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import os
import pickle
import socket
import urllib.parse
import zipfile
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fmir_jax.core.errors import BackboneError  # re-exported: its home is fmir_jax.errors
from fmir_jax.core.errors import parse_layer

BACKBONES = ('dinov3', 'dinov2', 'sam', 'mind')
ALIASES = {'dino': 'dinov3', 'sam-b': 'sam'}   # what people call them -> BACKBONES name
DEFAULT_WEIGHTS = {
    'dinov3': 'facebook/dinov3-vitb16-pretrain-lvd1689m',
    'dinov2': 'facebook/dinov2-base',
    'sam': 'facebook/sam-vit-base',
}
_MODEL_TYPES = {
    'dinov3': ('dinov3_vit',),
    'dinov2': ('dinov2', 'dinov2_with_registers'),
    'sam': ('sam', 'sam_vision_model'),
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Published fallbacks (paper §2.2), used only when the checkpoint has no
# preprocessor_config.json.
DEFAULT_NORMALISATION = {'dinov3': (IMAGENET_MEAN, IMAGENET_STD),
                      'dinov2': (IMAGENET_MEAN, IMAGENET_STD),
                      'sam': ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
MIND_LABEL = 'mind (offline, not a foundation model)'
DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}
_WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pth', '.pt')


@dataclasses.dataclass
class Backbone:
  """A frozen encoder: (B, 3, K, K) normalised slices -> (B, K/p, K/p, c) features.

  ``describe()`` gives the manifest's ``backbone`` record; ``mean``/``std`` are the per-channel
  normalisation the slices must have.
  """
  name: str
  label: str
  weights: str | None
  weights_sha256: str
  revision: str | None
  model_type: str
  layer: int | str
  patch_size: int
  channels: int
  num_prefix_tokens: int
  mean: tuple[float, float, float]
  std: tuple[float, float, float]
  norm_source: str
  required_input_size: int | None
  device: torch.device
  dtype: str
  forward: Callable[[torch.Tensor], torch.Tensor] = dataclasses.field(repr=False)
  module: torch.nn.Module | None = dataclasses.field(default=None, repr=False)
  extra: dict[str, Any] = dataclasses.field(default_factory=dict)

  def describe(self) -> dict[str, Any]:
    record = {'name': self.name, 'label': self.label, 'weights': self.weights,
              'weights_sha256': self.weights_sha256, 'revision': self.revision,
              'model_type': self.model_type, 'num_prefix_tokens': self.num_prefix_tokens}
    record.update(self.extra)
    return record

  def check_input_size(self, input_size: int) -> None:
    """Raises BackboneError if K does not suit this encoder."""
    if self.required_input_size is not None and input_size != self.required_input_size:
      raise BackboneError(
          f'{self.label}: --input-size {input_size} is not supported. transformers\' SAM '
          f'checks the input size and has no positional-embedding interpolation, so K must be '
          f'{self.required_input_size} (the checkpoint\'s image_size). Use --input-size '
          f'{self.required_input_size}.')
    if input_size % self.patch_size:
      lo = input_size - input_size % self.patch_size
      raise BackboneError(f'{self.label}: --input-size {input_size} is not a multiple of the '
                          f'patch size {self.patch_size}; use {lo} or {lo + self.patch_size}.')

  def __call__(self, slices: torch.Tensor) -> np.ndarray:
    """(B, 3, K, K) float32 slices -> (B, K/p, K/p, c) float32 numpy features."""
    if slices.ndim != 4 or slices.shape[1] != 3 or slices.shape[2] != slices.shape[3]:
      raise BackboneError(f'{self.label}: slices must be (B, 3, K, K), got {tuple(slices.shape)}.')
    self.check_input_size(int(slices.shape[-1]))
    x = slices.to(self.device, torch.float32)
    with torch.inference_mode(), _autocast(self.device, self.dtype):
      feats = self.forward(x)
    grid = slices.shape[-1] // self.patch_size
    expected = (slices.shape[0], grid, grid, self.channels)
    if tuple(feats.shape) != expected:
      raise BackboneError(f'{self.label}: encoder returned {tuple(feats.shape)}, expected '
                          f'{expected}.')
    return feats.float().cpu().numpy()


def canonical_name(name: str) -> str:
  """A BACKBONES name for `name` or one of its ALIASES (case-insensitive).

  Raises:
    BackboneError: unknown name; the message suggests the closest valid one.
  """
  key = name.strip().lower()
  if key in BACKBONES:
    return key
  if key in ALIASES:
    return ALIASES[key]
  close = difflib.get_close_matches(key, BACKBONES + tuple(ALIASES), n=1)
  hint = f"Did you mean '{ALIASES.get(close[0], close[0])}'? " if close else ''
  raise BackboneError(f"--backbone: unknown backbone {name!r}. {hint}Choose one of "
                      f"{', '.join(BACKBONES)} (aliases: {alias_text()}).")


def alias_text() -> str:
  """'dino = dinov3, sam-b = sam' (for help and error messages)."""
  return ', '.join(f'{a} = {n}' for a, n in ALIASES.items())


# --------------------------------------------------------------------------- device / dtype


def resolve_device(device: str) -> tuple[torch.device, str]:
  """'auto' | 'cpu' | 'cuda' | 'cuda:N' -> (torch.device, human-readable description)."""
  if device == 'auto':
    device = 'cuda' if torch.cuda.is_available() else 'cpu'
  if device.startswith('cuda'):
    if not torch.cuda.is_available():
      raise BackboneError('--device cuda was requested but no CUDA GPU is visible to torch '
                          f'({torch.__version__}); use --device cpu or install a CUDA torch build.')
    dev = torch.device(device)
    return dev, f'{dev} ({torch.cuda.get_device_name(dev)})'
  if device != 'cpu':
    raise BackboneError(f'--device must be auto, cpu or cuda[:N], got {device!r}.')
  return torch.device('cpu'), f'cpu ({torch.get_num_threads()} threads)'


def check_dtype(dtype: str, device: torch.device) -> None:
  if dtype not in DTYPES:
    raise BackboneError(f'--dtype must be one of {sorted(DTYPES)}, got {dtype!r}.')
  if dtype == 'float16' and device.type == 'cpu':
    raise BackboneError('--dtype float16 is not supported on CPU; use float32 or bfloat16.')


def _autocast(device: torch.device, dtype: str):
  if dtype == 'float32':
    return torch.autocast(device.type, enabled=False)
  return torch.autocast(device.type, dtype=DTYPES[dtype])


# --------------------------------------------------------------------------- weights


def _offline() -> bool:
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


def _load_pretrained(cls: Any, name: str, weights: str) -> tuple[Any, str]:
  """Loads a frozen model from a local dir or a Hub id; returns (model, model directory)."""
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
  from transformers.utils import cached_file  # pylint: disable=g-import-not-at-top
  config_path = cached_file(weights, 'config.json', local_files_only=True)
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


def _revision(model_dir: str) -> str | None:
  parts = os.path.normpath(model_dir).split(os.sep)
  return parts[-1] if len(parts) > 1 and parts[-2] == 'snapshots' else None


def _normalisation(name: str, model_dir: str) -> tuple[tuple, tuple, str]:
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


# --------------------------------------------------------------------------- ViTs


def _vit_forward(model: Any, layer: int | str, num_prefix: int, patch: int
                 ) -> Callable[[torch.Tensor], torch.Tensor]:
  """Runs a ViT to `layer` and returns patch tokens as (B, K/p, K/p, c)."""

  def forward(x: torch.Tensor) -> torch.Tensor:
    if layer == 'last':
      tokens = model(pixel_values=x).last_hidden_state
    else:
      tokens = model(pixel_values=x, output_hidden_states=True).hidden_states[layer]
    grid = x.shape[-1] // patch
    if tokens.shape[1] != num_prefix + grid * grid:
      raise BackboneError(f'Token count {tokens.shape[1]} != {num_prefix} prefix + {grid}x{grid} '
                          'patches; the model config does not describe this checkpoint.')
    return tokens[:, num_prefix:, :].reshape(x.shape[0], grid, grid, tokens.shape[-1])

  return forward


def _truncate_blocks(model: Any, layer: int | str) -> None:
  """Keeps only the blocks needed for hidden_states[layer] (later ones do not affect it)."""
  if layer == 'last':
    return
  encoder = model.encoder if hasattr(model, 'encoder') else model.model
  encoder.layer = encoder.layer[:max(layer, 1)]  # hidden_states needs >= 1 block to be recorded


def _load_vit(name: str, weights: str, layer: int | str | None) -> dict[str, Any]:
  import transformers  # pylint: disable=g-import-not-at-top
  cls = transformers.DINOv3ViTModel if name == 'dinov3' else transformers.AutoModel
  model, model_dir = _load_pretrained(cls, name, weights)
  cfg = model.config
  if cfg.model_type not in _MODEL_TYPES[name]:
    raise BackboneError(f'--weights {weights}: model_type {cfg.model_type!r} is not a {name} '
                        f'checkpoint (expected {_MODEL_TYPES[name]}).')
  patch = cfg.patch_size if isinstance(cfg.patch_size, int) else cfg.patch_size[0]
  num_prefix = 1 + int(getattr(cfg, 'num_register_tokens', 0) or 0)
  layer = parse_layer('last' if layer is None else layer, cfg.num_hidden_layers, name)
  _truncate_blocks(model, layer)
  mean, std, source = _normalisation(name, model_dir)
  return dict(model=model, model_dir=model_dir, model_type=cfg.model_type, layer=layer,
              patch_size=patch, channels=cfg.hidden_size, num_prefix_tokens=num_prefix,
              mean=mean, std=std, norm_source=source, required_input_size=None,
              forward=_vit_forward(model, layer, num_prefix, patch),
              extra={'num_hidden_layers': cfg.num_hidden_layers})


def _load_sam(weights: str, layer: int | str | None) -> dict[str, Any]:
  import transformers  # pylint: disable=g-import-not-at-top
  if layer not in (None, 'last'):
    raise BackboneError(f'sam: --layer {layer!r} is not supported; SAM features are the neck '
                        'output (256 channels): use --layer last.')
  model, model_dir = _load_pretrained(transformers.SamVisionModel, 'sam', weights)
  cfg = model.config
  mean, std, source = _normalisation('sam', model_dir)

  def forward(x: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=x).last_hidden_state.permute(0, 2, 3, 1)   # (B, h, w, 256)

  return dict(model=model, model_dir=model_dir, model_type=cfg.model_type, layer='last',
              patch_size=cfg.patch_size, channels=cfg.output_channels, num_prefix_tokens=0,
              mean=mean, std=std, norm_source=source, required_input_size=cfg.image_size,
              forward=forward, extra={'output': 'neck'})


# --------------------------------------------------------------------------- MIND


def _ring_pairs(d: int) -> list[tuple[tuple[int, int], tuple[int, int]]]:
  """12 offset pairs at dilation d: 8 adjacent pairs of the 8-ring + 4 pairs of the 4-ring."""
  ring = [(-d, -d), (-d, 0), (-d, d), (0, d), (d, d), (d, 0), (d, -d), (0, -d)]
  adjacent = [(ring[i], ring[(i + 1) % 8]) for i in range(8)]
  cross = [(ring[i], ring[(i + 2) % 8]) for i in (1, 3, 5, 7)]
  return adjacent + cross


def mind_ssc_2d(image: torch.Tensor, dilations: Sequence[int] = (1, 2, 4),
                radius: int = 1) -> torch.Tensor:
  """2D MIND-SSC-style descriptor.

  Args:
    image: (B, 1, H, W) intensities.
    dilations: neighbourhood distances in pixels; 12 channels per dilation.
    radius: half-width of the box over which patch SSDs are averaged.

  Returns:
    (B, 12 * len(dilations), H, W) in [0, 1]: exp(-(SSD - min SSD) / var), var = mean SSD
    clamped to [1e-3, 1e3] x its image mean, normalised by the per-pixel max (per dilation).
    Invariant to intensity changes a*x + b (a != 0) up to floating-point error.

  The SSD of a pair of offsets (a, b) at p is box((x(q + a) - x(q + b))^2)(p), which is the
  box-filtered squared difference at offset o = a - b read at p + b (at p + a for -o): the
  12 pairs of a dilation need 4 box filters, (0, d), (d, 0), (d, d) and (d, -d), not 12
  (same numbers, bit for bit; half the time).
  """
  big = max(dilations)
  lo = big + radius                    # squared differences on positions [-lo, H + lo)
  pad = big + lo                       # replicate padding that every offset view needs
  padded = F.pad(image, (pad,) * 4, mode='replicate')
  h, w = image.shape[-2:]

  def view(off):                       # x(q + off) for q in [-lo, H + lo) x [-lo, W + lo)
    return padded[..., big + off[0]:big + off[0] + h + 2 * lo,
                  big + off[1]:big + off[1] + w + 2 * lo]

  offsets = [o for d in dilations for o in ((0, d), (d, 0), (d, d), (d, -d))]
  which = {o: i for i, o in enumerate(offsets)}
  # Box filter over the valid window: positions [-big, H + big).
  boxed = F.avg_pool2d(torch.cat([(view(o) - view((0, 0))) ** 2 for o in offsets], dim=1),
                       2 * radius + 1, stride=1)
  out = []
  for d in dilations:
    ssd = []
    for a, b in _ring_pairs(d):
      o = (a[0] - b[0], a[1] - b[1])
      k, at = (which[o], b) if o in which else (which[(-o[0], -o[1])], a)
      ssd.append(boxed[:, k:k + 1, big + at[0]:big + at[0] + h, big + at[1]:big + at[1] + w])
    ssd = torch.cat(ssd, dim=1)                                               # (B, 12, H, W)
    ssd = ssd - ssd.amin(dim=1, keepdim=True)
    var = ssd.mean(dim=1, keepdim=True)
    ref = var.mean(dim=(2, 3), keepdim=True)
    var = torch.maximum(torch.minimum(var, ref * 1000.0), ref * 0.001)
    var = torch.clamp(var, min=torch.finfo(var.dtype).tiny)
    desc = torch.exp(-ssd / var)
    out.append(desc / desc.amax(dim=1, keepdim=True))
  return torch.cat(out, dim=1)


def _load_mind(layer: int | str | None, patch_size: int, dilations: Sequence[int],
               radius: int) -> dict[str, Any]:
  if layer not in (None, 'last'):
    raise BackboneError(f'{MIND_LABEL}: has no layers; drop --layer (got {layer!r}).')
  params = {'dilations': [int(d) for d in dilations], 'radius': int(radius),
            'pooling': f'mean over {patch_size}x{patch_size} patches'}

  def forward(x: torch.Tensor) -> torch.Tensor:
    desc = mind_ssc_2d(x[:, :1].float(), dilations, radius)
    return F.avg_pool2d(desc, patch_size).permute(0, 2, 3, 1)

  digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()
  return dict(model=None, model_dir=None, model_type='mind_ssc_2d', layer='last',
              patch_size=patch_size, channels=12 * len(dilations), num_prefix_tokens=0,
              mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
              norm_source='none (MIND is invariant to affine intensity changes)',
              required_input_size=None, forward=forward, extra=params, weights_sha256=digest)


# --------------------------------------------------------------------------- entry point


def load(name: str, weights: str | None = None, layer: int | str | None = None, *,
         device: str = 'auto', dtype: str = 'float32', mind_patch_size: int = 4,
         mind_dilations: Sequence[int] = (1, 2, 4), mind_radius: int = 1) -> Backbone:
  """Loads a frozen backbone.

  Args:
    name: one of BACKBONES or ALIASES.
    weights: Hub id or local directory (default DEFAULT_WEIGHTS[name]); unused for mind.
    layer: int index into hidden_states or "last" (default "last").
    device: "auto" | "cpu" | "cuda[:N]".
    dtype: "float32" | "bfloat16" | "float16" (autocast; float16 only on CUDA).
    mind_*: MIND descriptor parameters (patch pooling size, dilations, box radius).

  Raises:
    BackboneError: unknown name, missing weights (with download instructions), bad layer,
      device or dtype.
  """
  name = canonical_name(name)
  dev, _ = resolve_device(device)
  check_dtype(dtype, dev)
  if name == 'mind':
    if weights is not None:
      raise BackboneError(f'{MIND_LABEL}: has no weights; drop --weights.')
    spec = _load_mind(layer, mind_patch_size, mind_dilations, mind_radius)
    label = MIND_LABEL
  else:
    weights = weights or DEFAULT_WEIGHTS[name]
    spec = (_load_sam(weights, layer) if name == 'sam' else _load_vit(name, weights, layer))
    label = name
  model = spec.pop('model')
  model_dir = spec.pop('model_dir')
  if model is not None:
    model.eval().requires_grad_(False).to(dev)
    spec['weights_sha256'] = hash_weights(model_dir)
  return Backbone(name=name, label=label, weights=weights,
                  revision=_revision(model_dir) if model_dir else None, device=dev,
                  dtype=dtype, module=model, **spec)
