"""The offline end-to-end demo: phantoms -> `mind` features -> training -> evaluation ->
registering one NIfTI pair. CPU only, no downloads.

  python -m fmir_jax.demo --out demo_out            # the README's demo (≈ minutes)
  python -m fmir_jax.demo --out /tmp/d --smoke      # a reduced run (the README test)

Every stage is the library/CLI code a user runs on real data: the ACDC reader on the
official release layout, pipeline.extract_dataset (feature_extract/run.py),
loop.train_and_evaluate (train.py), evaluation.evaluate_run (eval.py) and the
`fmir register` command.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from fmir_jax.core import errors
from fmir_jax.core import files
from fmir_jax import cli
from fmir_jax.evaluate import evaluation
from fmir_jax.train import loop

MARKER = '.fmir-demo.json'
ENTRIES = ('acdc_phantoms', 'features', 'run', 'eval', 'register')   # what a demo writes in OUT

BANNER = """\
================================================================================
 fmir-jax offline demo
 Backbone: `mind` -- a hand-crafted self-similarity descriptor (offline, no weights).
 It is NOT the paper's DINOv3 foundation model; numbers here are not the paper's.
 For the real pipeline (needs the weights; DINOv3 is gated on the Hugging Face Hub):
   python feature_extract/run.py --backbone dinov3 --dataset acdc \\
       --data-root ACDC --out features/acdc_dinov3
   python train.py --config=configs/acdc.py --workdir=runs/acdc \\
       --config.data.train_stores=features/acdc_dinov3
   python eval.py --workdir=runs/acdc --features=features/acdc_dinov3
 (docs/pipeline.md).
