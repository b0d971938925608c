"""Tests for feature_extract.backbones with tiny random models (no downloads)."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from scipy import ndimage

from feature_extract import backbones

K = 32


@pytest.fixture(scope='module')
def tiny_dinov3(tmp_path_factory):
  torch.manual_seed(0)
  cfg = transformers.DINOv3ViTConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
      patch_size=8, image_size=32, num_register_tokens=3)
  model = transformers.DINOv3ViTModel(cfg).eval()
  path = tmp_path_factory.mktemp('dinov3')
  model.save_pretrained(path)
  (path / 'preprocessor_config.json').write_text(json.dumps(
      {'image_mean': [0.1, 0.2, 0.3], 'image_std': [0.5, 0.6, 0.7]}))
  return model, str(path)


def _slices(n=2, seed=0):
  return torch.randn(n, 3, K, K, generator=torch.Generator().manual_seed(seed))


def _patch_tokens(hidden, n_prefix, grid):
  """Oracle: token n_prefix + gy * grid + gx is patch (gy, gx)."""
  out = np.zeros((hidden.shape[0], grid, grid, hidden.shape[-1]), np.float32)
  for gy in range(grid):
    for gx in range(grid):
      out[:, gy, gx] = hidden[:, n_prefix + gy * grid + gx].numpy()
  return out


@pytest.mark.parametrize('layer', [0, 2, 'last'])
def test_dinov3_features_equal_model_hidden_states(tiny_dinov3, layer):
  model, path = tiny_dinov3
  bb = backbones.load('dinov3', path, layer, device='cpu')
  assert (bb.patch_size, bb.channels, bb.num_prefix_tokens) == (8, 32, 1 + 3)
  assert bb.mean == (0.1, 0.2, 0.3) and bb.std == (0.5, 0.6, 0.7)
  assert bb.norm_source == 'preprocessor_config.json'
  x = _slices()
  feats = bb(x)
  assert feats.shape == (2, 4, 4, 32) and feats.dtype == np.float32
  with torch.no_grad():
    out = model(pixel_values=x, output_hidden_states=True)
  hidden = out.last_hidden_state if layer == 'last' else out.hidden_states[layer]
  np.testing.assert_allclose(feats, _patch_tokens(hidden, 4, 4), atol=1e-5)
  np.testing.assert_array_equal(bb(x), feats)                       # deterministic
  rec = bb.describe()
  assert rec['weights'] == path and len(rec['weights_sha256']) == 64
  assert rec['num_prefix_tokens'] == 4 and bb.layer == layer


def test_dinov3_layer_truncation_keeps_only_needed_blocks(tiny_dinov3):
  _, path = tiny_dinov3
  bb = backbones.load('dinov3', path, 1, device='cpu')
  # The truncated encoder runs 1 block; later blocks cannot change hidden_states[1].
  assert len(bb.module.model.layer) == 1
  with pytest.raises(backbones.BackboneError, match=r'--layer 4 out of range.*0\.\.3'):
    backbones.load('dinov3', path, 4, device='cpu')


def test_dinov2_and_registers_variant(tmp_path):
  torch.manual_seed(1)
  x = _slices(1, seed=1)
  for cls, cfg_cls, n_reg in [(transformers.Dinov2Model, transformers.Dinov2Config, 0),
                              (transformers.Dinov2WithRegistersModel,
                               transformers.Dinov2WithRegistersConfig, 2)]:
    kw = {'num_register_tokens': n_reg} if n_reg else {}
    cfg = cfg_cls(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, patch_size=8, image_size=32, **kw)
    model = cls(cfg).eval()
    path = tmp_path / cfg.model_type
    model.save_pretrained(path)
    bb = backbones.load('dinov2', str(path), 2, device='cpu')
    assert bb.num_prefix_tokens == 1 + n_reg
    assert bb.norm_source.startswith('published default') and bb.mean == backbones.IMAGENET_MEAN
    with torch.no_grad():
      hidden = model(pixel_values=x, output_hidden_states=True).hidden_states[2]
    np.testing.assert_allclose(bb(x), _patch_tokens(hidden, 1 + n_reg, 4), atol=1e-5)


def test_sam_neck_features(tmp_path):
  torch.manual_seed(2)
  vision = transformers.SamVisionConfig(
      hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2,
      image_size=64, patch_size=8, window_size=4, global_attn_indexes=[1], mlp_dim=64)
  full = transformers.SamModel(transformers.SamConfig(vision_config=vision.to_dict())).eval()
  full.save_pretrained(tmp_path)
  bb = backbones.load('sam', str(tmp_path), device='cpu')
  assert (bb.patch_size, bb.channels, bb.num_prefix_tokens) == (8, 16, 0)
  assert bb.mean == (0.5, 0.5, 0.5)                                 # SPEC fallback for sam
  x = torch.randn(1, 3, 64, 64)
  with torch.no_grad():
    ref = full.get_image_embeddings(x)                               # (1, 16, 8, 8)
  np.testing.assert_allclose(bb(x), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)
  with pytest.raises(backbones.BackboneError, match='K must be 64'):
    bb(_slices(1))
  with pytest.raises(backbones.BackboneError, match='neck output'):
    backbones.load('sam', str(tmp_path), 3, device='cpu')


def test_missing_weights_give_clear_errors(tmp_path, monkeypatch):
  with pytest.raises(backbones.BackboneError, match='local weights directory does not exist'):
    backbones.load('dinov2', str(tmp_path / 'no' / 'such'), device='cpu')
  with pytest.raises(backbones.BackboneError, match='has no config.json'):
    backbones.load('dinov2', str(tmp_path), device='cpu')
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'cache'))
  with pytest.raises(backbones.BackboneError,
                     match=r'(?s)HF_HUB_OFFLINE is set.*gated.*`hf auth login`.*'
                     r'`hf download facebook/dinov3-vitb16-pretrain-lvd1689m --local-dir DIR`'):
    backbones.load('dinov3', device='cpu')


def test_weight_errors_print_hf_commands_that_exist(tmp_path, monkeypatch):
  """The commands in the advice parse with the `hf` CLI that huggingface_hub installs."""
  monkeypatch.setenv('HF_HUB_OFFLINE', '1')
  monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'cache'))
  messages = []
  for name, weights in [('dinov3', None), ('sam', str(tmp_path / 'no' / 'such')),
                        ('dinov2', str(tmp_path))]:
    with pytest.raises(backbones.BackboneError) as err:
      backbones.load(name, weights, device='cpu')
    messages.append(str(err.value))
  text = ' '.join(messages)
  assert 'huggingface-cli' not in text
  commands = set(re.findall(r'`(hf [^`]+)`', text))
  assert commands == {'hf auth login',
                      'hf download facebook/dinov3-vitb16-pretrain-lvd1689m --local-dir DIR',
                      'hf download facebook/sam-vit-base --local-dir DIR',
                      'hf download REPO_ID --local-dir DIR'}, commands
  hf = os.path.join(os.path.dirname(sys.executable), 'hf')
  if not os.path.exists(hf):
    pytest.skip('the hf CLI is not installed next to this python')
  for command in commands:  # --help is eager: exit 0 iff the subcommand and options exist
    done = subprocess.run([hf, *command.split()[1:], '--help'], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, (command, done.stderr)


def test_backbone_aliases_and_suggestions(tiny_dinov3):
  _, path = tiny_dinov3
  assert backbones.load('dino', path, device='cpu').name == 'dinov3'
  assert [backbones.canonical_name(n) for n in ('dino', 'sam-b', 'DINOv2', 'mind')] == [
      'dinov3', 'sam', 'dinov2', 'mind']
  assert set(backbones.ALIASES.values()) <= set(backbones.BACKBONES)
  for name, hint in [('dinov4', "Did you mean 'dinov3'? "), ('sam-l', "Did you mean 'sam'? "),
                     ('resnet', '')]:
    with pytest.raises(backbones.BackboneError) as err:
      backbones.canonical_name(name)
    assert str(err.value) == (f"--backbone: unknown backbone '{name}'. {hint}Choose one of "
                              'dinov3, dinov2, sam, mind (aliases: dino = dinov3, sam-b = sam).')


def test_device_and_dtype_checks(tiny_dinov3):
  _, path = tiny_dinov3
  if not torch.cuda.is_available():
    with pytest.raises(backbones.BackboneError, match='no CUDA GPU'):
      backbones.load('mind', device='cuda')
  with pytest.raises(backbones.BackboneError, match='float16 is not supported on CPU'):
    backbones.load('mind', device='cpu', dtype='float16')
  with pytest.raises(backbones.BackboneError, match="unknown backbone 'resnet'"):
    backbones.load('resnet', device='cpu')
  x = _slices()
  ref = backbones.load('dinov3', path, 'last', device='cpu')(x)
  bf16 = backbones.load('dinov3', path, 'last', device='cpu', dtype='bfloat16')(x)
  assert not np.array_equal(ref, bf16)                               # autocast is active
  np.testing.assert_allclose(bf16, ref, atol=0.15)


def _smooth_image(seed, size=K):
  rng = np.random.default_rng(seed)
  img = ndimage.gaussian_filter(rng.random((size, size)), 2.0)
  img = (img - img.min()) / (img.max() - img.min())
  return torch.from_numpy(img.astype(np.float32))[None, None].expand(1, 3, size, size)


def test_mind_shapes_label_and_intensity_invariance():
  bb = backbones.load('mind', device='cpu')
  assert bb.label == 'mind (offline, not a foundation model)'
  assert bb.describe()['label'] == bb.label and bb.channels == 36 and bb.patch_size == 4
  x = _smooth_image(0)
  f = bb(x)
  assert f.shape == (1, K // 4, K // 4, 36)
  assert f.min() >= 0 and f.max() <= 1
  np.testing.assert_allclose(bb(2.5 * x - 0.7), f, atol=1e-4)       # affine: exact
  gamma = np.abs(bb(x ** 1.3) - f).mean()
  other = np.abs(bb(_smooth_image(1)) - f).mean()
  assert gamma < 0.15 * other, (gamma, other)                       # monotonic: close
  assert backbones.mind_ssc_2d(x[:, :1], (1, 2)).shape == (1, 24, K, K)


def _mind_reference(img, dilations, radius):
  """MIND-SSC written out with numpy/scipy: one box filter per offset pair (the definition)."""
  h, w = img.shape
  pad = max(dilations) + radius
  p = np.pad(img.astype(np.float64), pad, mode='edge')
  out = []
  for d in dilations:
    ssd = []
    for a, b in backbones.mind._ring_pairs(d):
      diff2 = (np.roll(p, (-a[0], -a[1]), (0, 1)) - np.roll(p, (-b[0], -b[1]), (0, 1))) ** 2
      ssd.append(ndimage.uniform_filter(diff2, 2 * radius + 1, mode='constant')[
          pad:pad + h, pad:pad + w])
    ssd = np.stack(ssd)
    ssd = ssd - ssd.min(0)
    var = ssd.mean(0)
    var = np.clip(var, 1e-3 * var.mean(), 1e3 * var.mean())
    desc = np.exp(-ssd / var)
    out.append(desc / desc.max(0))
  return np.concatenate(out)


@pytest.mark.parametrize('shape,dilations,radius', [((37, 29), (1, 2, 4), 1),
                                                    ((16, 20), (1, 3), 2), ((9, 9), (1, 2, 4), 1)])
def test_mind_matches_per_pair_reference(shape, dilations, radius):
  img = np.random.default_rng(3).random(shape) * 7 - 2
  got = backbones.mind_ssc_2d(torch.from_numpy(img.astype(np.float32))[None, None],
                              dilations, radius)[0].numpy()
  np.testing.assert_allclose(got, _mind_reference(img.astype(np.float32), dilations, radius),
                             atol=2e-5)


def test_names_help_and_mind_do_not_import_transformers():
  """transformers (and huggingface_hub) load only with a Hub checkpoint: the CLI's --help,
  backbone names and the offline MIND backbone need torch alone."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = '\n'.join([
      'import sys, torch',
      'from feature_extract import backbones, run',
      'run.build_parser().format_help()',
      "backbones.canonical_name('dino')",
      "backbones.load('mind', device='cpu')(torch.zeros(1, 3, 8, 8))",
      "print(sorted({m.split('.')[0] for m in sys.modules} & {'transformers', 'huggingface_hub'}))",
  ])
  done = subprocess.run([sys.executable, '-c', code], cwd=root, capture_output=True, text=True,
                        timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.strip() == '[]', done.stdout


def test_checkpoint_missing_parameters_is_refused(tmp_path):
  cfg = transformers.Dinov2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, patch_size=8, image_size=32)
  transformers.Dinov2Model(cfg).save_pretrained(tmp_path / 'ok')
  bigger = transformers.Dinov2Config(**{**cfg.to_dict(), 'num_hidden_layers': 3})
  bigger.save_pretrained(tmp_path / 'ok')           # config now claims a 3rd, absent block
  with pytest.raises(backbones.BackboneError, match='refusing to run with random weights'):
    backbones.load('dinov2', str(tmp_path / 'ok'), device='cpu')
  (tmp_path / 'noweights').mkdir()
  cfg.save_pretrained(tmp_path / 'noweights')
  with pytest.raises(backbones.BackboneError, match='cannot load dinov2 from this directory'):
    backbones.load('dinov2', str(tmp_path / 'noweights'), device='cpu')
