"""FMIR head benchmarks: JAX (exact and straightforward feature paths) against an eager
PyTorch implementation of the authors' architecture, same machine, same thread count.

  python bench/run.py --suite cpu            # ACDC + abdomen half size + full-size inference
                                             # (about 6 min on 2 shared cores)
  python bench/run.py --suite gpu            # same on a GPU + end-to-end ACDC pair (K=512)
  python bench/run.py --suite smoke          # tiny sizes, seconds (the test suite runs this)

Each (framework, feature path, size) runs in its own subprocess so that its peak host memory
(ru_maxrss) is its own; all of them get the same thread count (torch.set_num_threads and
XLA's CPU thread pool). Per task: inference seconds per pair (one direction, PCA projection
included), train step seconds (channel draw, forward, multi-level NCC + diffusion, backward,
global-norm clip, AMSGrad as the default config), compile seconds (lower + compile, i.e. the
first call's extra cost), XLA cost-analysis FLOPs and achieved FLOP/s, XLA buffer-assignment
bytes, peak host memory, and device memory on GPU. Also: feature extraction slices/s
(bench/extract.py) and feature-store read rate (pairs/s) against the train-step rate.

Prints a table and writes JSON (``--json``, default bench_results/<suite>.json).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench import common  # pylint: disable=g-import-not-at-top  (numpy only)

# Per suite: sizes, timed repeats per size, extraction case, whether to run the full-size
# abdomen inference (else: compile it and report XLA's buffer assignment only).
SUITES = {
    # Smoke: LLVM optimisation off (compile ~40% faster; its timings mean nothing anyway).
    'smoke': {'cases': ('smoke',), 'repeats': {'smoke': 2}, 'extract': 'quick',
              'full_size': None, 'end_to_end': False,
              'xla_flags': '--xla_backend_optimization_level=0', 'parallel': True},
    # cpu (under 10 min on 2 cores): one timed call per measurement after the AOT compile
    # (no warm-up call). Abdomen half size: inference timed for all three; the JAX train
    # step compiled only (compile time, FLOPs, XLA buffers: the 8 GB memory target).
    'cpu': {'cases': ('acdc', 'abdomen_half'), 'repeats': {'acdc': 1, 'abdomen_half': 1},
            'warmup': 0,
            'extra': {('abdomen_half', 'jax_exact'): ('--train-compile-only',),
                      ('abdomen_half', 'jax_straight'): ('--infer-only',),
                      ('abdomen_half', 'torch'): ('--infer-only',)},
            'extract': 'dinov3-256', 'full_size': 'run', 'end_to_end': False},
    'gpu': {'cases': ('acdc', 'abdomen_half'), 'repeats': {'acdc': 10, 'abdomen_half': 5},
            'extract': 'dinov3-512', 'full_size': 'run', 'end_to_end': True},
}
IMPLS = ('jax_exact', 'jax_straight', 'torch')


# ============================================================================ worker: JAX


def _jax_setup(case: common.Case, exact: bool):
  import jax  # pylint: disable=g-import-not-at-top
  from configs import common as config_common  # pylint: disable=g-import-not-at-top
  from fmir_jax.train import step as step_lib  # pylint: disable=g-import-not-at-top
  from fmir_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  cfg = config_common.base_config()
  cfg.feature_channels = case.c_prime
  cfg.model.n = case.n
  cfg.model.levels = case.levels
  cfg.model.factors = case.factors
  cfg.model.integration_steps = case.steps
  cfg.model.exact_feature_path = exact
  cfg.loss.ncc_windows = cfg.loss.ncc_windows[:case.levels]   # losses.NCC_WINDOWS, per level
  cfg.loss.blur_in_plane_only = case.factors[2] == 1
  graphdef, state, tx, _ = state_lib.create(cfg, case.channels, 10_000)
  return jax, step_lib, cfg, graphdef, state, tx


def _compiled_stats(lowered, t_lower: float) -> tuple[object, dict]:
  """Compiles a lowered program; returns (compiled, stats with times, FLOPs and bytes)."""
  t0 = time.perf_counter()
  compiled = lowered.compile()
  stats = {'lower_s': t_lower, 'compile_s': t_lower + time.perf_counter() - t0}
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  stats['flops'] = float(cost.get('flops', float('nan'))) if cost else float('nan')
  mem = compiled.memory_analysis()
  if mem is not None:
    stats['xla_bytes'] = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                             + mem.temp_size_in_bytes - mem.alias_size_in_bytes)
  return compiled, stats


def _device_peak(jax) -> int | None:
  stats = jax.devices()[0].memory_stats()
  return int(stats['peak_bytes_in_use']) if stats and 'peak_bytes_in_use' in stats else None


def jax_task(case: common.Case, exact: bool, *, infer: bool, train: bool, repeats: int,
             warmup: int, run: bool = True, run_train: bool = True) -> dict:
  """Inference and/or train step of the JAX model; see the module docstring."""
  jax, step_lib, cfg, graphdef, state, tx = _jax_setup(case, exact)
  from fmir_jax.model import inference  # pylint: disable=g-import-not-at-top
  from fmir_jax.train import distributed  # pylint: disable=g-import-not-at-top
  batch = common.pair_batch(case)
  out: dict = {}
  if infer:
    predict = inference.make_predict(graphdef, c_prime=case.c_prime)
    moving = inference.model_inputs(batch['moving'])
    fixed = inference.model_inputs(batch['fixed'])
    pca = common.pca_basis(case)
    args = jax.device_put((state.params, moving, fixed, pca))
    del moving, fixed
    if not train:
      del batch     # host copies: only the device arrays count against the memory target
    t0 = time.perf_counter()
    lowered = predict.lower(*args)
    compiled, stats = _compiled_stats(lowered, time.perf_counter() - t0)
    if run:
      stats.update(common.time_calls(lambda: compiled(*args).block_until_ready(), warmup=warmup,
                                     repeats=repeats))
      stats['flop_per_s'] = stats['flops'] / stats['median_s']
    stats['peak_host_bytes'] = common.peak_rss_bytes()
    stats['peak_device_bytes'] = _device_peak(jax)
    out['infer'] = stats
  if train:
    spec = step_lib.LossSpec.from_config(cfg, 'UN', num_classes=3)
    mesh = distributed.make_mesh(jax.devices()[:1])
    step = step_lib.make_train_step(graphdef, tx, spec, c_prime=case.c_prime, mode='UN',
                                     mesh=mesh)
    b = step_lib.shard_batch(batch, mesh)
    t0 = time.perf_counter()
    lowered = step.lower(state, b, None)
    compiled, stats = _compiled_stats(lowered, time.perf_counter() - t0)
    holder = {'state': state}
    if not (run and run_train):
      stats['peak_host_bytes'] = common.peak_rss_bytes()
      out['train'] = stats
      return out

    def one():
      new, metrics, _ = compiled(holder['state'], b, None)
      holder['state'] = new
      metrics['loss'].block_until_ready()
      holder['loss'] = float(metrics['loss'])

    stats.update(common.time_calls(one, warmup=warmup, repeats=repeats))
    stats['flop_per_s'] = stats['flops'] / stats['median_s']
    stats['loss'] = holder['loss']
    stats['peak_host_bytes'] = common.peak_rss_bytes()
    stats['peak_device_bytes'] = _device_peak(jax)
    out['train'] = stats
  return out


# ========================================================================== worker: torch


def torch_task(case: common.Case, *, infer: bool, train: bool, repeats: int, warmup: int,
               threads: int) -> dict:
  """Eager PyTorch reference (straightforward path), same sizes and thread count."""
  import torch  # pylint: disable=g-import-not-at-top
  from bench import torch_fmir  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  torch.manual_seed(0)
  model = torch_fmir.TorchFMIR(case.c_prime, case.n, case.levels, case.factors,
                               case.steps).to(dev)
  batch = common.pair_batch(case)
  moving = torch_fmir.to_torch(batch['moving'], dev)
  fixed = torch_fmir.to_torch(batch['fixed'], dev)

  def sync():
    if dev == 'cuda':
      torch.cuda.synchronize()

  out: dict = {}
  if infer:
    pca = {k: torch.as_tensor(v, device=dev) for k, v in common.pca_basis(case).items()}

    def predict():
      with torch.no_grad():
        mv = dict(moving, feat=(moving['feat'] - pca['mean']) @ pca['components'])
        fx = dict(fixed, feat=(fixed['feat'] - pca['mean']) @ pca['components'])
        model(mv, fx)
      sync()

    stats = common.time_calls(predict, warmup=warmup, repeats=repeats)
    stats['peak_host_bytes'] = common.peak_rss_bytes()
    stats['peak_device_bytes'] = (int(torch.cuda.max_memory_allocated()) if dev == 'cuda'
                                  else None)
    out['infer'] = stats
  if train:
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, amsgrad=True)
    gen = torch.Generator().manual_seed(0)
    blur_in_plane = case.factors[2] == 1
    holder = {}

    def step():
      holder['loss'] = torch_fmir.train_step(
          model, opt, moving, fixed, c_prime=case.c_prime, generator=gen,
          # mirrors losses.NCC_WINDOWS: importing it would load jax into this measured process
          windows=(9, 5, 3, 3, 3)[:case.levels], in_plane_only=blur_in_plane)
      sync()

    stats = common.time_calls(step, warmup=warmup, repeats=repeats)
    stats['loss'] = holder['loss']
    stats['peak_host_bytes'] = common.peak_rss_bytes()
    stats['peak_device_bytes'] = (int(torch.cuda.max_memory_allocated()) if dev == 'cuda'
                                  else None)
    out['train'] = stats
  return out


# ================================================================= worker: data and features


def store_task(case: common.Case, steps: int) -> dict:
  """Feature-store read rate: a synthetic store of `case` (c float16 features), read by
  ``fmir_jax.train.data.train_batches`` (Grain, threads, prefetch) as training does."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from feature_extract.datasets.base import Volume  # pylint: disable=g-import-not-at-top
  from fmir_jax.train import data as data_lib  # pylint: disable=g-import-not-at-top
  from fmir_jax.core import store as store_lib  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  subjects = 4
  keys = [f's{s}_{f}' for s in range(subjects) for f in ('ed', 'es')]
  pairs = {'train': [[f's{s}_ed', f's{s}_es'] for s in range(subjects)]
           + [[f's{s}_es', f's{s}_ed'] for s in range(subjects)]}
  header = {'backbone': {'name': 'synthetic', 'weights_sha256': 'none'}, 'layer': 0,
            'input_size': 256, 'resize': 'upsample', 'normalisation': {'mean': 0, 'std': 1},
            'feature_dtype': 'float16', 'channels': case.channels,
            'patch_size': case.patch_size, 'dataset': {'name': 'synthetic'}, 'num_classes': 3}
  geo = common.geometry_of(case)
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'features')
    writer = store_lib.StoreWriter(path, header, keys=keys, pairs=pairs, volumes_per_shard=4)
    for key in keys:
      item = common.volume(case, rng)
      vol = Volume(key=key, dataset='synthetic', subject=key[:2], frame=key[3:],
                   split='train', image=item['image'], labels=None,
                   spacing_mm=(1.0, 1.0, 1.0), affine=np.eye(4), meta={})
      writer.add(vol, item['feat'], geo, seconds=0.0)
    writer.close()
    stores = [store_lib.FeatureStore(path, verify=False)]   # steady-state reads (hash once)
    it = data_lib.train_batches(stores, batch_size=1, seed=0, start_step=0,
                                num_steps=steps + 2, prefetch=2)
    next(it)                                                    # threads started
    t0 = time.perf_counter()
    n = 0
    for batch in it:
      n += batch['moving']['image'].shape[0]
    seconds = time.perf_counter() - t0
    feat_mb = batch['moving']['feat'].nbytes * 2 / 1e6
  return {'pairs_per_s': n / seconds, 'pairs': n, 'seconds': seconds, 'pair_mb': feat_mb}


