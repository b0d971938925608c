"""Learning curves for the training modes (UN / WS / -CR) and a cross-domain table.

  python bench/learning.py --out bench_results/learning            # CPU hours, resumable
  python bench/learning.py --out /tmp/learning --smoke             # about a minute (tests)

Stages, each resumable (kill it and run the same command again):
1. Data: cardiac phantoms in the ACDC layout and abdomen phantoms in the Learn2Reg layout,
   each read on two grids (DATASETS: cardiac = the demo's 48x48x16 at 2.4x2.4x10 mm, a
   115 mm crop around the heart; cardiac_wide = 64x64x16 at 3.6x3.6x10 mm, the paper's
   230 mm ACDC field of view at half its resolution; abdomen = the quarter grid, 48x40x64 at
   8 mm; abdomen_half = the paper's 96x80x128 at 4 mm), through the offline `mind` backbone
   (feature_extract/run.py).
2. Runs: one head per dataset x mode x channel_norm (or --plan), the demo's model size
   (configs/demo.py: c'=16, n=8, 4 levels, He init, lr 3e-3), the same step budget for all
   runs of a dataset. Every --eval-every steps the trainer validates twice: with the
   inference-time inputs (the PCA basis) and with the training-time inputs (one fixed
   channel draw, UN/WS); a gap between the two curves is a train/inference mismatch. Runs
   already finished are skipped.
3. Outputs in OUT: curves.csv (every validation of every run), learning_curves.png
   (held-out Dice vs step per dataset), table2.md (each run's best checkpoint on the test
   split of every --test-datasets store, the paper's Table 2 layout, made by eval.py
   --table2 --reuse: evaluations already in OUT/eval for the same checkpoint are kept).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from feature_extract.synthetic import phantoms  # noqa: E402
from fmir_jax.core import files  # noqa: E402

MODES = ('UN', 'WS', '-CR')


@dataclasses.dataclass(frozen=True)
class DataSet:
  """One phantom dataset: which phantoms, how to extract them and train on them."""
  name: str             # cardiac | cardiac_wide | abdomen | abdomen_half
  phantoms: str         # the phantom set it reads (out/data/PHANTOMS, shared by its grids)
  reader: str           # feature_extract dataset name
  options: dict         # reader options (feature_extract/run.py --dataset-option KEY=VALUE)
  input_size: int       # encoder input K (feature_extract/run.py --input-size)
  factors: tuple        # pyramid factors
  num_classes: int
  blur_in_plane_only: bool


# Two grids of each phantom set. cardiac: the demo's 115 mm crop around the heart (48x48x16
# at 2.4 mm); cardiac_wide: the paper's ACDC field of view (128x128 at 1.8 mm = 230 mm) at
# half its resolution (64x64x16 at 3.6 mm). abdomen: the quarter grid (48x40x64 at 8 mm, the
# CPU training grid); abdomen_half: the paper's grid (96x80x128 at 4 mm).
DATASETS = {
    'cardiac': DataSet('cardiac', 'cardiac', 'acdc',
                       {'shape': [48, 48, 16], 'spacing_mm': [2.4, 2.4, 10.0]}, 64,
                       (2, 2, 1), 3, True),
    'cardiac_wide': DataSet('cardiac_wide', 'cardiac', 'acdc',
                            {'shape': [64, 64, 16], 'spacing_mm': [3.6, 3.6, 10.0]}, 64,
                            (2, 2, 1), 3, True),
    'abdomen': DataSet('abdomen', 'abdomen', 'abdomen', {'resolution': 'quarter'}, 64,
                       (2, 2, 2), 13, False),
    'abdomen_half': DataSet('abdomen_half', 'abdomen', 'abdomen', {'resolution': 'half'}, 128,
                            (2, 2, 2), 13, False),
}


@dataclasses.dataclass(frozen=True)
class Budget:
  steps: int                      # training steps per run (unless dataset_steps says)
  eval_every: int
  dataset_steps: tuple = ()       # ((dataset, steps), ...): a dataset's own step count
  flow_init: str = 'small'        # model.flow_init of every run
  cardiac_patients: int = 20      # ids 1-20: the ACDC split rule gives val patients 18-20
  cardiac_test: int = 4           # ids 101-104
  abdomen_scans: int = 30         # the Learn2Reg split: 1-20 train, 21-23 val, 24-30 test
  abdomen_shape: tuple = (96, 80, 128)   # written at 4 mm (abdomen: resampled to 8 mm)
  input_scale: float = 1.0        # smoke: the encoder input K of every dataset x this
  val_pairs: int = 0              # validation pairs per check (0 = all)
  tiny_model: bool = False        # smoke: 2 levels, n=4, c'=8 (compiles in seconds)
  eval_limit: int = 0             # table2: first N test pairs per store (0 = all)

  def steps_for(self, dataset: str) -> int:
    return dict(self.dataset_steps).get(dataset, self.steps)


def write_phantoms(raw: str, kind: str, budget: Budget, seed: int) -> None:
  """The phantom set ``kind`` in its dataset's raw layout (skipped once complete)."""
  done = os.path.join(raw, 'phantoms.json')
  if os.path.exists(done):
    return
  print(f'[data] {kind} phantoms -> {raw}', flush=True)
  if kind == 'cardiac':
    first = 21 - budget.cardiac_patients
    phantoms.write_acdc_phantoms(raw, budget.cardiac_patients, seed, first_id=first,
                                 inplane_size=(150, 200))
    phantoms.write_acdc_phantoms(raw, budget.cardiac_test, seed, first_id=101,
                                 inplane_size=(150, 200))
  else:
    phantoms.write_abdomen_phantoms(raw, budget.abdomen_scans, seed,
                                    shape=budget.abdomen_shape, spacing_mm=4.0)
  with files.atomic_path(done) as tmp, open(tmp, 'w') as f:
    json.dump({'kind': kind, 'seed': seed, 'budget': dataclasses.asdict(budget)}, f)


