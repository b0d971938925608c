"""End-to-end tests of feature_extract/run.py on tiny in-test datasets (no downloads)."""
import functools
import os
import re
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
import transformers

from feature_extract import backbones
from feature_extract import datasets
from feature_extract import pipeline
from feature_extract import run
from feature_extract import slicing
from feature_extract.datasets.base import DatasetError, Pair, Volume, VolumeSource
from fmir_jax.core import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (12, 10, 3)


def _load(key, subject, frame, split, fail=None):
  if fail is not None and key in fail:
    raise KeyboardInterrupt(f'simulated kill while loading {key}')
  seed = int(subject[1:]) * 2 + (frame == 'es')
  rng = np.random.default_rng(seed)
  z = np.linspace(0, 1, SHAPE[0])[:, None, None]
  image = np.clip(z + 0.3 * rng.random(SHAPE), 0, 1).astype(np.float32)
  return Volume(key=key, dataset='toy', subject=subject, frame=frame, split=split, image=image,
                labels=(image > 0.6).astype(np.uint8), spacing_mm=(1.8, 1.8, 10.0),
                affine=np.diag([1.8, 1.8, 10.0, 1.0]), meta={'seed': seed})


def _toy_module(fail=None):
  """A dataset reader with the feature_extract.datasets contract (3 subjects x ed/es)."""

  def scan(root, *, n=3):
    if root == 'missing':
      raise DatasetError(f'{root}: toy root folder does not exist.')
    out = []
    for i in range(n):
      split = ('train', 'val', 'test')[i % 3]
      for frame in ('ed', 'es'):
        key = f's{i}_{frame}'
        out.append(VolumeSource(key, 'toy', f's{i}', frame, split, (f'{root}/{key}',),
                                functools.partial(_load, key, f's{i}', frame, split, fail)))
    return out

  def pairs(sources):
    subjects = sorted({s.subject for s in sources})
    split = {s.subject: s.split for s in sources}
    return [p for s in subjects for p in (Pair(f'{s}_ed', f'{s}_es', split[s]),
                                          Pair(f'{s}_es', f'{s}_ed', split[s]))]

  return types.SimpleNamespace(scan=scan, pairs=pairs)


@pytest.fixture
def toy(monkeypatch):
  monkeypatch.setattr(datasets, 'get', lambda name: _toy_module(), raising=False)


def _argv(out, *extra):
  return ['--backbone', 'mind', '--dataset', 'toy', '--data-root', 'toyroot', '--out', str(out),
          '--input-size', '24', '--resize', 'upsample', '--batch-size', '2', '--device', 'cpu',
          '--volumes-per-shard', '2', '--no-progress', *extra]


def test_mind_end_to_end_and_features_match_direct_computation(toy, tmp_path, capsys):
  assert run.main(_argv(tmp_path)) == 0
  err = capsys.readouterr().err
  assert 'mind (offline, not a foundation model)' in err and 'done: 6 volumes' in err
  fs = store.FeatureStore(str(tmp_path))
  fs.validate()
  assert fs.keys() == ['s0_ed', 's0_es', 's1_ed', 's1_es', 's2_ed', 's2_es']
  assert fs.pairs('val') == [('s1_ed', 's1_es'), ('s1_es', 's1_ed')]
  h = fs.header
  assert h['backbone']['label'] == 'mind (offline, not a foundation model)'
  assert (h['channels'], h['patch_size'], h['input_size'], h['layer']) == (36, 4, 24, 'last')
  bb = backbones.load('mind', device='cpu')
  vol = _load('s2_es', 's2', 'es', 'test')
  slices, layout = slicing.volume_to_slices(vol.image, 24, 'upsample', bb.mean, bb.std)
  direct = bb(slices)                                                     # all 3 slices at once
  np.testing.assert_array_equal(fs.features('s2_es'), direct.astype(np.float16))
  assert fs.info('s2_es').geometry == layout.geometry(4)
  assert fs.info('s2_es').grid == (3, 6, 6)
  np.testing.assert_array_equal(fs.labels('s2_es'), vol.labels)
  assert fs.timing('s2_es')['seconds'] > 0
  # Re-running is a no-op that leaves a byte-identical manifest.
  before = (tmp_path / 'index.json').read_bytes()
  assert run.main(_argv(tmp_path)) == 0
  assert 'done: 0 volumes (6 already done)' in capsys.readouterr().err
  assert (tmp_path / 'index.json').read_bytes() == before