def extract_task(which: str, threads: int) -> dict:
  """Feature-extraction slices/s through bench/extract.py (random weights, real config)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from bench import extract  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  quick = which == 'quick'
  k = 64 if quick else int(which.split('-')[1])
  cuda = torch.cuda.is_available()
  n_slices = 16 if cuda else 4
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, 'dinov3')
    transformers.DINOv3ViTModel(extract.dinov3_config(quick)).save_pretrained(model_dir)
    rate = extract._time_case(model_dir, 'dinov3', k, 'last', 'float32', 'auto',  # pylint: disable=protected-access
                              n_slices, 8 if cuda else 4, 1)
  return {'backbone': 'dinov3-vitb16' if not quick else 'dinov3-tiny', 'K': k,
          'dtype': 'float32', 'slices_per_s': rate}


def end_to_end_task(threads: int, quick: bool = False) -> dict:
  """GPU suite: seconds per ACDC pair, both directions, DINOv3 ViT-B/16 features at K=512
  for both volumes (random weights), PCA projection, JAX head (exact path). ``quick``: tiny
  DINOv3 at K=64 on the smoke size (checks the code path in seconds)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from bench import extract  # pylint: disable=g-import-not-at-top
  from feature_extract import backbones  # pylint: disable=g-import-not-at-top
  from feature_extract import pipeline  # pylint: disable=g-import-not-at-top
  from fmir_jax.core import patches  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  transformers.utils.logging.disable_progress_bar()
  torch.manual_seed(0)
  dino_cfg = extract.dinov3_config(quick)
  case = dataclasses.replace(common.SMOKE if quick else common.ACDC,
                             channels=dino_cfg.hidden_size)
  k = 64 if quick else 512
  jax, step_lib, _, graphdef, state, _ = _jax_setup(case, True)
  from fmir_jax.model import inference  # pylint: disable=g-import-not-at-top
  predict = inference.make_predict(graphdef, c_prime=case.c_prime)
  pca = jax.device_put(common.pca_basis(case))
  rng = np.random.default_rng(0)
  images = [common.volume(case, rng)['image'] for _ in range(2)]
  with tempfile.TemporaryDirectory() as tmp:
    model_dir = os.path.join(tmp, 'dinov3')
    transformers.DINOv3ViTModel(dino_cfg).save_pretrained(model_dir)
    bb = backbones.load('dinov3', model_dir, 'last', device='auto', dtype='float32')

    def pair():
      vols = []
      for img in images:
        feat, geo = pipeline.encode_volume(img, bb, input_size=k, resize='upsample',
                                         pad_to=None, batch_size=16)
        vols.append(dict(patches.model_inputs(img, np.asarray(feat), geo, batch=True)))
      d1 = predict(state.params, vols[0], vols[1], pca)
      d2 = predict(state.params, vols[1], vols[0], pca)
      jax.block_until_ready((d1, d2))

    stats = common.time_calls(pair, warmup=1, repeats=3)
  return {'seconds_per_pair_both_directions': stats['median_s'], 'K': k,
          'backbone': 'dinov3-tiny' if quick else 'dinov3-vitb16', **stats}