def write_data(out: str, budget: Budget, datasets, seed: int) -> dict[str, str]:
  """Phantoms and `mind` feature stores (skipped when a store's index exists)."""
  from feature_extract import pipeline
  stores = {}
  for name in datasets:
    ds = DATASETS[name]
    raw = os.path.join(out, 'data', ds.phantoms)
    store = os.path.join(out, 'features', name)
    stores[name] = store
    if os.path.exists(os.path.join(store, 'index.json')):
      continue
    write_phantoms(raw, ds.phantoms, budget, seed)
    summary = pipeline.extract_dataset(
        backbone='mind', dataset=ds.reader, data_root=raw, out=store,
        input_size=max(16, int(ds.input_size * budget.input_scale)), device='cpu',
        dataset_options=ds.options, progress=False)
    print(f'[data] {name}: {summary.line()}', flush=True)
  return stores


@dataclasses.dataclass(frozen=True)
class Run:
  """One planned run: --plan 'dataset:mode:norm[:lr]' (lr 0 = the demo's, 3e-3)."""
  dataset: str
  mode: str
  norm: str
  lr: float = 0.0

  @property
  def name(self) -> str:
    lr = f'_lr{self.lr:g}' if self.lr else ''
    return f'{self.dataset}_{self.mode.replace("-", "no")}_{self.norm}{lr}'


def parse_run(text: str) -> Run:
  """'cardiac:WS:matched:1e-3' -> Run; ValueError with the reason."""
  parts = text.split(':')
  if len(parts) not in (3, 4) or parts[0] not in DATASETS or parts[1] not in MODES:
    raise ValueError(f'{text!r} is not dataset:mode:norm[:lr] with a dataset of '
                     f'{sorted(DATASETS)} and a mode of {MODES}')
  lr = 0.0
  if len(parts) == 4:
    try:
      lr = float(parts[3])
    except ValueError:
      lr = -1.0
    if not 0 < lr < float('inf'):
      raise ValueError(f'{text!r}: the learning rate {parts[3]!r} is not a positive, finite '
                       'number')
  return Run(parts[0], parts[1], parts[2], lr)


def config_for(ds: DataSet, store: str, mode: str, norm: str, budget: Budget, seed: int,
               lr: float = 0.0):
  from configs import demo
  c = demo.get_config()
  c.name = ds.reader          # rows of table2 named like its columns (the store's dataset)
  c.data.train_stores = (store,)
  c.data.num_classes = ds.num_classes
  c.model.factors = ds.factors
  c.loss.blur_in_plane_only = ds.blur_in_plane_only
  c.mode = mode
  c.channel_norm = norm
  c.model.flow_init = budget.flow_init
  c.train.num_steps = budget.steps_for(ds.name)
  c.train.eval_every = budget.eval_every
  c.train.checkpoint_every = budget.eval_every
  c.train.eval_pairs = budget.val_pairs
  c.train.eval_channel_draw = True
  c.train.seed = seed
  if lr:
    c.optim.lr = lr
  if budget.tiny_model:
    c.feature_channels, c.model.n, c.model.levels, c.model.integration_steps = 8, 4, 2, 2
    c.loss.ncc_windows = c.loss.ncc_windows[:2]
  return c


