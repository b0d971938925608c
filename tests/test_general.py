"""The general head (issue: `fmir register` zero-shot): the domain-randomised generator
(determinism; labels follow the deformation, checked with scipy; images follow labels), its
pair lists read by the "custom" reader, the factor/label rule for validation stores, a short
training run of configs/general.py on generated pairs that lowers the loss, shipping a run,
and `fmir register` with no --checkpoint using the shipped head.
"""
import dataclasses
import json
import os

import numpy as np
import pytest

from feature_extract.datasets import custom as custom_pairs
from feature_extract.synthetic import phantom_pairs
from feature_extract.synthetic import randomised
from fmir_jax import cli
from fmir_jax.evaluate import evaluation
from fmir_jax import general
from fmir_jax.core import nifti
from fmir_jax.core import metrics
from fmir_jax.train import head_card
from tests.helpers import oracles

SMALL = randomised.Setting('iso', (24, 24, 20), (2.0, 2.0, 2.0))
SMALL_ANISO = randomised.Setting('aniso', (32, 32, 6), (1.6, 1.6, 8.0), through_plane=0.3)


def test_generator_is_deterministic_and_labels_follow_the_deformation():
  a, b, c = (randomised.draw_pair(SMALL, i, 7) for i in (3, 3, 4))
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  assert not np.array_equal(a[2], c[2])
  fixed, moving, fixed_lab, moving_lab, u = a
  assert fixed.shape == moving.shape == SMALL.shape and u.shape == SMALL.shape + (3,)
  assert fixed.dtype == np.float32 and 0 <= fixed.min() and fixed.max() <= 1
  # moving labels = fixed labels at x + u(x): scipy nearest neighbour as the oracle
  np.testing.assert_array_equal(
      moving_lab, oracles.warp_nearest(fixed_lab, u, mode='nearest', coord_dtype=np.float32))
  # a diffeomorphism of the drawn size (peak over the volume, mm)
  assert metrics.folding_fraction(u, crop=0) == 0.0
  peak = np.linalg.norm(u * np.asarray(SMALL.spacing_mm), axis=-1).max()
  assert SMALL.disp_mm[0] * 0.8 <= peak <= SMALL.disp_mm[1] * 1.6
  assert int(fixed_lab.max()) >= SMALL.labels[0]


@pytest.mark.parametrize('p_invert, sign', [(0.0, 1), (1.0, -1)])
def test_images_follow_their_labels_with_one_contrast_or_its_inverse(p_invert, sign):
  s = dataclasses.replace(SMALL, p_invert=p_invert)
  fixed, moving, fixed_lab, moving_lab, _ = randomised.draw_pair(s, 1, 0)
  labels = [k for k in np.unique(fixed_lab) if (fixed_lab == k).sum() > 50
            and (moving_lab == k).sum() > 50]
  mf = np.array([fixed[fixed_lab == k].mean() for k in labels])
  mm = np.array([moving[moving_lab == k].mean() for k in labels])
  assert sign * np.corrcoef(mf, mm)[0, 1] > 0.8
  # intensities are mostly explained by the labels (between-label variance dominates)
  within = np.mean([fixed[fixed_lab == k].var() for k in labels])
  assert within < 0.5 * fixed.var()



SMALL_V2 = dataclasses.replace(randomised.SETTINGS['iso2'], shape=(28, 24, 20), p_fov_cut=0.0)


def test_residual_linear_map_is_scipys_affine_transform():
  """compose_linear with no deformation: sampling at its field is scipy's affine_transform
  of the mm map A(p) = M (p - c) + c + t in voxel coordinates; with the identity map it
  returns the deformation itself."""
  from scipy import ndimage
  s = SMALL_V2
  m, t = randomised.misalignment(np.random.default_rng(4), s)
  assert np.abs(m - np.eye(3)).max() > 1e-3 and np.abs(t).max() > 0.1
  sp = np.asarray(s.spacing_mm)
  img = ndimage.gaussian_filter(np.random.default_rng(1).random(s.shape), 2.0)
  u = randomised.compose_linear(np.zeros(s.shape + (3,), np.float32), m, t, sp)
  centre = (np.asarray(s.shape) - 1) / 2 * sp
  want = ndimage.affine_transform(img, np.diag(1 / sp) @ m @ np.diag(sp),
                                  offset=(centre - m @ centre + t) / sp, order=1,
                                  mode='nearest')
  np.testing.assert_allclose(phantom_pairs.sample(img, u, 1), want, atol=1e-4)
  v = np.random.default_rng(2).normal(size=s.shape + (3,)).astype(np.float32)
  np.testing.assert_allclose(randomised.compose_linear(v, np.eye(3), np.zeros(3), sp), v,
                             atol=1e-5)