# ============================================================================= orchestration


def _worker(args) -> dict:
  case = common.CASES.get(args.case)
  if args.task in ('jax_exact', 'jax_straight'):
    return jax_task(case, args.task == 'jax_exact', infer=not args.train_only,
                    train=not args.infer_only,
                    repeats=args.repeats, warmup=args.warmup, run=not args.compile_only,
                    run_train=not args.train_compile_only)
  if args.task == 'torch':
    return torch_task(case, infer=not args.train_only, train=not args.infer_only,
                      repeats=args.repeats, warmup=args.warmup, threads=args.threads)
  if args.task == 'store':
    return store_task(case, args.repeats)
  if args.task == 'extract':
    return extract_task(args.case, args.threads)
  if args.task == 'end_to_end':
    return end_to_end_task(args.threads, quick=args.case == 'smoke')
  raise ValueError(f'unknown --task {args.task!r}')


def _thread_env(threads: int, xla_flags: str = '') -> dict:
  env = dict(os.environ)
  flags = env.get('XLA_FLAGS', '') + ' ' + xla_flags
  if threads == 1:
    flags += ' --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'
  env['XLA_FLAGS'] = flags.strip()
  for var in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'OPENBLAS_NUM_THREADS'):
    env[var] = str(threads)
  env['PYTHONPATH'] = ROOT + os.pathsep + env.get('PYTHONPATH', '')
  return env


