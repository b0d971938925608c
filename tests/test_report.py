"""Tests for fmir_jax.evaluate.report: files parse back to the numbers written, figures are PNGs."""
from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg

from fmir_jax.core import metrics
from fmir_jax.core import pair_metrics
from fmir_jax.evaluate import report


def _pair(moving, fixed, subject, dice, hd, time_s=0.62):
  classes = (1, 2, 3)
  return pair_metrics.PairMetrics(
      moving=moving, fixed=fixed, subject=subject, classes=classes,
      dice=dict(zip(classes, dice)), dice_mean=metrics.mean_dice(dict(zip(classes, dice))),
      hd95=dict(zip(classes, hd)), hd95_mean=float(np.nanmean(hd)),
      initial_dice=dict(zip(classes, [0.5, 0.6, 0.7])), initial_dice_mean=0.6,
      initial_hd95=dict(zip(classes, [9.0, 10.0, 11.0])), initial_hd95_mean=10.0,
      sdlogj=0.049, std_log_jacdet=0.2, folding_fraction=1e-4, time_s=time_s)


def _parse_markdown(text):
  return [[c.strip() for c in line.strip().strip("|").split("|")]
          for line in text.strip().splitlines()]


# ----------------------------------------------------------------------------- files


def test_pair_csv_round_trips_numbers_ids_and_nan(tmp_path):
  pairs = [_pair("p1_ed", "p1_es", "p1", [0.81234567891, 0.7, math.nan], [3.5, 4.25, math.nan]),
           _pair("p1_es", "p1_ed", "p1", [0.9, 0.65, 0.88], [2.0, 5.0, 7.125])]
  path = tmp_path / "out" / "pairs.csv"
  report.write_pair_csv(path, pairs + [{"moving": "x", "extra": 3}])
  with open(path, newline="") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 3
  assert rows[0]["moving"] == "p1_ed" and rows[1]["fixed"] == "p1_ed"
  assert float(rows[0]["dice_1"]) == 0.81234567891           # full precision
  assert math.isnan(float(rows[0]["dice_3"])) and math.isnan(float(rows[0]["hd95_3"]))
  assert float(rows[1]["hd95_3"]) == 7.125
  assert float(rows[0]["dice_mean"]) == pytest.approx(0.75617283945)
  assert float(rows[1]["initial_hd95_mean"]) == 10.0
  assert rows[0]["extra"] == "" and rows[2]["extra"] == "3" and rows[2]["dice_1"] == ""
  assert [p.name for p in path.parent.iterdir()] == ["pairs.csv"]   # no temp files left
  with pytest.raises(ValueError, match="no rows"):
    report.write_pair_csv(tmp_path / "empty.csv", [])


def test_summary_json_is_strict_and_parses_back(tmp_path):
  pairs = [_pair("a", "b", "s", [0.8, 0.6, math.nan], [3.0, 5.0, math.nan]),
           _pair("c", "d", "t", [0.7, 0.5, math.nan], [4.0, 6.0, math.nan])]
  summary = pair_metrics.aggregate(pairs)
  summary["extra"] = {"array": np.arange(3), "scalar": np.float32(1.5), "flag": np.bool_(1)}
  path = tmp_path / "summary.json"
  report.write_summary_json(path, summary)
  text = path.read_text()
  assert "NaN" not in text
  back = json.loads(text)
  assert back["n_pairs"] == 2
  assert back["metrics"]["dice_mean"]["mean"] == pytest.approx(0.65)
  assert back["metrics"]["dice_mean"]["std"] == pytest.approx(np.std([0.7, 0.6], ddof=1))
  assert back["per_class"]["dice"]["3"] == {"mean": None, "std": None, "n": 0}
  assert back["per_class"]["hd95"]["2"]["mean"] == pytest.approx(5.5)
  assert back["extra"] == {"array": [0, 1, 2], "scalar": 1.5, "flag": True}
  with pytest.raises(TypeError, match="cannot serialise"):
    report.write_summary_json(tmp_path / "bad.json", {"x": object()})
  assert not (tmp_path / "bad.json").exists()