def test_version2_structures_nest_wall_and_tube_inside_the_blobs():
  """Cores lie inside one parent label (their 6-neighbours are the core or the parent),
  walls lie within their thickness of another label, tubes inside the body; ids stay at
  most max_label."""
  from scipy import ndimage
  rng = np.random.default_rng(0)
  for kind, s in (('core', dataclasses.replace(SMALL_V2, shells=(0, 0), tubes=(0, 0),
                                                nested=(2, 2))),
                  ('wall', dataclasses.replace(SMALL_V2, nested=(0, 0), tubes=(0, 0),
                                                shells=(2, 2))),
                  ('tube', dataclasses.replace(SMALL_V2, nested=(0, 0), shells=(0, 0),
                                                tubes=(2, 2)))):
    base = randomised.label_map(rng, s)
    out = randomised.add_structures(rng, base, s)
    new_ids = [k for k in np.unique(out) if k > base.max()]
    assert new_ids and max(new_ids) <= s.max_label, kind
    for k in new_ids:
      part = out == k
      if kind == 'core':
        (parent,) = np.unique(base[part])
        ring = ndimage.binary_dilation(part) & ~part
        assert set(np.unique(out[ring])) <= {k, int(parent)} | set(new_ids), kind
      elif kind == 'wall':
        (parent,) = np.unique(base[part])
        dist = ndimage.distance_transform_edt(base == parent, sampling=s.spacing_mm)
        assert dist[part].max() <= s.shell_mm[1] + 1e-6
        assert ((out == parent).sum()) > 0              # the wall encloses a remainder
      else:
        assert (base[part] > 0).all()


def test_version2_pairs_follow_the_total_map_and_cut_one_field_of_view():
  """A version-2 pair's moving labels are the fixed labels at x + u(x) (deformation and
  residual linear map; scipy nearest neighbour); with a field-of-view cut one image and
  its labels are 0 on a slab at one side."""
  fixed, moving, fixed_lab, moving_lab, u = randomised.draw_pair(SMALL_V2, 1, 3)
  np.testing.assert_array_equal(
      moving_lab, oracles.warp_nearest(fixed_lab, u, mode='nearest', coord_dtype=np.float32))
  assert metrics.folding_fraction(u, crop=0) == 0.0
  s = dataclasses.replace(SMALL_V2, p_fov_cut=1.0)
  cut = randomised.draw_pair(s, 1, 3)
  slabs = []
  for img, lab in ((cut[0], cut[2]), (cut[1], cut[3])):
    for axis in range(3):
      for side in (0, -1):
        face = np.take(img, side, axis=axis)
        if np.all(face == 0) and np.all(np.take(lab, side, axis=axis) == 0):
          slabs.append(axis)
  assert slabs, 'no image lost a slab of its field of view'


def test_pair_lists_resume_and_the_custom_reader_reads_them(tmp_path):
  csv = randomised.write_pairs(str(tmp_path), SMALL, 2, seed=0)
  first = tmp_path / 'iso' / 'pair0000_fixed.nii.gz'
  stamp = first.stat().st_mtime_ns
  csv = randomised.write_pairs(str(tmp_path), SMALL, 3, seed=0)
  assert first.stat().st_mtime_ns == stamp           # kept, not redrawn
  sources = custom_pairs.scan(csv, shape=SMALL.shape, spacing_mm=SMALL.spacing_mm)
  assert len(sources) == 6 and len(custom_pairs.pairs(sources)) == 3
  vol = next(s for s in sources if s.key.startswith('pair0002_fixed')).load()
  _, _, fixed_lab, _, _ = randomised.draw_pair(SMALL, 2, 0)
  np.testing.assert_array_equal(vol.labels, fixed_lab)
  lab, affine, _ = nifti.load_nifti(str(tmp_path / 'iso' / 'pair0002_fixed_labels.nii.gz'))
  np.testing.assert_allclose(affine, randomised.affine_for(SMALL))


