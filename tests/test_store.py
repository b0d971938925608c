"""Tests for fmir_jax.core.store: format round trip, resume, corruption, workers, geometry."""
import json
import os

import numpy as np
import pytest
from safetensors import safe_open

from feature_extract.datasets.base import Volume
from fmir_jax.core import files
from fmir_jax.core import jsonio
from fmir_jax.core import store

C = 5


def _header(**overrides):
  header = {
      'backbone': {'name': 'test', 'weights': None, 'weights_sha256': 'abc'},
      'layer': 2, 'input_size': 16, 'resize': 'upsample',
      'normalisation': {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25]},
      'feature_dtype': 'float16', 'channels': C, 'patch_size': 4,
      'dataset': {'name': 'toy', 'options': {}},
  }
  header.update(overrides)
  return header


def _volume(i, labels=True):
  rng = np.random.default_rng(i)
  shape = (6, 5, 3 + i % 2)
  return Volume(
      key=f'v{i:02d}', dataset='toy', subject=f's{i}', frame='', split='train' if i < 4 else 'val',
      image=rng.random(shape, dtype=np.float32),
      labels=rng.integers(0, 4, shape, dtype=np.uint8) if labels else None,
      spacing_mm=(1.5, 1.5, 3.0), affine=np.diag([1.5, 1.5, 3.0, 1.0]) + 0.1 * i,
      meta={'source': f'/data/v{i}.nii.gz', 'crop': [i, 0]})


def _features(vol):
  rng = np.random.default_rng(100 + int(vol.key[1:]))
  return rng.standard_normal((vol.image.shape[2], 3, 2, C)).astype(np.float32)


GEOM = {'offset': [-0.125, 0.25], 'scale': [0.5, 0.5]}
VOLS = [_volume(i, labels=i != 2) for i in range(6)]
PAIRS = {'train': [['v00', 'v01'], ['v01', 'v00']], 'val': [['v04', 'v05']]}
KEYS = [v.key for v in VOLS]


def _write(out, vols=VOLS, header=None, **kw):
  writer = store.StoreWriter(str(out), header or _header(), volumes_per_shard=2, keys=KEYS,
                             pairs=PAIRS, **kw)
  for v in vols:
    if v.key not in writer.done_keys:
      writer.add(v, _features(v), GEOM, seconds=0.5, device='cpu')
  return writer


def test_write_read_round_trip(tmp_path):
  _write(tmp_path).close()
  fs = store.FeatureStore(str(tmp_path))
  fs.validate()
  assert fs.keys() == KEYS
  assert fs.keys('val') == ['v04', 'v05']
  assert fs.pairs('train') == [('v00', 'v01'), ('v01', 'v00')]
  assert fs.pairs('test') == []
  assert fs.header['layer'] == 2 and fs.header['channels'] == C
  for v in VOLS:
    feats = fs.features(v.key)
    assert feats.dtype == np.float16 and isinstance(feats, np.memmap)
    np.testing.assert_array_equal(feats, _features(v).astype(np.float16))
    np.testing.assert_array_equal(fs.image(v.key), v.image)
    if v.labels is None:
      assert fs.labels(v.key) is None
    else:
      np.testing.assert_array_equal(fs.labels(v.key), v.labels)
    info = fs.info(v.key)
    assert info.shape == v.image.shape and info.grid == (v.image.shape[2], 3, 2)
    np.testing.assert_array_equal(info.affine, v.affine)
    assert info.meta == v.meta and info.geometry == GEOM
    assert fs.timing(v.key) == {'seconds': 0.5, 'device': 'cpu'}
  # 6 volumes, 2 per shard -> 3 shards, readable by the reference safetensors reader.
  shards = sorted(f for f in os.listdir(tmp_path) if f.endswith('.safetensors'))
  assert shards == [store.shard_name(0, 1, s) for s in range(3)]
  with safe_open(str(tmp_path / shards[0]), framework='numpy') as f:
    assert json.loads(f.metadata()['keys']) == ['v00', 'v01']
    assert f.metadata()['format_version'] == str(store.FORMAT_VERSION)
    np.testing.assert_array_equal(f.get_tensor('v01/image'), VOLS[1].image)
  # Timings are not in the manifest.
  assert 'seconds' not in (tmp_path / 'index.json').read_text()


def test_same_inputs_give_byte_identical_manifest_and_shards(tmp_path):
  _write(tmp_path / 'a').close()
  _write(tmp_path / 'b').close()
  for name in ['index.json', store.shard_name(0, 1, 0)]:
    assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()