def train_runs(out: str, stores: dict, plan, budget: Budget, seed: int) -> list[str]:
  """Trains every Run of ``plan``; finished runs are skipped."""
  from fmir_jax.train import loop
  workdirs = []
  for i, run in enumerate(plan):
    wd = os.path.join(out, 'runs', run.name)
    workdirs.append(wd)
    steps = budget.steps_for(run.dataset)
    if steps in loop.read_val_log(wd):
      print(f'[run {i + 1}/{len(plan)}] {os.path.basename(wd)}: done', flush=True)
      continue
    print(f'[run {i + 1}/{len(plan)}] {os.path.basename(wd)}: training to step {steps}',
          flush=True)
    t0 = time.perf_counter()
    config = config_for(DATASETS[run.dataset], stores[run.dataset], run.mode, run.norm, budget,
                        seed, run.lr)
    loop.train_and_evaluate(config, wd, quiet=True)
    print(f'  {time.perf_counter() - t0:.0f} s', flush=True)
  return workdirs


def collect(plan, workdirs) -> list[dict]:
  """One row per validation of every run (the trainer's val.jsonl)."""
  from fmir_jax.train import run_file
  from fmir_jax.train import loop
  rows = []
  for run, wd in zip(plan, workdirs):
    info = run_file.read_run_info(wd)
    for step, rec in sorted(loop.read_val_log(wd).items()):
      rows.append({'run': os.path.basename(wd), 'dataset': run.dataset,
                   'mode': info['mode'], 'channel_norm': info.get('channel_norm', 'paper'),
                   'lr': info['config']['optim']['lr'], **rec})
  return rows


def write_curves(out: str, rows: list[dict]) -> tuple[str, str]:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  csv_path = os.path.join(out, 'curves.csv')
  fields = ['run', 'dataset', 'mode', 'channel_norm', 'lr', 'step', 'initial_dice', 'dice',
            'dice_draw', 'folding_fraction']
  with files.atomic_path(csv_path) as tmp, open(tmp, 'w', newline='') as f:
    w = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
    w.writeheader()
    w.writerows(rows)
  datasets = sorted({r['dataset'] for r in rows})
  fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.2), squeeze=False)
  colours: dict = {}            # one colour per (mode, channel_norm, lr) in every panel
  for ax, name in zip(axes[0], datasets):
    runs = sorted({r['run'] for r in rows if r['dataset'] == name})
    for run in runs:
      rr = [r for r in rows if r['run'] == run]
      steps = [0] + [r['step'] for r in rr]
      colour = colours.setdefault((rr[0]['mode'], rr[0]['channel_norm'], rr[0]['lr']),
                                  f'C{len(colours)}')
      label = f'{rr[0]["mode"]} / {rr[0]["channel_norm"]} / lr {rr[0]["lr"]:g}'
      ax.plot(steps, [100 * rr[0]['initial_dice']] + [100 * r['dice'] for r in rr],
              '-o', ms=3, color=colour, label=label + ' (PCA inputs)')
      if any('dice_draw' in r for r in rr):
        ax.plot(steps, [100 * rr[0]['initial_dice']] + [100 * r.get('dice_draw', float('nan'))
                                                       for r in rr],
                '--', color=colour, alpha=0.7, label=label + ' (training draw)')
    ax.axhline(100 * rr[0]['initial_dice'], color='grey', lw=0.8, ls=':')
    ax.set_title(f'{name} phantoms: held-out (val) Dice')
    ax.set_xlabel('training step')
    ax.set_ylabel('Dice, %')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  png = os.path.join(out, 'learning_curves.png')
  with files.atomic_path(png) as tmp:
    fig.savefig(tmp, dpi=110, format='png')
  plt.close(fig)
  return csv_path, png


