"""Where the head's time goes: each piece of one forward pass, jit-compiled on its own.

Loads a run (default: the shipped general head), encodes one pair of a register-benchmark
set with the run's encoder, and times the pieces of ``inference.make_predict``'s forward in
the order it runs them: channel regularisation (PCA), the compressor on both volumes at
level 0, the feature pyramid, then per level the warp of the moving features, the level
block, the integration (scaling and squaring) and the composition with the upsampled field
so far, and the field's upsampling to the next finer level. Each row: median seconds over
``--repeats`` runs, its share of the sum, and the multiply-adds of its convolutions. The
whole forward (as ``fmir register`` runs it) is timed beside, at finest level 0 and 1.

  python bench/head_profile.py                      # abdomen-like 80x96x80, shipped head
  python bench/head_profile.py --set cardiac --repeats 5
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from feature_extract.synthetic import phantom_pairs
from fmir_jax.core import nifti
from fmir_jax.model import inference
from fmir_jax.model import network as M
from fmir_jax.model.channel_reg import regularise_channels
from fmir_jax.ops import warp as W
from fmir_jax.register import encode as encode_lib
from fmir_jax.register.registrar import Registrar, RegisterOptions


def timed(fn, *args, repeats: int) -> tuple[float, object]:
  """(median seconds over ``repeats`` calls after one compiling call, the output)."""
  out = jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)), out


def conv_macs(module, voxels: int, batch: int = 1) -> float:
  """Multiply-adds of a module's 3x3x3 convolutions over ``voxels`` (x batch)."""
  total = 0
  for _, value in nnx.iter_graph(module):
    if isinstance(value, nnx.Conv):
      k = value.kernel.get_value().shape
      total += int(np.prod(k))
  return float(total) * voxels * batch


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  names = [s.name for s in phantom_pairs.set_specs(False)]
  p.add_argument('--set', default='abdomen', choices=names)
  p.add_argument('--checkpoint', default=None, help='default: the shipped general head')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--smoke', action='store_true', help="the smoke sets' tiny sizes")
  p.add_argument('--out', default='bench_results/head_profile')
  a = p.parse_args(argv)
  spec = {s.name: s for s in phantom_pairs.set_specs(a.smoke)}[a.set]
  (pair,) = phantom_pairs.write_set(spec, 1, 0, os.path.join(a.out, 'data'), lambda s: None)
  reg = Registrar(a.checkpoint, RegisterOptions(linear='none', grid='native'))
  images = {k: np.asarray(nifti.load_nifti(getattr(pair, k))[0], np.float32)
            for k in ('moving', 'fixed')}
  images = {k: (v - v.min()) / max(float(v.max() - v.min()), 1e-6) for k, v in images.items()}
  enc = encode_lib.encoding_for(images['fixed'].shape[:2], reg.header, reg.train_slice,
                                reg.backbone.required_input_size, reg.backbone.patch_size)
  t0 = time.perf_counter()
  inputs = {k: {n: jnp.asarray(x) for n, x in
                encode_lib.encode(v, reg.backbone, enc, 16).items()}
            for k, v in images.items()}
  encoder_s = (time.perf_counter() - t0) / 2
  run = reg.run
  model = nnx.merge(run.graphdef, run.params)
  cfg = model.cfg
  factors = reg.factors_for(spec.spacing_mm)
  fac, shapes = model.plan(inputs['fixed']['image'].shape, factors)
  c_prime = cfg.feature_channels
  rows = []

  def add(name, fn, *args, macs=0.0):
    s, out = timed(jax.jit(fn), *args, repeats=a.repeats)
    rows.append((name, s, macs))
    return out

  mv, fx = inputs['moving'], inputs['fixed']
  pca = reg.pca
  fm, ff = add('channel regularisation (PCA)', lambda m, f, b: regularise_channels(
      m, f, key=None, c_prime=c_prime, random_selection=False, pca=b),
      mv['feat'], fx['feat'], pca)
  both = {k: jnp.concatenate([dict(mv, feat=fm)[k], dict(fx, feat=ff)[k]], axis=0)
          for k in ('image', 'feat', 'interp_h', 'interp_w')}
  start = cfg.finest_level           # a head trained without the finer levels starts here
  if start:
    both = add(f'inputs on the level-{start} grid', lambda b: M.inputs_at(b, shapes[start]),
               both)
  vox_start = int(np.prod(shapes[start]))
  f0 = add(f'compressor, level {start}, both volumes',
           lambda i, f, h, w: model.encode(i, f, h, w),
           both['image'], both['feat'], both['interp_h'], both['interp_w'],
           macs=conv_macs(model.compressor, vox_start, 2))
  pyr = [None] * start + add('feature pyramid', lambda f: model.feature_pyramid(
      f[:1], f[1:], shapes[start:]), f0)
  u_up = None
  for i in reversed(range(start, cfg.levels)):
    vox = int(np.prod(shapes[i]))
    x, y = pyr[i]
    if u_up is not None:
      x = add(f'level {i}: warp moving features', W.warp, x, u_up)
    v = add(f'level {i}: block {shapes[i]}', lambda x, y, i=i: model.blocks[i](x, y), x, y,
            macs=conv_macs(model.blocks[i], vox))
    u = add(f'level {i}: integrate ({cfg.integration_steps} squarings)',
            lambda v: W.integrate(v, cfg.integration_steps), v)
    if u_up is not None:
      u = add(f'level {i}: compose', W.compose, u_up, u)
    if i > 0:
      u_up = add(f'level {i}: upsample field', lambda u, i=i: W.resize_field(
          u, shapes[i - 1], fac[i - 1]), u)
  for j in range(start - 1, 0, -1):                 # the finer levels: the field upsampled
    u_up = add(f'level {j}: upsample field', lambda u, j=j: W.resize_field(
        u, shapes[j - 1], fac[j - 1]), u_up)
  u = u if start == 0 else u_up
  whole, disp = {}, {}
  for finest in (0, 1):
    predict = inference.make_predict(run.graphdef, c_prime=c_prime, factors=factors,
                                     finest_level=finest)
    whole[finest], disp[finest] = timed(predict, run.params, mv, fx, pca, repeats=a.repeats)
  # the pieces are the forward: their field is the whole forward's (float rounding)
  pieces_error = float(jnp.max(jnp.abs(u - disp[0])))
  total = sum(r[1] for r in rows)
  print(f'{a.set} {spec.shape} at {spec.spacing_mm} mm; head n={cfg.n}, {cfg.levels} levels, '
        f"c'={c_prime}; median of {a.repeats}, jax {jax.__version__} on "
        f'{jax.devices()[0].platform} ({os.cpu_count()} CPUs)')
  print('| piece | s | share | GMAC | GMAC/s |\n|---|---:|---:|---:|---:|')
  for name, s, macs in rows:
    rate = f'{macs / 1e9 / s:.1f}' if macs else ''
    print(f'| {name} | {s:.3f} | {100 * s / total:.0f} % | '
          f'{macs / 1e9:.2f} | {rate} |' if macs else
          f'| {name} | {s:.3f} | {100 * s / total:.0f} % | | |')
  level0 = sum(s for n, s, _ in rows
               if n.startswith('level 0') or n.startswith('compressor, level 0'))
  print(f'| sum of pieces | {total:.3f} | | | |')
  share = (f'level-0 pieces (compressor + level 0) {level0:.3f} s = '
           f'{100 * level0 / total:.0f} % of the pieces; ' if start == 0 else
           f'no level-0 pieces (the head starts at level {start}); ')
  print(f'whole forward: {whole[0]:.3f} s (finest level 0), {whole[1]:.3f} s (finest level 1); '
        f'{share}encoder {encoder_s:.3f} s per volume; pieces vs whole forward: '
        f'{pieces_error:.1e} voxels')
  print(json.dumps({'set': a.set, 'shape': list(spec.shape), 'levels': cfg.levels,
                    'finest_level': start, 'level_shapes': [list(x) for x in shapes],
                    'n': cfg.n, 'feature_channels': c_prime, 'rows': [{'piece': n, 's': s, 'macs': m} for n, s, m in rows],
                    'whole_s': {'finest0': whole[0], 'finest1': whole[1]},
                    'encoder_s_per_volume': encoder_s, 'pieces_error_vox': pieces_error}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