def _spawn(task: str, case: str, *, threads: int, repeats: int, timeout: float, warmup: int,
           parts_dir: str, extra: tuple = (), xla_flags: str = '') -> dict:
  """Runs one task in a fresh interpreter; returns its JSON result (or an 'error'), which is
  also written to ``parts_dir`` (partial results survive a killed run)."""
  with tempfile.NamedTemporaryFile('r', suffix='.json') as f:
    cmd = [sys.executable, os.path.abspath(__file__), '--task', task, '--case', case,
           '--threads', str(threads), '--repeats', str(repeats), '--warmup', str(warmup),
           '--out', f.name, *extra]
    t0 = time.perf_counter()
    try:
      r = subprocess.run(cmd, env=_thread_env(threads, xla_flags), capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT, check=False)
    except subprocess.TimeoutExpired:
      return {'error': f'timed out after {timeout:.0f} s'}
    wall = time.perf_counter() - t0
    if r.returncode != 0:
      return {'error': f'exit {r.returncode}: {r.stderr.strip()[-2000:]}'}
    res = json.load(f)
  res['task_wall_s'] = wall
  with open(os.path.join(parts_dir, f'{task}_{case}.json'), 'w', encoding='utf-8') as f:
    json.dump(res, f)
  return res


def _fmt(x, spec='.3f', unit=''):
  if x is None or (isinstance(x, float) and x != x):
    return '-'
  return f'{x:{spec}}{unit}'