def table2(out: str, workdirs, stores: dict, limit: int = 0) -> str:
  """eval.py --table2 over every run x both test sets (best checkpoints)."""
  path = os.path.join(out, 'table2.md')
  cmd = [sys.executable, os.path.join(ROOT, 'eval.py'), '--workdir=' + ','.join(workdirs),
         '--features=' + ','.join(stores[k] for k in sorted(stores)), '--split=test',
         '--figures=0', f'--limit={limit}', f'--out={os.path.join(out, "eval")}',
         f'--table2={path}', '--reuse', '--overwrite']
  print('[table2] ' + ' '.join(cmd), flush=True)
  subprocess.run(cmd, check=True, cwd=ROOT)
  return path


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog='python bench/learning.py', description=__doc__.split('\n')[0])
  p.add_argument('--out', default='bench_results/learning', help='output folder')
  p.add_argument('--datasets', default='cardiac,abdomen')
  p.add_argument('--modes', default='UN,WS,-CR')
  p.add_argument('--norms', default='paper,matched',
                 help='channel_norm values for UN and WS (fmir_jax/model/channel_reg.py NORMS)')
  p.add_argument('--cr-norm', default='paper', help='channel_norm of the -CR runs')
  p.add_argument('--steps', type=int, default=300, help='training steps per run')
  p.add_argument('--abdomen-steps', type=int, default=150, help='per abdomen run')
  p.add_argument('--dataset-steps', default='',
                 help="a dataset's own step count, 'NAME=STEPS,...' (e.g. cardiac_wide=750)")
  p.add_argument('--flow-init', default='small', help="model.flow_init: 'small' or 'torch'")
  p.add_argument('--plan', default='',
                 help="explicit runs 'dataset:mode:norm[:lr],...' (lr default: the demo's "
                      "3e-3; default plan: datasets x modes x norms)")
  p.add_argument('--eval-every', type=int, default=25)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--test-datasets', default='cardiac,abdomen',
                 help=f'test sets of the cross-domain table (extracted when missing); of '
                      f'{",".join(DATASETS)}')
  p.add_argument('--no-table2', action='store_true')
  p.add_argument('--smoke', action='store_true', help='tiny data and 2 steps (tests)')
  a = p.parse_args(argv)
  datasets = [d for d in a.datasets.split(',') if d]
  modes = [m for m in a.modes.split(',') if m]
  test_sets = [d for d in a.test_datasets.split(',') if d]
  for flag, names in (('--datasets', datasets), ('--test-datasets', test_sets)):
    for d in names:
      if d not in DATASETS:
        p.error(f'{flag}: unknown {d!r}; use {sorted(DATASETS)}')
  for m in modes:
    if m not in MODES:
      p.error(f'--modes: unknown {m!r}; use {MODES}')
  dataset_steps = {'abdomen': a.abdomen_steps}
  for item in [x for x in a.dataset_steps.split(',') if x]:
    name, _, n = item.partition('=')
    if name not in DATASETS or not n.isdigit() or int(n) < 1:
      p.error(f'--dataset-steps: {item!r} is not NAME=STEPS with a NAME of {sorted(DATASETS)} '
              'and STEPS a positive whole number')
    dataset_steps[name] = int(n)
  if a.smoke:   # compile faster (as the other benches' smoke runs); timings mean nothing
    os.environ.setdefault('XLA_FLAGS', '--xla_backend_optimization_level=0')
    budget = Budget(steps=2, eval_every=2, cardiac_patients=6, cardiac_test=1,
                    abdomen_scans=30, abdomen_shape=(24, 20, 32), input_scale=0.5,
                    eval_limit=2, val_pairs=2, tiny_model=True)
  else:
    budget = Budget(steps=a.steps, eval_every=a.eval_every,
                    dataset_steps=tuple(sorted(dataset_steps.items())), flow_init=a.flow_init)
  try:
    files.check_writable_dir(a.out, '--out')
  except files.OutputPathError as e:
    print(f'learning: error: {e}', file=sys.stderr)
    return 2
  os.makedirs(a.out, exist_ok=True)
  if a.plan:
    try:
      plan = [parse_run(x) for x in a.plan.split(',') if x]
    except ValueError as e:
      p.error(f'--plan: {e}')
    datasets = sorted({r.dataset for r in plan}, key=list(DATASETS).index)
  else:
    plan = [Run(d, m, n) for d in datasets for m in modes
            for n in ([a.cr_norm] if m == '-CR' else a.norms.split(','))]
  with open(os.path.join(a.out, 'command.json'), 'w') as f:
    json.dump({'argv': sys.argv[1:] if argv is None else list(argv),
               'budget': dataclasses.asdict(budget),
               'plan': [dataclasses.asdict(r) for r in plan]}, f, indent=1)
  if a.no_table2:
    test_sets = []
  stores = write_data(a.out, budget, [d for d in DATASETS if d in datasets or d in test_sets],
                      a.seed)
  workdirs = train_runs(a.out, stores, plan, budget, a.seed)
  rows = collect(plan, workdirs)
  csv_path, png = write_curves(a.out, rows)
  print(f'curves: {csv_path}, {png}')
  for wd in workdirs:
    rr = [r for r in rows if r['run'] == os.path.basename(wd)]
    last = rr[-1]
    print(f'  {os.path.basename(wd):28s} val Dice {100 * last["initial_dice"]:.1f} -> '
          f'{100 * last["dice"]:.1f} (PCA), '
          f'{100 * last.get("dice_draw", float("nan")):.1f} (training draw), '
          f'best {100 * max(r["dice"] for r in rr):.1f}')
  if not a.no_table2:
    print(open(table2(a.out, workdirs, {d: stores[d] for d in test_sets},
                      budget.eval_limit)).read())
  return 0


if __name__ == '__main__':
  sys.exit(main())