def _write_killed_at_second_shard(out, monkeypatch):
  """Runs _write(out), killed (KeyboardInterrupt) while the second shard is renamed into place."""
  real_replace = os.replace
  calls = []

  def dying_replace(src, dst):
    if dst.endswith('.safetensors'):
      calls.append(dst)
      if len(calls) == 2:
        raise KeyboardInterrupt
    real_replace(src, dst)

  monkeypatch.setattr(os, 'replace', dying_replace)
  with pytest.raises(KeyboardInterrupt):
    _write(out)
  monkeypatch.setattr(os, 'replace', real_replace)


def test_kill_mid_write_then_resume(tmp_path, monkeypatch):
  _write(tmp_path / 'ref').close()
  out = tmp_path / 'run'
  _write_killed_at_second_shard(out, monkeypatch)
  assert any('.tmp-' in f for f in os.listdir(out))           # half-written shard left behind
  assert not (out / 'index.json').exists()
  # A reader never accepts the partial store.
  with pytest.raises(store.StoreError, match='not finished'):
    store.FeatureStore(str(out))
  writer = _write(out, vols=[])
  assert writer.done_keys == {'v00', 'v01'}                      # only the complete shard
  assert not any('.tmp-' in f for f in os.listdir(out))
  _write(out).close()
  assert (out / 'index.json').read_bytes() == (tmp_path / 'ref' / 'index.json').read_bytes()
  fs = store.FeatureStore(str(out))
  fs.validate()
  np.testing.assert_array_equal(fs.features('v03'), _features(VOLS[3]).astype(np.float16))


def test_header_mismatch_refuses_resume(tmp_path):
  _write(tmp_path, vols=VOLS[:2])
  with pytest.raises(store.StoreError, match=r'different header: layer: 2 != .last.'):
    _write(tmp_path, header=_header(layer='last'))
  with pytest.raises(store.StoreError, match='--num-shards 1, not 2'):
    _write(tmp_path, num_shards=2, shard_index=0)


def _flip_byte(path, offset=-3):
  data = bytearray(path.read_bytes())
  data[offset] ^= 0xFF                                             # same size, other bytes
  path.write_bytes(bytes(data))


def test_corrupted_shard_is_reported_by_name(tmp_path):
  _write(tmp_path).close()
  name = store.shard_name(0, 1, 1)
  path = tmp_path / name
  data = bytearray(path.read_bytes())
  path.write_bytes(bytes(data[:-10]))                              # truncated
  with pytest.raises(store.StoreError, match=f'{name}: corrupt or truncated'):
    store.FeatureStore(str(tmp_path))
  path.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json......' + bytes(data[24:]))
  with pytest.raises(store.StoreError, match=f'{name}: corrupt shard.*v02, v03.*Re-run'):
    store.FeatureStore(str(tmp_path))
  path.unlink()
  with pytest.raises(store.StoreError, match=f'{name}: shard file is missing.*Re-run'):
    store.FeatureStore(str(tmp_path))


def test_bit_flip_is_caught_on_first_read_by_default(tmp_path, monkeypatch):
  monkeypatch.delenv('FMIR_SKIP_SHARD_VERIFY', raising=False)
  _write(tmp_path).close()
  name = store.shard_name(0, 1, 1)                                 # holds v02 and v03
  _flip_byte(tmp_path / name)                                      # the last bytes: v03 labels
  fs = store.FeatureStore(str(tmp_path))                           # size/header still valid
  np.testing.assert_array_equal(fs.labels('v00'), VOLS[0].labels)  # other shards read fine
  for read in (lambda: fs.labels('v03'), lambda: fs.image('v02'), fs.validate):
    with pytest.raises(store.StoreError) as err:
      read()
    msg = str(err.value)
    assert msg.startswith(f'{tmp_path / name}: sha256 mismatch with the manifest'), msg
    assert 'volumes v02, v03' in msg and 'Re-run the feature_extract/run.py command' in msg
    assert 'repairs the store in place' in msg and '\n' not in msg
  # Opting out reads the corrupt bytes as they are.
  fs = store.FeatureStore(str(tmp_path), verify=False)
  assert not np.array_equal(fs.labels('v03'), VOLS[3].labels)
  monkeypatch.setenv('FMIR_SKIP_SHARD_VERIFY', '1')
  assert not np.array_equal(store.FeatureStore(str(tmp_path)).labels('v03'), VOLS[3].labels)