# ----------------------------------------------------------------------------- tables


PAPER_TABLE1 = {  # model: (Dice %, HD95 mm, SDlogJ, time s), SPEC §8
    "VoxelMorph": (75.26, 9.33, 0.044, 0.18),
    "uniGradICON": (78.89, 9.05, 0.049, 4.95),
    "FMIR": (79.82, 9.07, 0.049, 0.62),
    "FMIR(SAM)": (79.72, 9.06, 0.046, 1.79),
}


def test_markdown_table1_reproduces_paper_layout_and_numbers():
  results = {}
  for i, (model, (dice, hd, sdlogj, time_s)) in enumerate(PAPER_TABLE1.items()):
    flat = {"dice_mean": dice / 100, "hd95_mean": hd, "sdlogj": sdlogj, "time_s": time_s,
            "initial_dice_mean": 0.5814, "initial_hd95_mean": 11.95}
    # the first model as an aggregate()-style summary, the rest as flat dicts
    results[model] = ({"metrics": {k: {"mean": v, "std": 0.0} for k, v in flat.items()}}
                      if i == 0 else flat)
  rows = _parse_markdown(report.markdown_table1(results))
  assert rows[0] == ["Model", "Dice (%)", "HD95 (mm)", "SDlogJ", "Time (s)"]
  assert set(rows[1]) == {"---"}
  assert rows[2] == ["Initial", "58.14", "11.95", "-", "-"]
  for row, (model, numbers) in zip(rows[3:], PAPER_TABLE1.items()):
    assert row[0] == model
    assert [float(x) for x in row[1:]] == list(numbers)
  assert rows[5][1:] == ["79.82", "9.07", "0.049", "0.62"]


def test_markdown_table1_from_aggregate_with_missing_time():
  pairs = [_pair("a", "b", "s", [0.8, 0.6, 0.7], [3.0, 5.0, 4.0], time_s=math.nan)]
  rows = _parse_markdown(report.markdown_table1({"ours": pair_metrics.aggregate(pairs)}))
  assert rows[2] == ["Initial", "60.00", "10.00", "-", "-"]
  assert rows[3] == ["ours", "70.00", "4.00", "0.049", "-"]


PAPER_TABLE2 = [  # train, mode, ACDC DINO, ACDC SAM, Abdomen DINO, Abdomen SAM (SPEC §8)
    ("ACDC", "UN", 79.82, 79.72, 40.16, 40.20),
    ("ACDC", "WS", 87.15, 87.19, 37.12, 36.77),
    ("ACDC", "-CR", 79.43, 69.18, 38.90, 34.18),
    ("Abdomen", "UN", 73.34, 73.52, 49.11, 49.04),
    ("Abdomen", "WS", 70.85, 71.33, 56.79, 57.50),
    ("Abdomen", "-CR", 73.14, 70.28, 50.50, 44.24),
    ("Hybrid", "UN", 78.89, 78.88, 50.87, 50.99),
    ("Hybrid", "WS", 76.24, 74.35, 44.52, 42.73),
    ("Hybrid", "-CR", 79.04, 72.75, 50.92, 45.06),
]