def test_kill_and_rerun_completes_with_identical_manifest(monkeypatch, tmp_path):
  monkeypatch.setattr(datasets, 'get', lambda name: _toy_module(), raising=False)
  assert run.main(_argv(tmp_path / 'ref')) == 0
  monkeypatch.setattr(datasets, 'get', lambda name: _toy_module(fail={'s1_es'}), raising=False)
  with pytest.raises(KeyboardInterrupt):
    run.main(_argv(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'index.json').exists()
  part = json.loads((tmp_path / 'run' / store.partial_name(0, 1)).read_text())
  assert [v['key'] for v in part['volumes']] == ['s0_ed', 's0_es']       # s1_ed lost with kill
  monkeypatch.setattr(datasets, 'get', lambda name: _toy_module(), raising=False)
  assert run.main(_argv(tmp_path / 'run')) == 0
  assert ((tmp_path / 'run' / 'index.json').read_bytes()
          == (tmp_path / 'ref' / 'index.json').read_bytes())


def test_workers_merge_themselves(toy, tmp_path):
  assert run.main(_argv(tmp_path / 'w', '--num-shards', '2', '--shard-index', '0')) == 0
  assert not (tmp_path / 'w' / 'index.json').exists()          # worker 1 has not run yet
  assert run.main(_argv(tmp_path / 'w', '--num-shards', '2', '--shard-index', '1')) == 0
  assert (tmp_path / 'w' / 'index.json').exists()              # the last one merged
  assert run.main(['--out', str(tmp_path / 'w'), '--merge']) == 0   # by hand: still fine
  assert run.main(_argv(tmp_path / 'one')) == 0
  a, b = store.FeatureStore(str(tmp_path / 'w')), store.FeatureStore(str(tmp_path / 'one'))
  assert a.keys() == b.keys() and a.header == b.header
  for k in a.keys():
    np.testing.assert_array_equal(a.features(k), b.features(k))


@pytest.mark.parametrize('extra,message', [
    (['--layer', '2'], 'has no layers'),
    (['--layer', 'x'], '--layer must be an int or "last", got \'x\'\\.$'),
    (['--device', 'cuda'] if not torch.cuda.is_available() else ['--dtype', 'float16',
                                                                  '--device', 'cpu'],
     'CUDA|float16'),
    (['--input-size', '30'], 'not a multiple of the patch size 4; use 28 or 32'),
    (['--splits', 'train,dev'], "unknown splits \\['dev'\\]"),
    (['--dataset-option', 'n'], 'expected key=value'),
    (['--dataset-option', 'm=3'], "unexpected keyword argument 'm'"),
    (['--resize', 'pad', '--pad-to', '8'], '--pad-to 8 is smaller'),
    (['--backbone', 'dinv3'], "unknown backbone 'dinv3'. Did you mean 'dinov3'\\? Choose one of "
     'dinov3, dinov2, sam, mind \\(aliases: dino = dinov3, sam-b = sam\\)'),
])
def test_bad_input_exits_2_with_one_message(toy, tmp_path, capsys, extra, message):
  assert run.main(_argv(tmp_path / 'out', *extra)) == 2
  err = capsys.readouterr().err
  lines = err.strip().splitlines()
  assert lines[-1].startswith('error: ') and 'Traceback' not in err, err
  assert sum(line.startswith('error') for line in lines) == 1
  assert re.search(message, lines[-1]), err


def test_extract_dataset_is_the_cli_as_a_function(toy, tmp_path, capsys):
  lines = []
  summary = pipeline.extract_dataset(
      backbone='mind', dataset='toy', data_root='toyroot', out=str(tmp_path / 'lib'),
      input_size=24, resize='upsample', batch_size=2, device='cpu', volumes_per_shard=2,
      progress=False, log=lines.append)
  assert (summary.volumes, summary.skipped, summary.slices) == (6, 0, 18)
  assert os.path.samefile(summary.index_path, tmp_path / 'lib' / 'index.json')
  assert [line.split(':')[0] for line in lines] == ['backbone', 'device', 'dataset'], lines
  assert capsys.readouterr().err == ''
  assert run.main(_argv(tmp_path / 'cli')) == 0
  a, b = store.FeatureStore(str(tmp_path / 'lib')), store.FeatureStore(str(tmp_path / 'cli'))
  assert a.keys() == b.keys() and a.header == b.header
  for k in a.keys():
    np.testing.assert_array_equal(a.features(k), b.features(k))
  with pytest.raises(DatasetError, match="--dataset-option: .*unexpected keyword argument 'm'"):
    pipeline.extract_dataset(backbone='mind', dataset='toy', data_root='toyroot',
                             out=str(tmp_path / 'bad'), device='cpu', dataset_options={'m': 3})


@pytest.mark.slow
def test_runs_as_a_script_from_the_repository_root(tmp_path):
  r = subprocess.run([sys.executable, 'feature_extract/run.py', '--backbone', 'dinv3',
                      '--out', str(tmp_path / 'out')], cwd=ROOT, capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  assert r.stderr.strip().splitlines()[-1].startswith("error: --backbone: unknown backbone 'dinv3'")
  assert not (tmp_path / 'out').exists()


def test_bad_root_and_resume_mismatch_exit_2(toy, tmp_path, capsys):
  argv = _argv(tmp_path)
  argv[argv.index('toyroot')] = 'missing'
  assert run.main(argv) == 2
  assert 'toy root folder does not exist' in capsys.readouterr().err
  assert run.main(_argv(tmp_path, '--splits', 'train')) == 0
  assert run.main(_argv(tmp_path, '--splits', 'train', '--feature-dtype', 'float32')) == 2
  err = capsys.readouterr().err
  assert "refusing to resume" in err and "feature_dtype: 'float16' != 'float32'" in err
  assert store.FeatureStore(str(tmp_path)).keys() == ['s0_ed', 's0_es']  # nothing lost


@pytest.mark.slow
@pytest.mark.parametrize('name', ['dinov3', 'dino'])
def test_tiny_dinov3_saved_locally_end_to_end(toy, tmp_path, name):
  torch.manual_seed(0)
  cfg = transformers.DINOv3ViTConfig(
      hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
      patch_size=8, image_size=32, num_register_tokens=4)
  model = transformers.DINOv3ViTModel(cfg).eval()
  model.save_pretrained(tmp_path / 'w')
  argv = _argv(tmp_path / 'feat', '--splits', 'val')
  argv[argv.index('mind')] = name
  argv += ['--weights', str(tmp_path / 'w'), '--layer', '1', '--input-size', '32']
  assert run.main(argv) == 0
  fs = store.FeatureStore(str(tmp_path / 'feat'))
  assert fs.keys() == ['s1_ed', 's1_es'] and fs.header['layer'] == 1
  assert fs.header['backbone']['name'] == 'dinov3'
  assert fs.header['backbone']['num_prefix_tokens'] == 5
  assert fs.header['normalisation']['source'].startswith('published default')
  vol = _load('s1_ed', 's1', 'ed', 'val')
  slices, _ = slicing.volume_to_slices(vol.image, 32, 'upsample', backbones.IMAGENET_MEAN,
                                       backbones.IMAGENET_STD)
  with torch.no_grad():
    hidden = model(pixel_values=slices, output_hidden_states=True).hidden_states[1]
  expect = hidden[:, 5:].reshape(3, 4, 4, 16).numpy()
  np.testing.assert_allclose(fs.features('s1_ed').astype(np.float32), expect, atol=2e-2,
                             rtol=1e-2)
  assert fs.info('s1_ed').grid == (3, 4, 4)


def test_real_acdc_reader_on_phantoms(tmp_path, capsys):
  from feature_extract.datasets import acdc  # pylint: disable=g-import-not-at-top
  from feature_extract.synthetic import phantoms
  phantoms.write_acdc_phantoms(str(tmp_path / 'acdc'), 1, seed=0, first_id=19,
                               inplane_size=(40, 60))
  argv = ['--backbone', 'mind', '--dataset', 'acdc', '--data-root', str(tmp_path / 'acdc'),
          '--out', str(tmp_path / 'feat'), '--input-size', '32', '--device', 'cpu',
          '--no-progress']
  assert run.main(argv) == 0
  err = capsys.readouterr().err
  assert "K=32, resize=upsample; note: authors' release: K=256 for training" in err
  fs = store.FeatureStore(str(tmp_path / 'feat'))
  keys = ['patient019_ed', 'patient019_es']
  assert fs.keys() == keys and fs.keys('val') == keys
  assert fs.pairs('val') == [('patient019_ed', 'patient019_es'), ('patient019_es', 'patient019_ed')]
  assert fs.pairs('train') == []
  src = {s.key: s for s in acdc.scan(str(tmp_path / 'acdc'))}
  vol = src['patient019_es'].load()
  np.testing.assert_array_equal(fs.image('patient019_es'), vol.image)
  np.testing.assert_array_equal(fs.labels('patient019_es'), vol.labels)
  info = fs.info('patient019_es')
  h, w, d = vol.image.shape
  assert info.shape == (h, w, d) and info.grid == (d, 8, 8)
  # 128 voxels -> 32 pixels: r = 1/4, so scale = r/p = 1/16, offset = (0 + r/2)/p - 1/2.
  assert info.geometry == {'offset': [0.125 / 4 - 0.5] * 2, 'scale': [1 / 16] * 2}
  assert info.spacing_mm == pytest.approx(vol.spacing_mm)
  assert fs.header['layer'] == 'last' and fs.header['dataset']['name'] == 'acdc'


def test_help_lists_backbone_aliases(capsys):
  with pytest.raises(SystemExit) as exit_info:
    run.main(['--help'])
  assert exit_info.value.code == 0
  out = ' '.join(capsys.readouterr().out.split())
  assert 'dinov3 | dinov2 | sam | mind (aliases: dino = dinov3, sam-b = sam)' in out


@pytest.mark.slow
def test_python_m_feature_extract_is_run_py():
  """``python -m feature_extract`` prints run.py's --help (same flags) and exit codes."""
  def cli(*argv):
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)

  module, script = cli('-m', 'feature_extract', '--help'), cli('feature_extract/run.py', '--help')
  assert module.returncode == script.returncode == 0, module.stderr[-3000:]
  flags = set(re.findall(r'(?<![\w-])--[a-z][a-z-]*', script.stdout))
  assert {'--backbone', '--out', '--dataset-option', '--merge'} <= flags
  assert set(re.findall(r'(?<![\w-])--[a-z][a-z-]*', module.stdout)) == flags
  assert module.stdout == script.stdout
  bad = cli('-m', 'feature_extract', '--out', 'unused', '--no-such-flag')
  assert bad.returncode == 2 and 'unrecognized arguments: --no-such-flag' in bad.stderr


def _shard_files(out):
  return {f: (out / f).read_bytes() for f in sorted(os.listdir(out)) if f.endswith('.safetensors')}


def test_rerun_repairs_truncated_and_corrupt_shards_in_place(toy, tmp_path, capsys):
  assert run.main(_argv(tmp_path)) == 0                             # 3 shards of 2 volumes
  original, index = _shard_files(tmp_path), (tmp_path / 'index.json').read_bytes()
  s0, s1, s2 = (tmp_path / store.shard_name(0, 1, s) for s in range(3))
  s0.write_bytes(original[s0.name][:-64])                           # truncated
  flipped = bytearray(original[s1.name])
  flipped[-5] ^= 0x01                                               # one bit, same size
  s1.write_bytes(bytes(flipped))
  (tmp_path / 'notes.txt').write_text('mine')
  s2_stat = s2.stat()
  capsys.readouterr()
  assert run.main(_argv(tmp_path)) == 0                             # the same command
  err = capsys.readouterr().err
  repairs = [line for line in err.splitlines() if line.startswith('repair: ')]
  assert [line.split()[2] for line in repairs] == ['s0_ed:', 's0_es:', 's1_ed:', 's1_es:'], err
  assert all(s0.name in line and 'truncated' in line for line in repairs[:2]), err
  assert all(s1.name in line and 'sha256 mismatch' in line for line in repairs[2:]), err
  assert 'done: 4 volumes (2 already done; 4 to repair bad shards)' in err
  assert _shard_files(tmp_path) == original                         # byte for byte
  assert (tmp_path / 'index.json').read_bytes() == index
  assert s2.stat().st_mtime_ns == s2_stat.st_mtime_ns and s2.stat().st_ino == s2_stat.st_ino
  assert (tmp_path / 'notes.txt').read_text() == 'mine'
  store.FeatureStore(str(tmp_path)).validate()


def _one_error_line(err):
  lines = err.strip().splitlines()
  assert 'Traceback' not in err and len(lines) >= 1 and lines[-1].startswith('error: '), err
  assert sum(line.startswith('error') for line in lines) == 1, err
  return lines[-1]


def test_corrupt_nifti_exits_2_and_keeps_finished_volumes(tmp_path, capsys):
  from feature_extract.synthetic import phantoms  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'acdc'
  phantoms.write_acdc_phantoms(str(root), 2, seed=0, first_id=19, inplane_size=(40, 60))
  bad = root / 'training' / 'patient020' / 'patient020_frame14.nii.gz'   # patient020_es
  good = bad.read_bytes()
  bad.write_bytes(good[:len(good) // 2])
  argv = ['--backbone', 'mind', '--dataset', 'acdc', '--data-root', str(root), '--out',
          str(tmp_path / 'feat'), '--input-size', '32', '--device', 'cpu', '--no-progress',
          '--volumes-per-shard', '1']
  assert run.main(argv) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert line.startswith(f'error: {bad}: cannot read the image voxel data'), line
  assert 're-download' in line
  part = json.loads((tmp_path / 'feat' / store.partial_name(0, 1)).read_text())
  assert [v['key'] for v in part['volumes']] == ['patient019_ed', 'patient019_es',
                                                 'patient020_ed']
  bad.write_bytes(good)
  assert run.main(argv) == 0
  assert 'done: 1 volumes (3 already done)' in capsys.readouterr().err


def test_nifti_with_unreadable_header_exits_2_at_scan(tmp_path, capsys):
  from feature_extract.synthetic import phantoms  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'acdc'
  phantoms.write_acdc_phantoms(str(root), 1, seed=0, first_id=19, inplane_size=(40, 60))
  bad = root / 'training' / 'patient019' / 'patient019_frame12.nii.gz'
  bad.write_bytes(bad.read_bytes()[:60])
  argv = ['--backbone', 'mind', '--dataset', 'acdc', '--data-root', str(root), '--out',
          str(tmp_path / 'feat'), '--input-size', '32', '--device', 'cpu', '--no-progress']
  assert run.main(argv) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert line.startswith(f'error: {bad}: cannot read the image NIfTI header'), line
  assert 're-download' in line


@pytest.mark.parametrize('out,message', [
    ('file.txt', 'exists and is a file, not a folder'),
    ('file.txt/sub', 'cannot create the feature store folder \\(Not a directory'),
])
def test_out_that_cannot_be_a_folder_exits_2(toy, tmp_path, capsys, out, message):
  (tmp_path / 'file.txt').write_text('keep me')
  assert run.main(_argv(tmp_path / out)) == 2
  line = _one_error_line(capsys.readouterr().err)
  assert line.startswith(f'error: {tmp_path / out}: ') and re.search(message, line), line
  assert 'Pass --out' in line
  assert (tmp_path / 'file.txt').read_text() == 'keep me'


@pytest.mark.skipif(os.geteuid() == 0, reason='root ignores permission bits')
def test_out_under_read_only_folder_exits_2(toy, tmp_path, capsys):
  (tmp_path / 'ro').mkdir()
  os.chmod(tmp_path / 'ro', 0o500)
  try:
    assert run.main(_argv(tmp_path / 'ro' / 'feat')) == 2
  finally:
    os.chmod(tmp_path / 'ro', 0o700)
  line = _one_error_line(capsys.readouterr().err)
  assert f'{tmp_path / "ro" / "feat"}: cannot create the feature store folder' in line, line


@pytest.mark.slow
def test_two_launched_workers_make_the_store_without_a_merge_step(tmp_path):
  """torchrun-style workers (RANK/WORLD_SIZE in the environment, no --num-shards) running at
  the same time: each extracts its share, the last to finish writes index.json; the store
  equals a single worker's."""
  from feature_extract.synthetic import phantoms
  root = tmp_path / 'acdc'
  phantoms.write_acdc_phantoms(str(root), 3, 0, inplane_size=(40, 48))
  argv = [sys.executable, 'feature_extract/run.py', '--backbone', 'mind', '--dataset', 'acdc',
          '--data-root', str(root), '--input-size', '32', '--device', 'cpu', '--no-progress',
          '--dataset-option', 'shape=[24,24,8]', '--volumes-per-shard', '1']
  env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
  procs = [subprocess.Popen(argv + ['--out', str(tmp_path / 'two')], cwd=ROOT,
                            env=dict(env, RANK=str(i), WORLD_SIZE='2', LOCAL_RANK=str(i)),
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  assert [p.returncode for p in procs] == [0, 0], errs
  assert ['worker 1/2' in errs[0], 'worker 2/2' in errs[1]] == [True, True], errs
  assert sum('manifest:' in e for e in errs) == 1, errs        # exactly one merged
  assert subprocess.run(argv + ['--out', str(tmp_path / 'one')], cwd=ROOT, env=env,
                        capture_output=True).returncode == 0
  two, one = store.FeatureStore(str(tmp_path / 'two')), store.FeatureStore(str(tmp_path / 'one'))
  assert two.keys() == one.keys() and len(one.keys()) == 6 and two.header == one.header
  with open(tmp_path / 'two' / 'index.json') as f:
    assert len(json.load(f)['shards']) == 6                  # one volume per shard, both workers
  for k in one.keys():
    np.testing.assert_array_equal(two.features(k), one.features(k))