def test_shard_sha256_is_computed_once_per_process(tmp_path, monkeypatch):
  monkeypatch.delenv('FMIR_SKIP_SHARD_VERIFY', raising=False)
  _write(tmp_path).close()
  hashed = []
  real_sha256 = files.file_digest
  monkeypatch.setattr(files, 'file_digest',
                      lambda path: hashed.append(path) or real_sha256(path))
  for _ in range(2):                                               # two readers, one process
    fs = store.FeatureStore(str(tmp_path))
    for key in KEYS:
      fs.features(key), fs.image(key), fs.labels(key)
  assert sorted(os.path.basename(p) for p in hashed) == [store.shard_name(0, 1, s)
                                                         for s in range(3)]
  path = tmp_path / store.shard_name(0, 1, 2)
  _flip_byte(path)
  os.utime(path, ns=(1, 1))                                        # a later change of the file
  with pytest.raises(store.StoreError, match='sha256 mismatch'):
    store.FeatureStore(str(tmp_path)).features('v05')


def test_pair_naming_a_missing_volume_is_refused_on_open(tmp_path):
  _write(tmp_path).close()
  index = tmp_path / 'index.json'
  manifest = json.loads(index.read_text())
  manifest['pairs']['train'].append(['v01', 'v09'])
  index.write_text(store.dumps(manifest))
  with pytest.raises(store.StoreError) as err:
    store.FeatureStore(str(tmp_path))
  msg = str(err.value)
  assert msg.startswith(f'{index}: train pair [\'v01\', \'v09\'] names volume \'v09\''), msg
  assert 'Re-run the feature_extract/run.py command' in msg and '--merge' in msg


def _shard_files(out):
  return {f: (out / f).read_bytes() for f in sorted(os.listdir(out))
          if f.endswith('.safetensors')}


def test_resume_repairs_missing_truncated_and_corrupt_shards_in_place(tmp_path):
  _write(tmp_path).close()
  original = _shard_files(tmp_path)
  index = (tmp_path / 'index.json').read_bytes()
  s0, s1, s2 = (tmp_path / store.shard_name(0, 1, s) for s in range(3))
  s0.write_bytes(original[s0.name][:-100])                         # truncated
  _flip_byte(s1)                                                   # same size, bad sha256
  (tmp_path / 'notes.txt').write_text('mine')                      # a user's file
  s2_mtime = s2.stat().st_mtime_ns
  writer = _write(tmp_path, vols=[])
  assert [(r.file, r.keys) for r in writer.repairs] == [(s0.name, ('v00', 'v01')),
                                                        (s1.name, ('v02', 'v03'))]
  assert 'corrupt or truncated' in writer.repairs[0].problem
  assert 'sha256 mismatch' in writer.repairs[1].problem
  assert writer.done_keys == {'v04', 'v05'}
  _write(tmp_path).close()
  assert _shard_files(tmp_path) == original                        # byte for byte
  assert (tmp_path / 'index.json').read_bytes() == index
  assert s2.stat().st_mtime_ns == s2_mtime                         # the sound shard untouched
  assert (tmp_path / 'notes.txt').read_text() == 'mine'
  store.FeatureStore(str(tmp_path)).validate()
  s1.unlink()                                                      # missing
  assert [r.keys for r in _write(tmp_path, vols=[]).repairs] == [('v02', 'v03')]
  _write(tmp_path).close()
  assert _shard_files(tmp_path) == original


def test_repair_killed_midway_resumes_without_overwriting_sound_shards(tmp_path, monkeypatch):
  _write(tmp_path).close()
  original = _shard_files(tmp_path)
  for s in (0, 1):
    _flip_byte(tmp_path / store.shard_name(0, 1, s))
  _write_killed_at_second_shard(tmp_path, monkeypatch)      # during the repair
  part = json.loads((tmp_path / store.partial_name(0, 1)).read_text())
  assert part['redo_shards'] == [{'file': store.shard_name(0, 1, 1), 'keys': ['v02', 'v03']}]
  _write(tmp_path).close()
  assert _shard_files(tmp_path) == original
  assert 'redo_shards' not in json.loads((tmp_path / store.partial_name(0, 1)).read_text())
  store.FeatureStore(str(tmp_path)).validate()


@pytest.mark.parametrize('sub,message', [
    ('file.txt', 'exists and is a file, not a folder'),
    ('file.txt/sub', 'cannot create the feature store folder'),
])
def test_writer_out_dir_that_cannot_be_a_folder(tmp_path, sub, message):
  (tmp_path / 'file.txt').write_text('keep me')
  with pytest.raises(store.StoreError, match=message):
    store.StoreWriter(str(tmp_path / sub), _header())
  assert (tmp_path / 'file.txt').read_text() == 'keep me'