def test_markdown_table2_reproduces_paper_table2():
  grid = {}
  for train, mode, *values in PAPER_TABLE2:
    cols = [("ACDC", "DINO"), ("ACDC", "SAM"), ("Abdomen", "DINO"), ("Abdomen", "SAM")]
    for (test, backbone), v in zip(cols, values):
      grid[(train, mode, test, backbone)] = v / 100
  grid[("ACDC", "UN", "Abdomen", "SAM")] = {"metrics": {"dice_mean": {"mean": 0.4020}}}
  rows = _parse_markdown(report.markdown_table2(
      grid, {"ACDC": 0.5814, "Abdomen": {"metrics": {"initial_dice_mean": {"mean": 0.3086}}}}))
  assert rows[0] == ["Train Set", "Mode", "ACDC Dice (%)", "", "Abdomen Dice (%)", ""]
  assert rows[2] == ["", "", "DINO", "SAM", "DINO", "SAM"]
  assert rows[3] == ["Initial", "", "58.14", "", "30.86", ""]
  assert len(rows) == 4 + len(PAPER_TABLE2)
  for row, (train, mode, *values) in zip(rows[4:], PAPER_TABLE2):
    assert row[0] == (train if mode == "UN" else "")
    assert row[1] == mode
    assert row[2:] == [f"{v:.2f}" for v in values]


def test_markdown_table2_missing_cells_and_bad_keys():
  rows = _parse_markdown(report.markdown_table2(
      {("ACDC", "UN", "ACDC", "DINO"): 0.8, ("ACDC", "UN", "Abdomen", "SAM"): 0.4}, {}))
  assert rows[3] == ["Initial", "", "-", "", "-", ""]
  assert rows[4] == ["ACDC", "UN", "80.00", "-", "-", "40.00"]
  with pytest.raises(ValueError, match="train_set, mode, test_set, backbone"):
    report.markdown_table2({("ACDC", "UN"): 0.8}, {})


# ----------------------------------------------------------------------------- figures


def test_deformed_grid_lines_zero_shift_and_linear_fields():
  h, w, step = 9, 7, 3
  lines = report.deformed_grid_lines(np.zeros((h, w, 2)), step)
  assert len(lines) == 3 + 3
  for n, i in enumerate(range(0, h, step)):
    np.testing.assert_array_equal(lines[n], np.stack([np.full(w, i), np.arange(w)], -1))
  for n, j in enumerate(range(0, w, step)):
    np.testing.assert_array_equal(lines[3 + n], np.stack([np.arange(h), np.full(h, j)], -1))
  shifted = report.deformed_grid_lines(np.broadcast_to([0.5, -1.25], (h, w, 2)), step)
  for a, b in zip(shifted, lines):
    np.testing.assert_allclose(a, b + [0.5, -1.25])
  ii = np.arange(h, dtype=float)[:, None] * np.ones((1, w))
  stretch = np.stack([0.2 * ii, np.zeros((h, w))], -1)           # x0 -> 1.2 x0
  for n, i in enumerate(range(0, h, step)):
    np.testing.assert_allclose(report.deformed_grid_lines(stretch, step)[n][:, 0], 1.2 * i)
  with pytest.raises(ValueError, match="step"):
    report.deformed_grid_lines(np.zeros((h, w, 2)), 0)


def _synthetic_pair(shape=(24, 20, 5)):
  ii, jj, kk = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
  fixed = np.exp(-((ii - 12) ** 2 + (jj - 10) ** 2) / 40.0)
  moving = np.exp(-((ii - 10) ** 2 + (jj - 9) ** 2) / 40.0)
  fixed_labels = ((ii - 12) ** 2 + (jj - 10) ** 2 < 25).astype(np.uint8)
  fixed_labels[(ii - 4) ** 2 + (jj - 4) ** 2 < 5] = 2
  fixed_labels[:, :, 3] = 0
  fixed_labels[:, :, 1] = 0
  fixed_labels[3:9, 3:9, 1] = 3
  fixed_labels[16:22, 2:6, 2] = 2               # slice 2 has the most foreground
  moving_labels = ((ii - 10) ** 2 + (jj - 9) ** 2 < 25).astype(np.uint8)
  return fixed, moving, fixed_labels, moving_labels


def _assert_valid_png(path, min_h, min_w):
  img = mpimg.imread(path)
  assert img.ndim == 3 and img.shape[0] >= min_h and img.shape[1] >= min_w
  assert float(img[..., :3].var()) > 0.0
  return img


