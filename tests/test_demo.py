"""The README's commands: the demo pipeline end to end at a reduced size, and the README
states exactly the commands CI and users run."""
import json
import os
import re

import numpy as np
import pytest

from fmir_jax import demo
from tests.helpers.snapshot import snapshot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_states_the_two_commands_and_ci_runs_the_test_command():
  readme = open(os.path.join(ROOT, 'README.md')).read()
  block = re.search(r'## Two commands\s+```bash\n(.*?)```', readme, re.S).group(1)
  cmds = [line.split('#')[0].strip() for line in block.splitlines() if line.strip()]
  assert cmds == ['bash demo.sh', '.venv/bin/python -m pytest tests']
  ci = open(os.path.join(ROOT, '.ci', 'run')).read()
  assert '\n.venv/bin/python -m pytest tests\n' in ci
  assert 'exec .venv/bin/python -m fmir_jax.demo' in open(os.path.join(ROOT, 'demo.sh')).read()


@pytest.mark.slow
def test_demo_end_to_end_reduced(tmp_path):
  out = str(tmp_path / 'demo')
  res = demo.run(out, patients=6, test_patients=1, steps=3, input_size=32, eval_pairs=2,
                 figures=1, io_steps=2, grid=(32, 32, 16), spacing_mm=(3.6, 3.6, 10.0))
  summary = res['summary']
  # Held-out test pairs of patient 101, both directions, averaged per subject.
  assert summary.n_directed_pairs == 2 and summary.bidirectional_average
  m = summary.metrics
  assert 0.0 < m['initial_dice_mean']['mean'] < 0.95   # the phantoms are misaligned
  assert np.isfinite(m['dice_mean']['mean']) and np.isfinite(m['sdlogj']['mean'])
  for path in summary.files['figures'] + [summary.files['pairs_csv']]:
    assert os.path.getsize(path) > 0
  # The register step wrote its outputs on the raw fixed image's grid.
  reg = res['register_out']
  report = json.load(open(os.path.join(reg, 'report.json')))
  assert {'warped_moving.nii.gz', 'disp_mm.nii.gz', 'warped_moving_labels.nii.gz',
          'report.json'} <= set(os.listdir(reg))
  assert 0.0 <= report['dice']['mean_before'] <= 1.0
  assert 0.0 <= report['dice']['mean_after'] <= 1.0
  assert report['grid']['shape'] == [32, 32, 16]      # the run's (demo reader's) grid
  io_r = report['instance_optimisation']
  assert io_r['steps'][-1] == 2          # --io-steps: the finest scale's steps
  assert io_r['loss_after'][0] < io_r['loss_before'][0]    # the coarse scale's many steps


def test_demo_refuses_a_folder_it_did_not_make_and_keeps_every_file(tmp_path, capsys):
  user = tmp_path / 'mine'
  (user / 'sub').mkdir(parents=True)
  (user / 'notes.txt').write_text('my notes')
  (user / 'sub' / 'data.csv').write_bytes(b'a,b\n1,2\n')
  (user / 'run').mkdir()                        # a name the demo uses, but not its own
  (user / 'run' / 'ckpt.bin').write_bytes(b'\x00\x01')
  (tmp_path / 'afile').write_text('x')
  for out, expect in ((user, 'was not made by the demo'), (tmp_path / 'afile', 'is a file'),
                      (tmp_path / 'afile' / 'out', 'no folder can be made under it')):
    before = snapshot(tmp_path)
    assert demo.main(['--out', str(out), '--smoke']) == 2
    err = capsys.readouterr().err
    assert expect in err and str(out) in err and len(err.strip().splitlines()) == 1, err
    assert snapshot(tmp_path) == before


def test_rerun_removes_only_what_the_earlier_demo_wrote(tmp_path):
  out = tmp_path / 'demo'
  demo.prepare_out(str(out))                    # a new folder: created and marked
  for name in demo.ENTRIES:                     # what a demo run writes
    with demo._stage_writes(str(out), name):
      (out / name).mkdir()
      (out / name / 'x.bin').write_bytes(b'demo')
  (out / 'notes.txt').write_text('added by the user afterwards')
  (out / 'mine').mkdir()
  (out / 'mine' / 'data.csv').write_text('1,2')
  demo.prepare_out(str(out))
  assert snapshot(out) == {demo.MARKER: (out / demo.MARKER).read_bytes(),
                           'notes.txt': b'added by the user afterwards', 'mine': None,
                           os.path.join('mine', 'data.csv'): b'1,2'}