def _ratio(a, b):
  return None if not a or not b else a / b


def summarise(res: dict) -> list[str]:
  """Table lines: per size, per impl, infer / train seconds, compile, memory, FLOP/s."""
  lines = []
  hdr = (f'{"size":<13} {"impl":<13} {"infer s":>8} {"train s":>8} {"compile inf":>11} '
         f'{"compile trn":>11} {"peak host":>9} {"dev peak":>8} {"GFLOP inf":>9} '
         f'{"GFLOP/s inf":>11} {"GFLOP/s trn":>11} {"XLA inf":>8} {"XLA trn":>8}')
  lines.append(hdr)
  lines.append('-' * len(hdr))
  for case, per in res['cases'].items():
    for impl in IMPLS:
      r = per.get(impl, {})
      if 'error' in r:
        lines.append(f'{case:<13} {impl:<13} ERROR {r["error"][:200]}')
        continue
      inf, trn = r.get('infer', {}), r.get('train', {})
      peak = max(inf.get('peak_host_bytes') or 0, trn.get('peak_host_bytes') or 0) / 2**30
      dev = max(inf.get('peak_device_bytes') or 0, trn.get('peak_device_bytes') or 0) / 2**30
      lines.append(
          f'{case:<13} {impl:<13} {_fmt(inf.get("median_s")):>8} '
          f'{_fmt(trn.get("median_s")):>8} {_fmt(inf.get("compile_s"), ".1f", "s"):>11} '
          f'{_fmt(trn.get("compile_s"), ".1f", "s"):>11} {_fmt(peak, ".2f", "G"):>9} '
          f'{_fmt(dev or None, ".2f", "G"):>8} '
          f'{_fmt(inf.get("flops", 0) / 1e9 if inf.get("flops") else None, ".1f"):>9} '
          f'{_fmt(inf.get("flop_per_s", 0) / 1e9 if inf.get("flop_per_s") else None, ".1f"):>11} '
          f'{_fmt(trn.get("flop_per_s", 0) / 1e9 if trn.get("flop_per_s") else None, ".1f"):>11} '
          f'{_fmt(inf.get("xla_bytes", 0) / 2**30 if inf.get("xla_bytes") else None, ".2f", "G"):>8} '
          f'{_fmt(trn.get("xla_bytes", 0) / 2**30 if trn.get("xla_bytes") else None, ".2f", "G"):>8}')
    rat = res['ratios'].get(case, {})
    lines.append(f'{"":<13} torch/jax_exact: infer {_fmt(rat.get("infer_torch_over_exact"), ".2f")}x'
                 f'  train {_fmt(rat.get("train_torch_over_exact"), ".2f")}x;  '
                 f'torch/jax_straight: infer {_fmt(rat.get("infer_torch_over_straight"), ".2f")}x'
                 f'  train {_fmt(rat.get("train_torch_over_straight"), ".2f")}x  (>1: JAX faster)')
  return lines