def test_pair_figure_writes_png_and_draws_a_regular_grid_for_zero_field(tmp_path):
  fixed, moving, fixed_labels, moving_labels = _synthetic_pair()
  disp = np.zeros(fixed.shape + (3,), np.float32)
  path = tmp_path / "pair.png"
  fig = report.pair_figure(path, fixed, moving, moving, fixed_labels, moving_labels,
                           moving_labels, disp, grid_step=4)
  _assert_valid_png(path, 300, 600)
  titles = [ax.get_title() for ax in fig.axes]
  assert titles[0] == "fixed (slice 2)"       # default: most fixed-label foreground
  grid_ax = next(ax for ax in fig.axes if ax.get_title().startswith("grid"))
  expected = report.deformed_grid_lines(np.zeros(fixed.shape[:2] + (2,)), 4)
  assert len(grid_ax.lines) == len(expected) == 6 + 5
  for line, ref in zip(grid_ax.lines, expected):
    np.testing.assert_array_equal(np.stack(line.get_data(), -1), ref)
  jac_ax = next(ax for ax in fig.axes if ax.get_title().startswith("jacobian"))
  np.testing.assert_allclose(jac_ax.images[0].get_array(), 1.0)
  assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)


def test_pair_figure_with_folded_field_and_explicit_slice(tmp_path):
  fixed, moving, fixed_labels, moving_labels = _synthetic_pair()
  disp = np.zeros(fixed.shape + (3,), np.float32)
  disp[10, :, :, 0] = 3.0          # folds plane 11 (J = -0.5), see test_metrics
  disp[..., 1] = 0.5
  fig = report.pair_figure(tmp_path / "p.png", fixed, moving, moving, fixed_labels, None,
                           None, disp, slice_index=2, title="pair")
  _assert_valid_png(tmp_path / "p.png", 300, 600)
  jac_ax = next(ax for ax in fig.axes if ax.get_title().startswith("jacobian"))
  assert jac_ax.get_title().endswith(f"{fixed.shape[1]})")      # one folded row
  grid_ax = next(ax for ax in fig.axes if ax.get_title().startswith("grid"))
  np.testing.assert_allclose(grid_ax.lines[0].get_data()[1], np.arange(20) + 0.5)
  with pytest.raises(ValueError, match="slice_index"):
    report.pair_figure(tmp_path / "q.png", fixed, moving, moving, None, None, None, disp,
                       slice_index=5)
  with pytest.raises(ValueError, match="disp_vox"):
    report.pair_figure(tmp_path / "q.png", fixed, moving, moving, None, None, None,
                       disp[..., :2])
  assert not (tmp_path / "q.png").exists()


def test_dice_boxplot_png_and_nan_handling(tmp_path):
  rng = np.random.default_rng(0)
  per_class = {"RV": rng.uniform(0.6, 0.9, 20), "Myo": rng.uniform(0.5, 0.8, 20),
               "LV": np.r_[rng.uniform(0.8, 0.95, 19), np.nan]}
  report.dice_boxplot(tmp_path / "box.png", per_class)
  _assert_valid_png(tmp_path / "box.png", 200, 200)
  # a class absent from every pair keeps its slot; all absent is an error
  report.dice_boxplot(tmp_path / "absent.png", {"RV": [0.7], "LV": [math.nan]})
  _assert_valid_png(tmp_path / "absent.png", 200, 200)
  with pytest.raises(ValueError, match="no class has a finite"):
    report.dice_boxplot(tmp_path / "bad.png", {"RV": [math.nan], "LV": [math.nan]})
  assert not (tmp_path / "bad.png").exists()


def test_report_module_imports_without_jax_torch_or_pyplot():
  code = ("import sys, fmir_jax.evaluate.report; "
          "bad = [m for m in ('jax', 'torch', 'matplotlib.pyplot') if m in sys.modules]; "
          "sys.exit(1 if bad else 0)")
  assert subprocess.run([sys.executable, "-c", code]).returncode == 0
