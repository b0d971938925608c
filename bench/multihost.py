"""Cost of multi-host training on one machine: two JAX processes x 2 CPU devices (gradients
all-reduced over Gloo) against one process x 4 devices, same config and global batch.

  python bench/multihost.py                   # 30 steps of a small head on a synthetic store
  python bench/multihost.py --steps 60 --json bench_results/multihost.json

Both runs are `train.py` as a user launches it. Seconds per step are taken from the
TensorBoard wall times of steps 5..N (compilation and start-up excluded); the losses of the
two runs are compared step by step.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _cmd(store: str, workdir: str, steps: int, *extra: str) -> list[str]:
  return [sys.executable, 'train.py', '--config=configs/demo.py', f'--workdir={workdir}',
          f'--config.data.train_stores=("{store}",)', f'--config.train.num_steps={steps}',
          '--config.train.log_every=1', f'--config.train.checkpoint_every={steps}',
          f'--config.train.eval_every={steps}', '--config.train.eval_pairs=2',
          '--config.train.batch_size=4', '--config.data.prefetch=2', *extra]


def _events(workdir: str) -> dict[int, tuple[float, float]]:
  """step -> (wall time, train/loss) from the run's TensorBoard files."""
  from fmir_jax.evaluate import report
  return report.tensorboard_scalars(os.path.join(workdir, 'tb')).get('train/loss', {})


def _run(procs_args: list[tuple[list[str], int]], log_dir: str, tag: str) -> None:
  procs = []
  for i, (cmd, devices) in enumerate(procs_args):
    log = open(os.path.join(log_dir, f'{tag}{i}.log'), 'w')
    procs.append(subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env=dict(os.environ, JAX_NUM_CPU_DEVICES=str(devices))))
  if any(p.wait() for p in procs):
    raise RuntimeError(f'{tag} failed: see {log_dir}/{tag}*.log')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--json', default='')
  a = p.parse_args(argv)
  from tests.helpers import synthetic_stores
  with tempfile.TemporaryDirectory() as tmp:
    store = synthetic_stores.write_store(os.path.join(tmp, 'features'), shape=(32, 32, 8), channels=16)
    one = os.path.join(tmp, 'one')
    _run([(_cmd(store, one, a.steps), 4)], tmp, 'one')
    with socket.socket() as s:
      s.bind(('localhost', 0))
      port = s.getsockname()[1]
    two = os.path.join(tmp, 'two')
    _run([(_cmd(store, two, a.steps, f'--coordinator=localhost:{port}', '--num_processes=2',
                f'--process_id={i}'), 2) for i in (0, 1)], tmp, 'two')
    e1, e2 = _events(one), _events(two)
  per_step = {k: (e[a.steps][0] - e[5][0]) / (a.steps - 5) for k, e in (('one', e1), ('two', e2))}
  by_step = {s: abs(e1[s][1] - e2[s][1]) / abs(e1[s][1]) for s in sorted(e1)}
  rel = max(by_step.values())
  res = {'steps': a.steps, 'seconds_per_step': per_step,
         'two_over_one': per_step['two'] / per_step['one'], 'max_relative_loss_diff': rel,
         'relative_loss_diff_by_step': by_step,
         'cpu_count': os.cpu_count(), 'load_average': os.getloadavg()}
  print(f'1 process x 4 CPU devices: {per_step["one"]:.3f} s/step; 2 processes x 2 devices '
        f'(Gloo): {per_step["two"]:.3f} s/step ({res["two_over_one"]:.2f}x); largest relative '
        f'loss difference over {a.steps} steps: {rel:.1e}')
  if a.json:
    with open(a.json, 'w') as f:
      json.dump(res, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