def _ratios(per: dict) -> dict:
  out = {}
  for what in ('infer', 'train'):
    t = per.get('torch', {}).get(what, {}).get('median_s')
    for impl, tag in (('jax_exact', 'exact'), ('jax_straight', 'straight')):
      j = per.get(impl, {}).get(what, {}).get('median_s')
      out[f'{what}_torch_over_{tag}'] = _ratio(t, j)
  return out


def orchestrate(args, parts_dir: str) -> dict:
  suite = SUITES[args.suite]
  threads = args.threads
  t_start = time.perf_counter()
  res: dict = {'suite': args.suite, 'threads': threads, 'host': platform.node(),
               'cpu_count': os.cpu_count(), 'python': platform.python_version(),
               'load_average_start': common.load_average(), 'cases': {}, 'ratios': {}}
  flags = suite.get('xla_flags', '')
  store_case = 'smoke' if args.suite == 'smoke' else 'acdc'
  spawn_kw = {'warmup': args.warmup, 'parts_dir': parts_dir}
  side = {}
  if suite.get('parallel'):
    # Smoke only: the tasks mostly wait on single-threaded XLA compiles; run them at once.
    with concurrent.futures.ThreadPoolExecutor(len(IMPLS) * len(suite['cases']) + 2) as pool:
      side = {'store_read': pool.submit(_spawn, 'store', store_case, threads=threads,
                                        repeats=20, timeout=args.task_timeout, **spawn_kw),
              'extract': pool.submit(_spawn, 'extract', suite['extract'], threads=threads,
                                     repeats=1, timeout=args.task_timeout, **spawn_kw)}
      futures = {(case, impl): pool.submit(
          _spawn, impl, case, threads=threads, repeats=args.repeats or suite['repeats'][case],
          timeout=args.task_timeout, xla_flags=flags, **spawn_kw)
                 for case in suite['cases'] for impl in IMPLS}
      for case in suite['cases']:
        res['cases'][case] = {impl: futures[(case, impl)].result() for impl in IMPLS}
      side = {k: f.result() for k, f in side.items()}
  for case in suite['cases']:
    per = res['cases'].get(case, {})
    reps = args.repeats or suite['repeats'][case]
    for impl in IMPLS:
      if impl in per:
        continue
      print(f'[{time.perf_counter() - t_start:6.0f}s] {case} {impl} ...', flush=True)
      per[impl] = _spawn(impl, case, threads=threads, repeats=reps, timeout=args.task_timeout,
                         xla_flags=flags, extra=suite.get('extra', {}).get((case, impl), ()),
                         **spawn_kw)
    res['cases'][case] = per
    res['ratios'][case] = _ratios(per)
  if suite['full_size']:
    print(f'[{time.perf_counter() - t_start:6.0f}s] abdomen_full jax_exact inference '
          f'({suite["full_size"]}) ...', flush=True)
    extra = ('--infer-only',) + (('--compile-only',) if suite['full_size'] == 'compile' else ())
    res['abdomen_full_infer'] = _spawn('jax_exact', 'abdomen_full', threads=threads,
                                       repeats=1, timeout=args.task_timeout, extra=extra,
                                       **spawn_kw)
  if side:
    res.update(side)
  else:
    print(f'[{time.perf_counter() - t_start:6.0f}s] feature store read ...', flush=True)
    res['store_read'] = _spawn('store', store_case, threads=threads, repeats=20,
                               timeout=args.task_timeout, **spawn_kw)
    print(f'[{time.perf_counter() - t_start:6.0f}s] feature extraction ...', flush=True)
    res['extract'] = _spawn('extract', suite['extract'], threads=threads, repeats=1,
                            timeout=args.task_timeout, **spawn_kw)
  if suite['end_to_end']:
    res['end_to_end'] = _spawn('end_to_end', 'acdc', threads=threads, repeats=3,
                               timeout=args.task_timeout, **spawn_kw)
  train_s = res['cases'][store_case].get('jax_exact', {}).get('train', {}).get('median_s')
  rate = res['store_read'].get('pairs_per_s')
  res['store_read']['train_pairs_per_s'] = 1.0 / train_s if train_s else None
  res['store_read']['read_over_train'] = rate * train_s if rate and train_s else None
  res['load_average_end'] = common.load_average()
  res['total_wall_s'] = time.perf_counter() - t_start
  return res


