"""Builds and trains the general head in one command (configs/general.py), and ships it.

  python -m fmir_jax.general --out general_out                 # ~1-2 h on 2 CPU cores
  python -m fmir_jax.general --out general_out --ship DIR      # + copy the run for shipping
  python -m fmir_jax.general --config general_v2 --out general_v2_out   # version 2

Stages, each resumable (run the same command again after a kill):
1. data: domain-randomised pairs (``feature_extract.synthetic.randomised``, train split) for each
   grid of ``configs.general.TRAIN``, and out-of-domain validation pairs
   (``phantom_pairs``: cardiac, abdomen, inverted contrast; seed 1, the register benchmark
   uses seed 0) -- NIfTI + pairs.csv under OUT/data/;
2. features: `mind` feature stores by the normal extraction path (the "custom" reader on
   each pairs.csv, one encoder pixel per voxel) under OUT/features/;
3. training: ``loop.train_and_evaluate`` (train.py) into OUT/run;
4. --ship DIR: the best checkpoint, run.json, PCA basis, validation log and a
   ``general_head.json`` card (command, seed, commit, validation figures) copied to DIR
   (what ``fmir register`` loads when no --checkpoint is given: fmir_jax/weights/general).

Writes only under OUT (marked with ``.fmir-general.json``); never deletes anything there.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import subprocess
import sys
import time

from configs import general as cfg
from feature_extract.synthetic import phantom_pairs
from feature_extract.synthetic import randomised
from fmir_jax.core import entry
from fmir_jax.core import errors
from fmir_jax.core import files
from fmir_jax.train import checkpoint as ckpt
from fmir_jax.train import run_file
from fmir_jax.train import digests
from fmir_jax.train import loop
from fmir_jax.train.head_card import CARD, SHIPPED, seal

MARKER = '.fmir-general.json'
CONFIGS = ('general', 'general_v2')      # modules of configs/ this command builds


class GeneralError(errors.UserError, ValueError):
  """OUT or DIR cannot be used: the message names the folder and the fix."""


def prepare_out(out: str) -> None:
  """A new/empty OUT is marked; one with our marker is resumed; anything else refused."""
  files.check_writable_dir(out, '--out')
  marker = os.path.join(out, MARKER)
  if os.path.isdir(out) and os.listdir(out) and not os.path.isfile(marker):
    raise GeneralError(f'--out {out}: folder exists, is not empty and was not made by this '
                       f'command (no {MARKER}); choose a new or empty folder.')
  os.makedirs(out, exist_ok=True)
  if not os.path.isfile(marker):
    with files.atomic_path(marker) as tmp, open(tmp, 'w') as f:
      json.dump({'written_by': 'python -m fmir_jax.general'}, f)


def write_data(out: str, *, train_pairs: int, val_pairs: int, seed: int,
               train_settings=None, val_sets=None, log=print,
               config=cfg) -> dict[str, tuple[str, dict]]:
  """Stage 1: pairs on disk. Returns {store name: (pairs.csv, custom reader options)}.

  train_settings / val_sets: ``randomised.Setting`` and ``phantom_pairs.SetSpec`` lists in the
  order of ``config.TRAIN`` / ``VAL`` (default: the full-size ones; tests pass small ones).
  config: the configs/ module (``configs.general`` or ``configs.general_v2``).
  """
  lists = {}
  settings = train_settings or [randomised.SETTINGS[n.removeprefix('synth_')]
                                for n in config.TRAIN]
  for name, s in zip(config.TRAIN, settings):
    csv_path = randomised.write_pairs(os.path.join(out, 'data', 'synth'), s, train_pairs, seed,
                                 progress=log)
    lists[name] = (csv_path, {'shape': list(s.shape), 'spacing_mm': list(s.spacing_mm)})
  specs = {sp.name: sp for sp in (val_sets or phantom_pairs.set_specs(smoke=False))}
  for name in config.VAL:
    spec = specs[name.removeprefix('val_')]
    folder = os.path.join(out, 'data', name)
    csv_path = os.path.join(folder, 'pairs.csv')
    if not os.path.exists(csv_path):
      pairs = phantom_pairs.write_set(spec, val_pairs, seed + 1, folder, log)
      rel = lambda p: os.path.relpath(p, folder)  # noqa: E731
      with files.atomic_path(csv_path) as tmp, open(tmp, 'w') as f:
        f.write('moving,fixed,moving_label,fixed_label,split\n')
        for p in pairs:
          f.write(f'{rel(p.moving)},{rel(p.fixed)},{rel(p.moving_labels)},'
                  f'{rel(p.fixed_labels)},val\n')
    lists[name] = (csv_path, {'shape': list(spec.shape), 'spacing_mm': list(spec.spacing_mm)})
  return lists


def extract(out: str, lists: dict[str, tuple[str, dict]], log=print) -> dict[str, str]:
  """Stage 2: one `mind` store per pair list (skipped when complete)."""
  from feature_extract import pipeline  # torch: only when features are extracted
  stores = {}
  for name, (csv_path, options) in lists.items():
    store = os.path.join(out, 'features', name)
    stores[name] = store
    if os.path.exists(os.path.join(store, 'index.json')):
      continue
    summary = pipeline.extract_dataset(
        backbone='mind', dataset='custom', data_root=csv_path, out=store,
        input_size=max(options['shape'][:2]), device='cpu',
        dataset_options=dict(options, intensity='percentile'), progress=False)
    log(f'[features] {name}: {summary.line()}')
  return stores


def config_for(stores: dict[str, str], steps: int = 0, seed: int = 0, config=cfg):
  c = config.get_config()
  c.data.train_stores = tuple(stores[n] for n in config.TRAIN)
  c.data.eval_stores = tuple(stores[n] for n in config.VAL)
  if steps:
    c.train.num_steps = steps
  c.train.seed = seed
  return c


def _commit() -> str:
  try:
    return subprocess.run(['git', 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)),
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return 'unknown'


def ship(workdir: str, dest: str, command: list[str], seed: int) -> str:
  """Stage 4: copies what inference needs from ``workdir`` to ``dest`` (a new folder, or one
  an earlier ship wrote: only its own entries are replaced). Returns the card's path."""
  card_path = os.path.join(dest, CARD)
  if os.path.isdir(dest) and os.listdir(dest) and not os.path.isfile(card_path):
    raise GeneralError(f'--ship {dest}: folder exists, is not empty and holds no {CARD}; '
                       'choose a new or empty folder.')
  val = loop.read_val_log(workdir)
  manager, best = ckpt.best_or_latest(workdir, 'best')
  if best not in val:
    raise GeneralError(f'{workdir}: no validated checkpoint to ship (step {best} has no '
                       'validation record); train past the first validation first.')
  problem = digests.digest_problem(ckpt.step_dir(manager, best))
  if problem:
    raise GeneralError(f'{workdir}: the checkpoint to ship is damaged ({problem}); train the '
                       'run again (or restore its files) before shipping it.')
  entries = {run_file.RUN_FILE: run_file.RUN_FILE, 'pca': 'pca', loop.VAL_LOG: loop.VAL_LOG,
             os.path.join('best', str(best)): os.path.join('best', str(best))}
  tmp = files.make_temp_dir(os.path.dirname(os.path.abspath(dest)), os.path.basename(dest))
  try:
    for src, dst in entries.items():
      s, d = os.path.join(workdir, src), os.path.join(tmp, dst)
      os.makedirs(os.path.dirname(d), exist_ok=True)
      (shutil.copytree if os.path.isdir(s) else shutil.copy2)(s, d)
    card = {'what': 'general head, mind features, not a foundation model',
            'command': command, 'seed': seed, 'commit': _commit(), 'checkpoint_step': best,
            'validation': val.get(best, {}), 'validation_initial': {
                k: v for k, v in val.get(min(val), {}).items() if k.startswith('initial')}
            if val else {}, 'written': time.strftime('%Y-%m-%d %H:%M:%S')}
    with open(os.path.join(tmp, CARD), 'w') as f:
      json.dump(card, f, indent=1)
    seal(tmp)                            # the sha256 of every file, checked when loaded
    if os.path.isdir(dest):
      for name in (run_file.RUN_FILE, 'pca', loop.VAL_LOG, 'best', CARD):
        path = os.path.join(dest, name)
        if os.path.isdir(path):
          shutil.rmtree(path)
        elif os.path.exists(path):
          os.remove(path)
      for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(dest, name))
      shutil.rmtree(tmp)
    else:
      os.replace(tmp, dest)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return card_path


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='python -m fmir_jax.general',
                              description=__doc__.splitlines()[0],
                              formatter_class=entry.HelpFormatter)
  p.add_argument('--config', default='general', choices=CONFIGS,
                 help='the recipe: configs/general.py (the shipped head) or '
                      'configs/general_v2.py (version 2)')
  p.add_argument('--out', default='general_out', help='working folder (resumable)')
  p.add_argument('--train-pairs', type=int, default=200, help='synthetic pairs per grid')
  p.add_argument('--val-pairs', type=int, default=3, help='validation pairs per phantom set')
  p.add_argument('--steps', type=int, default=0,
                 help="training steps (default: 0, the config's num_steps)")
  p.add_argument('--seed', type=int, default=0, help='seed of the data and the training')
  p.add_argument('--ship', default='', metavar='DIR',
                 help=f'copy the trained head here (e.g. {SHIPPED}; default: no copy)')
  return p


def main(argv=None) -> int:
  a = build_parser().parse_args(argv)
  workdir = os.path.join(a.out, 'run')
  try:
    prepare_out(a.out)
    config = importlib.import_module(f'configs.{a.config}')
    lists = write_data(a.out, train_pairs=a.train_pairs, val_pairs=a.val_pairs, seed=a.seed,
                       config=config)
    stores = extract(a.out, lists)
    t0 = time.perf_counter()
    loop.train_and_evaluate(config_for(stores, a.steps, a.seed, config), workdir)
    print(f'[train] {workdir}: {time.perf_counter() - t0:.0f} s')
    _, best = ckpt.best_or_latest(workdir, 'best')
    print(f'[train] best checkpoint: step {best}: {loop.read_val_log(workdir).get(best)}')
    if a.ship:
      card = ship(workdir, a.ship, ['python', '-m', 'fmir_jax.general',
                                    *(argv or sys.argv[1:])], a.seed)
      print(f'[ship] {a.ship} ({card})')
  except errors.UserError as e:
    print(f'general: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