def test_two_workers_and_merge_equal_single_worker(tmp_path):
  _write(tmp_path / 'one').close()
  out = tmp_path / 'two'
  closed = []
  for i in range(2):
    mine = store.assign_keys(KEYS, 2, i)
    assert mine == KEYS[i::2]
    w = _write(out, vols=[v for v in VOLS if v.key in mine], num_shards=2, shard_index=i)
    if i == 0:
      # Worker 1 has not finished: no index.json; the reader joins the partial manifests.
      assert w.close() is None and not (out / 'index.json').exists()
    else:
      closed.append(w.close())                    # the last worker to finish merges
  assert closed == [str(out / 'index.json')]
  joined = store.FeatureStore(str(out))
  before = (out / 'index.json').stat().st_mtime_ns
  assert store.merge(str(out)) == str(out / 'index.json')     # again: the same bytes, untouched
  assert (out / 'index.json').stat().st_mtime_ns == before
  merged = json.loads((out / 'index.json').read_text())
  single = json.loads((tmp_path / 'one' / 'index.json').read_text())
  for m in (merged, single):
    for v in m['volumes']:
      v.pop('shard')
    m.pop('shards')
    m.pop('num_workers')
  assert merged == single
  one = store.FeatureStore(str(tmp_path / 'one'))
  for fs in (joined, store.FeatureStore(str(out))):
    assert fs.keys() == one.keys()
    for k in KEYS:
      np.testing.assert_array_equal(fs.features(k), one.features(k))
      assert fs.timing(k) == one.timing(k)


def test_merge_reports_missing_and_duplicated_keys(tmp_path):
  w0 = _write(tmp_path, vols=[v for v in VOLS if v.key in KEYS[0::2]], num_shards=2)
  w0.close()
  with pytest.raises(store.StoreError, match=r'workers \[1\] of 2'):
    store.merge(str(tmp_path))
  # Worker 1 "forgets" v05 (closing with a known key list refuses; simulate without keys).
  w1 = store.StoreWriter(str(tmp_path), _header(), shard_index=1, num_shards=2, pairs=PAIRS)
  for v in VOLS:
    if v.key in ('v01', 'v03', 'v02'):  # v02 also belongs to worker 0 -> duplicate
      w1.add(v, _features(v), GEOM, 0.1)
  with pytest.raises(store.StoreError, match=r"written more than once: v02"):
    w1.close()                                    # the last worker merges, and refuses
  with pytest.raises(store.StoreError, match=r"written more than once: v02"):
    store.merge(str(tmp_path))


def test_merge_reports_missing_keys(tmp_path):
  for i in range(2):
    w = store.StoreWriter(str(tmp_path), _header(), shard_index=i, num_shards=2, pairs=PAIRS)
    for v in VOLS[i:4:2]:
      w.add(v, _features(v), GEOM, 0.1)
    if i == 0:
      assert w.close() is None
  with pytest.raises(store.StoreError, match=r"missing from the store: \['v04', 'v05'\]"):
    w.close()
  assert not (tmp_path / 'index.json').exists()


def test_close_refuses_incomplete_worker(tmp_path):
  w = _write(tmp_path, vols=VOLS[:3])
  with pytest.raises(store.StoreError, match=r"without volumes \['v03', 'v04', 'v05'\]"):
    w.close()


def test_bad_features_and_check_compatible(tmp_path):
  w = store.StoreWriter(str(tmp_path), _header())
  with pytest.raises(store.StoreError, match=r'features must be \(D=3, h, w, c=5\)'):
    w.add(VOLS[0], np.zeros((3, 2, 2, 4), np.float32), GEOM, 0.0)
  store.check_compatible(_header(), _header(input_size=32, dataset={'name': 'other'}))
  with pytest.raises(store.StoreError, match=r'backbone.name: .test. != .sam.*channels: 5 != 256'):
    store.check_compatible(_header(), _header(backbone={'name': 'sam'}, channels=256),
                           source='features/acdc')


def test_manifest_json_is_canonical_and_strict():
  """store.dumps and report's summary JSON share jsonio.plain: numpy -> python, tuples ->
  lists, keys -> str; the store refuses NaN/inf (the manifest is hashed), the report nulls it."""
  value = {2: (np.float32(0.5), np.int64(3)), 'b': np.arange(2), 'a': np.bool_(1), 'n': None}
  assert store.dumps(value) == ('{\n "2": [\n  0.5,\n  3\n ],\n "a": true,\n "b": [\n  0,\n'
                                '  1\n ],\n "n": null\n}\n')
  assert jsonio.plain([np.nan, np.float32(np.inf)], finite_only=False) == [None, None]
  with pytest.raises(store.StoreError, match='finite numbers, got nan'):
    store.dumps({'x': [1.0, np.nan]})
  with pytest.raises(store.StoreError, match='type set is not JSON-serialisable'):
    store.dumps({'x': {1}})