def print_report(res: dict) -> None:
  print(f'\nsuite {res["suite"]}: {res["threads"]} threads (torch and XLA), '
        f'{res["cpu_count"]} CPUs, load average {res["load_average_start"]} -> '
        f'{res["load_average_end"]}, {res["total_wall_s"]:.0f} s')
  print('seconds per pair (one direction), median of timed repeats after a warm-up call;')
  print('compile = lower + compile (first call extra); peak host = max RSS of the task\n')
  print('\n'.join(summarise(res)))
  full = res.get('abdomen_full_infer')
  if full:
    inf = full.get('infer', {})
    if 'error' in full:
      print(f'\nabdomen full size inference: ERROR {full["error"][:300]}')
    else:
      print(f'\nabdomen full size (192x160x256) JAX exact inference: compile '
            f'{_fmt(inf.get("compile_s"), ".1f")} s, XLA buffers '
            f'{_fmt(inf.get("xla_bytes", 0) / 2**30, ".2f")} GiB, peak host '
            f'{_fmt(inf.get("peak_host_bytes", 0) / 2**30, ".2f")} GiB, run '
            f'{_fmt(inf.get("median_s"))} s')
  st = res['store_read']
  if 'error' in st:
    print(f'store read: ERROR {st["error"][:300]}')
  else:
    print(f'feature store read: {st["pairs_per_s"]:.1f} pairs/s ({st["pair_mb"]:.1f} MB '
          f'features per pair) = {_fmt(st.get("read_over_train"), ".0f")}x the JAX train-step '
          'rate (target >= 10x)')
  ex = res['extract']
  print('feature extraction: ' + (f'ERROR {ex["error"][:300]}' if 'error' in ex else
                                  f'{ex["backbone"]} K={ex["K"]} {ex["dtype"]}: '
                                  f'{ex["slices_per_s"]:.2f} slices/s'))
  if 'end_to_end' in res:
    e2e = res['end_to_end']
    print('end to end ACDC pair, both directions, K=512: ' +
          (f'ERROR {e2e["error"][:300]}' if 'error' in e2e else
           f'{e2e["seconds_per_pair_both_directions"]:.3f} s'))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--suite', choices=sorted(SUITES), default='cpu')
  p.add_argument('--json', default=None, help='output JSON (default bench_results/<suite>.json)')
  p.add_argument('--threads', type=int, default=os.cpu_count(),
                 help='threads for torch and XLA (default: all CPUs)')
  p.add_argument('--repeats', type=int, default=0, help='timed repeats (0 = suite default)')
  p.add_argument('--warmup', type=int, default=-1,
                 help='untimed calls before timing (-1 = suite default)')
  p.add_argument('--task-timeout', type=float, default=900.0)
  # Worker mode (one subprocess per measurement).
  p.add_argument('--task', default=None, help=argparse.SUPPRESS)
  p.add_argument('--case', default=None, help=argparse.SUPPRESS)
  p.add_argument('--out', default=None, help=argparse.SUPPRESS)
  p.add_argument('--infer-only', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--train-only', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--compile-only', action='store_true', help=argparse.SUPPRESS)
  p.add_argument('--train-compile-only', action='store_true', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.threads < 1:
    p.error(f'--threads must be >= 1, got {args.threads}')
  if args.warmup < 0:
    args.warmup = SUITES[args.suite].get('warmup', 1)
  if args.task:
    if args.threads < (os.cpu_count() or 1) and hasattr(os, 'sched_setaffinity'):
      # Pin torch and XLA alike to the first `threads` CPUs (XLA has no thread-count flag).
      os.sched_setaffinity(0, range(args.threads))
    res = _worker(args)
    with open(args.out, 'w', encoding='utf-8') as f:
      json.dump(res, f)
    return 0
  path = args.json or os.path.join(ROOT, 'bench_results', f'{args.suite}.json')
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  parts_dir = path + '.parts'
  os.makedirs(parts_dir, exist_ok=True)
  res = orchestrate(args, parts_dir)
  print_report(res)
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(res, f, indent=1)
  print(f'\nJSON: {path}')
  errors = [k for k, v in res['cases'].items() for i in IMPLS if 'error' in v.get(i, {})]
  return 1 if errors else 0


if __name__ == '__main__':
  sys.exit(main())
