"""FMIR network: output shapes for cardiac- and abdomen-like grids (odd sizes included), and
a few optimisation steps on a synthetic pair with a known smooth deformation lower the NCC
loss and raise label Dice (scored with the scipy nearest-neighbour warp as oracle)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import ndimage

from fmir_jax.model import network as M
from fmir_jax.ops import pyramid
from fmir_jax.model import slabs as S
from fmir_jax.core import patches
from fmir_jax.train import step as step_lib
from tests.helpers import oracles


def _inputs(image, c, patch, seed):
  """Model inputs from an image: patch-grid features = block means mixed to c channels."""
  h, w, d = image.shape
  hp, wp = -(-h // patch), -(-w // patch)
  padded = np.pad(image, ((0, hp * patch - h), (0, wp * patch - w), (0, 0)), mode='edge')
  blocks = padded.reshape(hp, patch, wp, patch, d).mean(axis=(1, 3))
  base = np.stack([blocks, blocks ** 2, np.sin(4 * blocks)], -1)
  feat = np.transpose(base @ np.random.default_rng(seed).normal(size=(3, c)), (2, 0, 1, 3))
  geo = patches.patch_geometry([0, 0], [1, 1], patch)
  return {k: jnp.asarray(v) for k, v in
          patches.model_inputs(image, feat, geo, batch=True).items()}


@pytest.mark.slow
@pytest.mark.parametrize('shape,factors', [((32, 32, 8), (2, 2, 1)), ((33, 27, 15), (2, 2, 2))])
def test_output_shapes(shape, factors):
  cfg = M.FMIRConfig(feature_channels=4, n=4, levels=5, factors=factors, integration_steps=2)
  net = M.FMIR(cfg, rngs=nnx.Rngs(0))
  img = np.random.default_rng(0).random(shape).astype(np.float32)
  graphdef, params = nnx.split(net)
  # Abstract evaluation: traces the whole network (every shape check) without compiling.
  out = jax.eval_shape(lambda p, a, b: nnx.merge(graphdef, p)(a, b), params,
                       _inputs(img, 4, 4, 0), _inputs(img[::-1].copy(), 4, 4, 0))
  expected = pyramid.pyramid_shapes(shape, factors, 5)
  assert out.disp.shape == (1, *shape, 3)
  assert [v.shape[1:4] for v in out.v_levels] == list(expected)
  assert [u.shape[1:4] for u in out.u_levels] == list(expected)
  assert expected[-1] == ((2, 2, 8) if factors == (2, 2, 1) else (3, 2, 1))


@pytest.mark.slow
def test_optimisation_on_a_known_deformation_raises_dice():
  shape = (32, 32, 6)
  yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing='ij')
  disk = ((yy - 15.5) ** 2 + (xx - 15.5) ** 2 < 8.0 ** 2)
  fixed_lab = np.repeat(disk[..., None], shape[2], axis=2).astype(np.int32)
  # Moving = fixed under a known smooth deformation (a radial expansion by ~2 voxels):
  # moving(x) = fixed(x - 0.25 (x - c)), so warping moving back needs u(x) ≈ -0.2 (x - c).
  c = np.array([15.5, 15.5])
  coords = np.stack([yy, xx]).astype(float)
  src = coords - 0.25 * (coords - c[:, None, None]) / 1.0
  moving_lab = np.stack([ndimage.map_coordinates(fixed_lab[..., k].astype(float), src, order=0)
                         for k in range(shape[2])], -1).astype(np.int32)
  smooth = lambda lab: ndimage.gaussian_filter(lab.astype(np.float32), (1.5, 1.5, 0))
  fixed_img, moving_img = smooth(fixed_lab), smooth(moving_lab)
  fixed, moving = _inputs(fixed_img, 4, 4, 1), _inputs(moving_img, 4, 4, 1)

  cfg = M.FMIRConfig(feature_channels=4, n=8, levels=3, integration_steps=4, kernel_init='he')
  graphdef, params = nnx.split(M.FMIR(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  spec = step_lib.LossSpec(windows=(9, 5, 3), smooth=0.1)
  tx = optax.adam(3e-3)

  def loss_fn(p):
    out = nnx.merge(graphdef, p)(moving, fixed)
    return step_lib.registration_loss(out, moving, fixed, spec)[0], out.disp

  @jax.jit
  def step(p, o):
    (loss, disp), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    u, o = tx.update(g, o, p)
    return optax.apply_updates(p, u), o, loss, disp

  def dice(disp):
    # Oracle: scipy nearest-neighbour warp of the moving labels at x + u(x).
    warped = oracles.warp_nearest(moving_lab, np.asarray(disp[0]))
    return 2 * np.sum((warped == 1) & (fixed_lab == 1)) / (np.sum(warped == 1) + fixed_lab.sum())

  opt = tx.init(params)
  losses, dices = [], []
  for _ in range(30):
    params, opt, loss, disp = step(params, opt)
    losses.append(float(loss))
    dices.append(dice(disp))
  assert np.mean(losses[-5:]) < np.mean(losses[:3]) - 0.05, losses
  assert dices[-1] > dices[0] + 0.05, (dices[0], dices[-1])


def _random_pair(rng, shape):
  """Random (moving, fixed) model inputs on a (H, W, D) grid: 5-channel 4x3 patch grids."""
  h, w, d = shape

  def vol():
    return {'image': jnp.asarray(rng.random((1, h, w, d)), jnp.float32),
            'feat': jnp.asarray(rng.normal(size=(1, d, 4, 3, 5)), jnp.float32),
            'interp_h': jnp.asarray(rng.random((1, h, 4)), jnp.float32),
            'interp_w': jnp.asarray(rng.random((1, w, 3)), jnp.float32)}

  return vol(), vol()


@pytest.mark.slow
@pytest.mark.parametrize('shape,rows', [((13, 11, 6), 4), ((9, 8, 4), 2), ((16, 12, 5), 1)])
def test_slab_wise_inference_equals_whole_volume(shape, rows):
  """Slab mode (compressor + level-0 head over row slabs with a 3-row halo, each slab
  warping its own rows) reproduces the whole-volume forward pass (float32 rounding only;
  a missing halo row changes the field by O(0.1))."""
  cfg = M.FMIRConfig(feature_channels=5, n=4, levels=2, integration_steps=2, kernel_init='he')
  model = M.FMIR(cfg, rngs=nnx.Rngs(1))
  moving, fixed = _random_pair(np.random.default_rng(sum(shape)), shape)
  graphdef, params = nnx.split(model)
  whole = jax.jit(lambda p, a, b: nnx.merge(graphdef, p)(a, b).disp)(params, moving, fixed)
  slabs = jax.jit(lambda p, a, b: S.forward_in_slabs(nnx.merge(graphdef, p), a, b,
                                                     rows=rows).disp)(params, moving, fixed)
  assert float(jnp.abs(whole).max()) > 0.1
  np.testing.assert_allclose(slabs, whole, rtol=0, atol=2e-6)


def test_auto_slab_rows():
  assert S.auto_slab_rows((128, 128, 16), 1, 32) is None          # ACDC: whole volume
  rows = S.auto_slab_rows((192, 160, 256), 1, 32)                  # full abdomen: slabs
  assert rows is not None and 8 <= rows < 192
  assert (rows + 2 * S.SLAB_HALO) * 160 * 256 * 64 * 4 <= S.SLAB_BUDGET_BYTES


@pytest.mark.slow
def test_small_flow_init_starts_near_identity_whatever_the_input_scale():
  # VoxelMorph's N(0, 1e-5) field layer: the untrained head predicts a near-zero field even
  # for inputs 10x larger than the image; PyTorch's default init does not (voxels).
  img = np.random.default_rng(1).random((16, 16, 8)).astype(np.float32)
  mov, fix = _inputs(img, 4, 4, 0), _inputs(img[::-1].copy(), 4, 4, 1)
  mov['feat'], fix['feat'] = 10 * mov['feat'], 10 * fix['feat']
  peak = {}
  for init in ('torch', 'small'):
    cfg = M.FMIRConfig(feature_channels=4, n=4, levels=2, integration_steps=2,
                       kernel_init='he', flow_init=init)
    net = M.FMIR(cfg, rngs=nnx.Rngs(0))
    peak[init] = float(jnp.abs(net(mov, fix).disp).max())
    assert float(jnp.abs(net.blocks[0].flow.bias.get_value()).max()) == 0.0
  assert peak['small'] < 1e-2 < peak['torch'], peak
  # 'torch' is the layer it always was: same draws from the same seed as a plain conv
  same = M.FMIR(M.FMIRConfig(feature_channels=4, n=4, levels=2), rngs=nnx.Rngs(3))
  k = same.blocks[1].flow.kernel.get_value()
  assert k.shape == (3, 3, 3, 27, 3) and float(jnp.abs(k).max()) <= (1 / (27 * 27)) ** 0.5 + 1e-6
  with pytest.raises(ValueError, match='flow init'):
    M.FMIR(M.FMIRConfig(feature_channels=4, n=4, levels=2, flow_init='zero'), rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_head_stopping_at_level_1_upsamples_that_levels_field():
  """finest=1 (fmir register --head-finest-level 1): the coarse levels are those of the full
  pass, and the output is the level-1 field upsampled to level 0 (scipy oracle: linear
  interpolation with aligned corners, components scaled by the pyramid factors)."""
  cfg = M.FMIRConfig(feature_channels=5, n=4, levels=3, factors=(2, 2, 1), integration_steps=2,
                     kernel_init='he')
  model = M.FMIR(cfg, rngs=nnx.Rngs(2))
  h, w, d = 16, 12, 5
  moving, fixed = _random_pair(np.random.default_rng(5), (h, w, d))
  run = nnx.jit(lambda m, a, b, finest: m(a, b, finest=finest), static_argnums=3)
  full = run(model, moving, fixed, 0)
  fast = run(model, moving, fixed, 1)
  np.testing.assert_array_equal(fast.u_levels[1], full.u_levels[1])
  assert fast.v_levels[0] is None and fast.u_levels[0] is None
  u1 = np.asarray(full.u_levels[1][0], np.float64)                   # (8, 6, 5, 3)
  assert float(np.abs(u1).max()) > 0.05
  want = oracles.resize(u1, (h, w, d), backend='scipy') * np.array([2, 2, 1])
  np.testing.assert_allclose(fast.disp[0], want, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match='finest level 3'):
    model(moving, fixed, finest=3)
  slab = nnx.jit(lambda m, a, b: S.forward_in_slabs(m, a, b, rows=4, finest=1).disp)(
      model, moving, fixed)
  np.testing.assert_allclose(slab, fast.disp, rtol=0, atol=2e-6)


def test_inputs_at_a_coarser_grid_are_the_resized_level0_volumes():
  """inputs_at: the image and the upsampled features on a coarser grid equal scipy's
  align-corners linear resize of the level-0 image and upsampled feature volume."""
  from fmir_jax.ops import upsample
  moving, _ = _random_pair(np.random.default_rng(3), (16, 12, 6))
  coarse = M.inputs_at(moving, (8, 6, 3))
  full_feat = np.asarray(upsample.upsample_features(moving['feat'], moving['interp_h'],
                                                    moving['interp_w'])[0], np.float64)
  got = upsample.upsample_features(coarse['feat'], coarse['interp_h'], coarse['interp_w'])
  np.testing.assert_allclose(got[0], oracles.resize(full_feat, (8, 6, 3), backend='scipy'),
                             rtol=0, atol=1e-5)
  image = np.asarray(moving['image'][0], np.float64)[..., None]
  np.testing.assert_allclose(coarse['image'][0],
                             oracles.resize(image, (8, 6, 3), backend='scipy')[..., 0],
                             rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_head_trained_from_level_1_has_no_level0_arithmetic_and_upsamples_its_field():
  """finest_level=1: the compressor runs on the level-1 grid (its parameters are those of a
  level-0 compressor applied to inputs_at), the output is the level-1 field upsampled
  (scipy oracle), level 0 carries that field and a zero residual for the loss, and the
  training loss has finite gradients for every block but level 0's."""
  cfg = M.FMIRConfig(feature_channels=5, n=4, levels=3, factors=(2, 2, 1), integration_steps=2,
                     kernel_init='he', finest_level=1)
  model = M.FMIR(cfg, rngs=nnx.Rngs(2))
  h, w, d = 16, 12, 5
  moving, fixed = _random_pair(np.random.default_rng(5), (h, w, d))
  out = nnx.jit(lambda m, a, b: m(a, b))(model, moving, fixed)
  _, shapes = model.plan(moving['image'].shape)
  both = {k: jnp.concatenate([moving[k], fixed[k]], 0) for k in M.INPUT_KEYS}
  f1 = model.encode(*(M.inputs_at(both, shapes[1])[k] for k in M.INPUT_KEYS))
  assert f1.shape[1:4] == shapes[1]
  u1 = np.asarray(out.u_levels[1][0], np.float64)
  ref = model.level_loop([None, (f1[:1], f1[1:])] + [
      tuple(M.W.resize(f, s) for f in (f1[:1], f1[1:])) for s in shapes[2:]],
      shapes, model.plan(moving['image'].shape)[0], finest=1)
  np.testing.assert_allclose(u1, ref.u_levels[1][0], rtol=0, atol=1e-5)
  want = oracles.resize(u1, (h, w, d), backend='scipy') * np.array([2, 2, 1])
  np.testing.assert_allclose(out.disp[0], want, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(out.u_levels[0], out.disp)
  assert float(jnp.abs(out.v_levels[0]).max()) == 0.0 and out.v_levels[0].shape[1:4] == (h, w, d)
  spec = step_lib.LossSpec(ncc=1.0, smooth=1.0, windows=(5, 3, 3))

  def loss(params):
    m = nnx.merge(nnx.graphdef(model), params)
    return step_lib.registration_loss(m(moving, fixed), moving, fixed, spec)[0]

  grads = jax.grad(loss)(nnx.state(model, nnx.Param))
  norms = {k: float(optax.tree.norm(v)) for k, v in grads['blocks'].items()}
  assert np.isfinite(float(loss(nnx.state(model, nnx.Param))))
  assert norms[0] == 0.0 and all(norms[i] > 0 for i in (1, 2)), norms