================================================================================"""



class DemoError(errors.UserError, ValueError):
  """OUT cannot hold the demo: the message names the folder and the fix."""


# The marker lists every file a demo wrote (relative path -> [size, mtime_ns]) and, while a
# stage runs, the files its entry held before ("pending"): so a rerun removes exactly what
# the demo wrote, also after a kill, and nothing the user added or changed since.


def _listing(root: str) -> dict[str, list[int]]:
  """Every plain file under ``root`` (relative path -> [size, mtime_ns])."""
  found = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      if os.path.isfile(path) and not os.path.islink(path):
        st = os.stat(path)
        found[os.path.relpath(path, root)] = [st.st_size, st.st_mtime_ns]
  return found


def _read_marker(out: str) -> dict:
  marker = os.path.join(out, MARKER)
  try:
    with open(marker) as f:
      state = json.load(f)
    written, pending = state['files'], state.get('pending', {})
    if not isinstance(written, dict) or not isinstance(pending, dict):
      raise TypeError('files/pending are not mappings')
  except KeyError:
    raise DemoError(f'{marker}: made by an older demo that did not list its files, so a '
                    'rerun cannot tell them from yours; choose a new --out folder.') from None
  except (OSError, ValueError, TypeError) as e:
    raise DemoError(f'{marker}: unreadable demo marker ({e}); choose a new --out folder.') \
        from None
  return {'files': written, 'pending': pending}


def _write_marker(out: str, state: dict) -> None:
  with files.atomic_path(os.path.join(out, MARKER)) as tmp, open(tmp, 'w') as f:
    json.dump({'written_by': 'python -m fmir_jax.demo', 'entries': list(ENTRIES), **state}, f)


def _remove_written(out: str, state: dict) -> None:
  """Removes the files an earlier demo wrote (unchanged since), then the folders that this
  left empty; every other file stays."""
  now = _listing(out)
  doomed = {p for p, stat in state['files'].items() if now.get(p) == stat}
  for entry, before in state['pending'].items():       # a stage that was killed
    before = set(before)
    doomed |= {p for p in now if p.startswith(entry + os.sep) and p not in before}
  for rel in sorted(doomed):
    if rel.split(os.sep)[0] in ENTRIES:
      os.remove(os.path.join(out, rel))
  for rel in sorted({os.path.dirname(p) for p in doomed}, key=len, reverse=True):
    while rel and rel.split(os.sep)[0] in ENTRIES:
      path = os.path.join(out, rel)
      if not os.path.isdir(path) or os.listdir(path):
        break
      os.rmdir(path)
      rel = os.path.dirname(rel)


def prepare_out(out: str) -> None:
  """Makes ``out`` ready for a demo run, deleting only what an earlier demo wrote there.

  A new or empty folder is created and marked. In a folder an earlier demo marked, the files
  that demo wrote are removed (those the user changed since, and every other file, stay).
  Any other non-empty folder is refused: the demo never deletes what it did not write.
  """
  files.check_writable_dir(out, '--out')
  marker = os.path.join(out, MARKER)
  state = {'files': {}, 'pending': {}}
  if os.path.isdir(out) and os.listdir(out):
    if not os.path.isfile(marker):
      raise DemoError(f'--out {out}: folder exists, is not empty and was not made by the demo '
                      f'(no {MARKER} in it); choose a new or empty folder.')
    _remove_written(out, _read_marker(out))
  os.makedirs(out, exist_ok=True)
  _write_marker(out, state)


@contextlib.contextmanager
def _stage_writes(out: str, entry: str):
  """Records, in the marker, the files a stage writes under OUT/ENTRY (pending while it
  runs, so a kill leaves them removable)."""
  state = _read_marker(out)
  root = os.path.join(out, entry)
  before = {os.path.join(entry, p): s for p, s in _listing(root).items()}
  state['pending'][entry] = sorted(before)
  _write_marker(out, state)
  yield
  after = {os.path.join(entry, p): s for p, s in _listing(root).items()}
  state['files'].update({p: s for p, s in after.items() if before.get(p) != s})
  del state['pending'][entry]
  _write_marker(out, state)


def _stage(name: str):
  print(f'\n--- {name} ' + '-' * max(0, 70 - len(name)), flush=True)
  return time.perf_counter()


def run(out: str, *, patients: int = 20, test_patients: int = 4, steps: int = 100,
        input_size: int = 64, seed: int = 0, eval_pairs: int = 0, figures: int = 2,
        register: bool = True, io_steps: int = 30, grid=(48, 48, 16),
        spacing_mm=(2.4, 2.4, 10.0)) -> dict:
  """Runs the whole demo into ``out`` (see ``prepare_out``: an earlier demo there is replaced,
  nothing else is deleted).

  The phantoms are preprocessed by the real ACDC reader onto ``grid`` at ``spacing_mm``
  (default 48x48x16 at 2.4x2.4x10 mm: a heart-centred crop, coarser and smaller than the
  paper's 128x128x16 at 1.8x1.8x10 mm) so that training takes minutes on two CPU cores.
  """
  # The PyTorch stage and the configs load when the demo runs, not when fmir_jax.demo is imported.
  from feature_extract import pipeline
  from feature_extract.synthetic import phantoms   # (as above)
  from configs import demo as demo_config   # (as above)

  prepare_out(out)
  print(BANNER, flush=True)
  t_all = time.perf_counter()
  data_root = os.path.join(out, 'acdc_phantoms')
  features = os.path.join(out, 'features')
  workdir = os.path.join(out, 'run')
  times = {}

  t = _stage(f'1/5 synthetic cardiac phantoms in the ACDC release layout -> {data_root}')
  # Patients end at 20 so the official split rule yields validation patients (18-20).
  first = max(1, 21 - patients)
  with _stage_writes(out, 'acdc_phantoms'):
    phantoms.write_acdc_phantoms(data_root, patients, seed, first_id=first,
                                 inplane_size=(150, 200))
    phantoms.write_acdc_phantoms(data_root, test_patients, seed, first_id=101,
                                 inplane_size=(150, 200))
  times['phantoms_s'] = time.perf_counter() - t
  print(f'{patients} training/validation patients ({first}-{first + patients - 1}), '
        f'{test_patients} test '
        f'patients (101-{100 + test_patients})')

  t = _stage(f'2/5 `mind` features (offline backbone) -> {features}')
  with _stage_writes(out, 'features'):
    extracted = pipeline.extract_dataset(
        backbone='mind', dataset='acdc', data_root=data_root, out=features,
        input_size=input_size, device='cpu',
        dataset_options={'shape': list(grid), 'spacing_mm': list(spacing_mm)})
  print(extracted.line())
  times['features_s'] = time.perf_counter() - t

  t = _stage(f'3/5 training with configs/demo.py -> {workdir}')
  config = demo_config.get_config()
  config.data.train_stores = (features,)
  config.train.num_steps = steps
  config.train.eval_every = max(steps // 2, 1)
  config.train.checkpoint_every = max(steps // 2, 1)
  config.train.eval_pairs = eval_pairs or config.train.eval_pairs
  config.train.seed = seed
  with _stage_writes(out, 'run'):
    result = loop.train_and_evaluate(config, workdir)
  times['train_s'] = time.perf_counter() - t

  t = _stage('4/5 evaluation on the held-out test phantoms')
  with _stage_writes(out, 'eval'):
    summary = evaluation.evaluate_run(workdir, features, split='test', figures=figures,
                                      out_dir=os.path.join(out, 'eval'))
  times['eval_s'] = time.perf_counter() - t
  print(summary.table1)

  reg = None
  if register:
    t = _stage('5/5 `fmir register` on one raw NIfTI pair (original grids)')
    pid = 101
    pdir = os.path.join(data_root, 'testing', f'patient{pid:03d}')
    from feature_extract.datasets import acdc   # the PyTorch stage's reader: as above
    ed, es = acdc.parse_info_cfg(os.path.join(pdir, 'Info.cfg'))
    frame = lambda f, gt='': os.path.join(pdir, f'patient{pid:03d}_frame{f:02d}{gt}.nii.gz')
    reg_out = os.path.join(out, 'register')
    with _stage_writes(out, 'register'):
      rc = cli.main(['register', '--fixed', frame(ed), '--moving', frame(es),
                     '--fixed-labels', frame(ed, '_gt'), '--moving-labels', frame(es, '_gt'),
                     '--checkpoint', workdir, '--out', reg_out, '--grid', 'model',
                     '--io-steps', str(io_steps)])
    if rc:
      raise DemoError(f'fmir register failed (exit {rc}; its message is above).')
    times['register_s'] = time.perf_counter() - t
    reg = reg_out

  total = time.perf_counter() - t_all
  m = summary.metrics
  print('\n' + '=' * 80)
  print(f'demo finished in {total:.0f} s '
        + ' '.join(f'({k[:-2]} {v:.0f} s)' for k, v in times.items()))
  print(f'held-out test pairs: Dice {100 * m["initial_dice_mean"]["mean"]:.2f}% before -> '
        f'{100 * m["dice_mean"]["mean"]:.2f}% after; folding '
        f'{100 * m["folding_fraction"]["mean"]:.3f}% of voxels; best val Dice '
        f'{100 * max(result.val_dice.values()):.2f}%')
  print('files:')
  for k, v in summary.files.items():
    for p in (v if isinstance(v, list) else [v]):
      print(f'  {p}')
  if reg:
    print(f'  {reg}/  (warped image, labels, displacement NIfTI, report.json)')
  print('=' * 80)
  return {'summary': summary, 'times': times, 'total_s': total, 'train': result,
          'register_out': reg}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      prog='python -m fmir_jax.demo',
      description='The offline end-to-end demo on CPU, no downloads: synthetic cardiac '
                  'phantoms in the ACDC release layout -> offline `mind` features -> training '
                  '(configs/demo.py) -> evaluation on held-out phantoms (tables, figures) -> '
                  '`fmir register` on one raw NIfTI pair. Writes only inside --out; a folder '
                  'it did not make must be new or empty.')
  p.add_argument('--out', default='demo_out', help='output folder (default: demo_out)')
  p.add_argument('--smoke', action='store_true',
                 help='reduced size, about a minute (what the test suite runs)')
  p.add_argument('--steps', type=int, help='training steps (default: 100; --smoke: 4)')
  p.add_argument('--seed', type=int, default=0, help='phantoms and training seed (default: 0)')
  p.add_argument('--no-register', action='store_true', help='skip the `fmir register` step')
  a = p.parse_args(argv)
  if a.smoke:
    kw = dict(patients=6, test_patients=1, steps=a.steps or 4, input_size=32, figures=1,
              io_steps=3, eval_pairs=2)
  else:
    kw = dict(steps=a.steps or 100)
  try:
    run(a.out, seed=a.seed, register=not a.no_register, **kw)
  except errors.UserError as e:
    print(f'demo: error: {e}', file=sys.stderr)
    return 2
  return 0


if __name__ == '__main__':
  sys.exit(main())