class _Store:
  """The three things ``settings_for_store`` reads of a feature store."""

  def __init__(self, dataset, spacing, labels, num_classes=None):
    self.header = {'dataset': {'name': dataset}}
    if num_classes:
      self.header['num_classes'] = num_classes
    self._spacing, self._labels = spacing, labels

  def info(self, key):
    return type('Info', (), {'spacing_mm': self._spacing})()

  def labels(self, key):
    return self._labels


def test_validation_store_settings_match_by_dataset_and_spacing():
  from fmir_jax.train.data import PairRef
  from fmir_jax.train.run_file import StoreSetting
  refs = [PairRef(0, 'a', 'b')]
  trained = ['custom', 'custom']
  settings = [StoreSetting((2, 2, 2), 16, spacing_mm=(2.0, 2.0, 2.0)),
              StoreSetting((2, 2, 1), 16, spacing_mm=(1.6, 1.6, 8.0))]
  lab = np.zeros((4, 4, 4), np.uint8)
  lab[0, 0, 0] = 3
  rule = evaluation.settings_for_store
  # a custom store at a training spacing: that store's factors; labels its own (3, not 16)
  assert rule(_Store('custom', (1.6, 1.6, 8.0), lab), refs, trained, settings) == \
      StoreSetting((2, 2, 1), 3, spacing_mm=(1.6, 1.6, 8.0))
  # another spacing: factors from the spacing (halve axes within 1.5x of the finest)
  assert rule(_Store('custom', (1.0, 1.0, 3.0), lab), refs, trained, settings).factors \
      == (2, 2, 1)
  assert rule(_Store('custom', (3.0, 3.0, 3.0), lab), refs, trained, settings).factors \
      == (2, 2, 2)
  # a dataset reader's store keeps the reader's label count
  assert rule(_Store('abdomen', (2.0, 2.0, 2.0), lab, 13), refs, ['acdc'],
              [StoreSetting((2, 2, 1), 3)]) == \
      StoreSetting((2, 2, 2), 13, spacing_mm=(2.0, 2.0, 2.0))


@pytest.fixture(scope='module')
def general_run(tmp_path_factory):
  """configs/general_v2.py shrunk (its three grids small, the head from level 1): 3 generated
  pairs per grid, 1 validation pair per phantom set, 12 steps."""
  from configs import general_v2
  from fmir_jax.train import loop
  out = str(tmp_path_factory.mktemp('general'))
  general.prepare_out(out)
  small = [dataclasses.replace(randomised.SETTINGS[n.removeprefix('synth_')], shape=shape)
           for n, shape in zip(general_v2.TRAIN, ((24, 24, 20), (32, 32, 6), (24, 24, 10)))]
  lists = general.write_data(out, train_pairs=3, val_pairs=1, seed=0, train_settings=small,
                             val_sets=phantom_pairs.set_specs(smoke=True), log=lambda s: None,
                             config=general_v2)
  stores = general.extract(out, lists, log=lambda s: None)
  c = general.config_for(stores, steps=12, config=general_v2)
  assert c.model.finest_level == 1
  c.model.n, c.model.levels, c.feature_channels = 4, 3, 8
  c.loss.ncc_windows = c.loss.ncc_windows[:3]
  c.train.eval_every = c.train.checkpoint_every = 6
  c.train.log_every = 1
  c.data.prefetch = 1
  workdir = os.path.join(out, 'run')
  result = loop.train_and_evaluate(c, workdir, quiet=True)
  return out, workdir, result


@pytest.mark.slow
def test_short_general_training_lowers_the_loss_and_validates_out_of_domain(general_run):
  out, workdir, result = general_run
  losses = [result.losses[s] for s in sorted(result.losses)]
  assert len(losses) == 12 and np.isfinite(losses).all()
  assert np.mean(losses[-4:]) < np.mean(losses[:4])
  info = json.load(open(os.path.join(workdir, 'run.json')))
  assert [s['factors'] for s in info['store_settings']] == [[2, 2, 2], [2, 2, 1], [2, 2, 1]]
  assert info['model']['finest_level'] == 1
  val = [json.loads(line) for line in open(os.path.join(workdir, 'val.jsonl'))]
  assert [v['step'] for v in val] == [6, 12]
  assert all(0 < v['initial_dice'] < 1 for v in val)


@pytest.mark.slow
def test_ship_then_register_without_checkpoint(general_run, tmp_path, monkeypatch, capsys):
  out, workdir, _ = general_run
  dest = tmp_path / 'shipped'
  general.ship(workdir, str(dest), ['python', '-m', 'fmir_jax.general'], seed=0)
  general.ship(workdir, str(dest), ['python', '-m', 'fmir_jax.general'], seed=0)  # again
  card = json.load(open(dest / general.CARD))
  assert card['what'] == 'general head, mind features, not a foundation model'
  assert card['checkpoint_step'] in (6, 12) and 'dice' in card['validation']
  assert sorted(os.listdir(dest)) == sorted(['run.json', 'pca', 'val.jsonl', 'best',
                                             general.CARD])
  (tmp_path / 'mine').mkdir()
  (tmp_path / 'mine' / 'notes.txt').write_text('keep')
  with pytest.raises(general.GeneralError, match='not empty'):
    general.ship(workdir, str(tmp_path / 'mine'), [], seed=0)
  assert (tmp_path / 'mine' / 'notes.txt').read_text() == 'keep'

  os.chmod(dest, 0o555)                    # an installed package may be read-only
  monkeypatch.setattr(head_card, 'SHIPPED', str(dest))
  pair = os.path.join(out, 'data', 'val_abdomen')
  res = tmp_path / 'res'
  rc = cli.main(['register', '--fixed', f'{pair}/pair01_fixed.nii.gz',
                 '--moving', f'{pair}/pair01_moving.nii.gz', '--out', str(res), '--no-cache'])
  os.chmod(dest, 0o755)
  err = capsys.readouterr().err
  assert rc == 0, err
  assert 'general head shipped with fmir-jax' in err and 'not a foundation model' in err
  report = json.load(open(res / 'report.json'))
  assert report['head'] == card['what'] and report['grid']['mode'] == 'native'
  assert report['grid']['pyramid_factors'] == [2, 2, 2]    # its isotropic training grid

  monkeypatch.setattr(head_card, 'SHIPPED', str(tmp_path / 'none'))
  rc = cli.main(['register', '--fixed', f'{pair}/pair01_fixed.nii.gz',
                 '--moving', f'{pair}/pair01_moving.nii.gz', '--out', str(tmp_path / 'r2')])
  err = capsys.readouterr().err
  assert rc == 2 and 'python -m fmir_jax.general' in err and not (tmp_path / 'r2').exists()


@pytest.mark.slow
def test_the_shipped_general_head_registers_with_no_checkpoint(general_run, tmp_path, capsys):
  """What `pip install` gives: `fmir register --fixed F --moving M --out O`, nothing else."""
  card = json.load(open(os.path.join(general.SHIPPED, general.CARD)))
  assert card['what'] == 'general head, mind features, not a foundation model'
  assert card['command'][:3] == ['python', '-m', 'fmir_jax.general'] and len(card['commit']) == 40
  shipped = [os.path.join(d, f) for d, _, fs in os.walk(general.SHIPPED) for f in fs]
  assert sum(os.path.getsize(p) for p in shipped) <= 20e6
  assert not any(p.endswith(('.pkl', '.pickle', '.pt')) for p in shipped)
  out, _, _ = general_run
  pair = os.path.join(out, 'data', 'val_cardiac')         # 4 x 4 x 10 mm: no training grid
  rc = cli.main(['register', '--fixed', f'{pair}/pair01_fixed.nii.gz',
                 '--moving', f'{pair}/pair01_moving.nii.gz',
                 '--fixed-labels', f'{pair}/pair01_fixed_labels.nii.gz',
                 '--moving-labels', f'{pair}/pair01_moving_labels.nii.gz',
                 '--out', str(tmp_path / 'o'), '--no-cache'])
  err = capsys.readouterr().err
  assert rc == 0, err
  report = json.load(open(tmp_path / 'o' / 'report.json'))
  assert report['checkpoint'] == os.path.abspath(general.SHIPPED)
  assert report['head'] == card['what'] and report['checkpoint_step'] == card['checkpoint_step']
  assert report['grid']['mode'] == 'native' and report['grid']['pyramid_factors'] == [2, 2, 1]
  assert 0 <= report['dice']['mean_after'] <= 1 and report['jacobian']['folding_fraction'] < 0.01
