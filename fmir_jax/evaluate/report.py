"""Tables (CSV / JSON / Markdown) and figures (PNG) for registration results.

numpy + matplotlib only (no jax). Files are written atomically: to a temporary file in
the target directory, then renamed over the target, so a crashed run never leaves a
half-written report. Figures use matplotlib's object API with an explicit Agg canvas
created inside each function: no pyplot, no global backend switch, nothing kept open.

Units: Dice values come in as fractions in [0, 1] (as `fmir_jax.core.metrics` returns them)
and are shown in % with 2 decimals, HD95 in mm (2 decimals), SDlogJ with 3 decimals,
time in seconds (2 decimals), as in the paper's Tables 1 and 2. Missing values print "-".
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from fmir_jax.core import files
from fmir_jax.core import jsonio
from fmir_jax.core import metrics as metrics_lib
from fmir_jax.core import pair_metrics

PathLike = str | os.PathLike


# --------------------------------------------------------------------------- files


def _write_text(path: PathLike, text: str) -> None:
  with files.atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8", newline="") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())


def _cell(value: Any) -> str:
  """CSV cell: floats with round-trip precision ("nan" for NaN), others as str."""
  if isinstance(value, (bool, np.bool_)):
    return str(bool(value))
  if isinstance(value, (float, np.floating)):
    return repr(float(value))
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  return "" if value is None else str(value)


def write_pair_csv(path: PathLike,
                   rows: Sequence[Mapping[str, Any] | pair_metrics.PairMetrics]) -> None:
  """One CSV line per pair. ``rows`` are mappings or `PairMetrics` (via ``to_row()``).

  Columns are the union of the rows' keys in first-seen order; a key missing from a row
  leaves its cell empty. Floats are written with full precision (``repr``), NaN as "nan".
  """
  if not rows:
    raise ValueError(f"write_pair_csv({path}): no rows to write.")
  dict_rows = [r.to_row() if isinstance(r, pair_metrics.PairMetrics) else dict(r)
               for r in rows]
  columns: dict[str, None] = {}
  for r in dict_rows:
    columns.update(dict.fromkeys(r))
  lines = [list(columns)] + [[_cell(r.get(c)) for c in columns] for r in dict_rows]
  with files.atomic_path(path) as tmp:
    with open(tmp, "w", encoding="utf-8", newline="") as f:
      csv.writer(f, lineterminator="\n").writerows(lines)


def _jsonable(value: Any) -> Any:
  """numpy -> python, NaN/inf -> None (strict JSON), tuples -> lists, keys -> str."""
  try:
    return jsonio.plain(value, finite_only=False)
  except jsonio.Unsupported as e:
    raise TypeError(f"write_summary_json: cannot serialise {type(e.args[0]).__name__} "
                    f"({e.args[0]!r}); convert it to numbers/strings first.") from None


def write_summary_json(path: PathLike, summary: Mapping[str, Any]) -> None:
  """Writes a summary (e.g. `pair_metrics.aggregate` output) as strict JSON (NaN -> null)."""
  _write_text(path, json.dumps(_jsonable(summary), indent=2, allow_nan=False) + "\n")


# --------------------------------------------------------------------------- Markdown


def _fmt(value: float | None, scale: float = 1.0, decimals: int = 2) -> str:
  if value is None or not math.isfinite(float(value)):
    return "-"
  return f"{float(value) * scale:.{decimals}f}"


def _mean_of(summary: Mapping[str, Any] | float | None, name: str) -> float | None:
  """Mean of metric ``name`` from an `aggregate` summary, a flat dict, or a number."""
  if summary is None or isinstance(summary, (int, float, np.number)):
    return None if summary is None else float(summary)
  node = summary.get("metrics", summary).get(name)
  if isinstance(node, Mapping):
    node = node.get("mean")
  return None if node is None else float(node)


def _row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


TABLE1_HEADER = ("Model", "Dice (%)", "HD95 (mm)", "SDlogJ", "Time (s)")


def markdown_table1(results: Mapping[str, Mapping[str, Any]],
                    initial: Mapping[str, Any] | None = None) -> str:
  """Paper Table 1 layout: Model | Dice (%) | HD95 (mm) | SDlogJ | Time (s).

  Args:
    results: model name -> `pair_metrics.aggregate` summary (or a flat mapping with keys
      ``dice_mean``, ``hd95_mean``, ``sdlogj``, ``time_s``; values are numbers or
      ``{"mean": ...}``), in row order. Dice as a fraction.
    initial: summary for the "Initial" row (identity transform); by default the
      ``initial_dice_mean`` / ``initial_hd95_mean`` of the first result.
  Returns: the Markdown table, first row "Initial" (SDlogJ and time "-").
  """
  if not results:
    raise ValueError("markdown_table1: results is empty.")
  first = next(iter(results.values()))
  if initial is None:
    init_dice = _mean_of(first, "initial_dice_mean")
    init_hd = _mean_of(first, "initial_hd95_mean")
  else:
    init_dice = _mean_of(initial, "dice_mean")
    init_hd = _mean_of(initial, "hd95_mean")
  lines = [_row(TABLE1_HEADER), _row(["---"] * len(TABLE1_HEADER)),
           _row(["Initial", _fmt(init_dice, 100.0), _fmt(init_hd), "-", "-"])]
  for model, summary in results.items():
    lines.append(_row([str(model),
                       _fmt(_mean_of(summary, "dice_mean"), 100.0),
                       _fmt(_mean_of(summary, "hd95_mean")),
                       _fmt(_mean_of(summary, "sdlogj"), decimals=3),
                       _fmt(_mean_of(summary, "time_s"))]))
  return "\n".join(lines) + "\n"


def _ordered(values: Sequence[str]) -> list[str]:
  return list(dict.fromkeys(values))


def markdown_table2(grid: Mapping[tuple[str, str, str, str], Any],
                    initial: Mapping[str, Any]) -> str:
  """Paper Table 2 layout: (train set x mode) rows, (test set x backbone) columns.

  Args:
    grid: (train_set, mode, test_set, backbone) -> Dice (fraction, or an `aggregate`
      summary whose ``dice_mean`` is used), e.g. ("ACDC", "UN", "Abdomen", "SAM").
      Rows, columns and their order follow first appearance in ``grid``.
    initial: test_set -> initial Dice (fraction or summary with ``initial_dice_mean``).
  Returns: Markdown with a spanning test-set header, a backbone sub-header row, an
    "Initial" row (value under each test set's first backbone), then one row per
    (train set, mode) with the train set named on its first mode only; missing cells "-".
  """
  if not grid:
    raise ValueError("markdown_table2: grid is empty.")
  for key in grid:
    if not (isinstance(key, tuple) and len(key) == 4):
      raise ValueError(f"markdown_table2: grid keys must be (train_set, mode, test_set, "
                       f"backbone) tuples, got {key!r}.")
  trains = _ordered([k[0] for k in grid])
  modes = _ordered([k[1] for k in grid])
  tests = _ordered([k[2] for k in grid])
  backbones = _ordered([k[3] for k in grid])
  header = ["Train Set", "Mode"]
  sub = ["", ""]
  init = ["Initial", ""]
  for test in tests:
    header += [f"{test} Dice (%)"] + [""] * (len(backbones) - 1)
    sub += list(backbones)
    value = initial.get(test)
    if isinstance(value, Mapping):
      value = _mean_of(value, "initial_dice_mean")
    init += [_fmt(value, 100.0)] + [""] * (len(backbones) - 1)
  lines = [_row(header), _row(["---"] * len(header)), _row(sub), _row(init)]
  for train in trains:
    train_modes = [m for m in modes if any(k[0] == train and k[1] == m for k in grid)]
    for i, mode in enumerate(train_modes):
      cells = [train if i == 0 else "", mode]
      for test in tests:
        for backbone in backbones:
          cells.append(_fmt(_mean_of(grid.get((train, mode, test, backbone)),
                                     "dice_mean"), 100.0))
      lines.append(_row(cells))
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- figures


def _new_figure(**kwargs):
  """A matplotlib Figure bound to an Agg canvas (no pyplot state)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(**kwargs)
  FigureCanvasAgg(fig)
  return fig


def _save_png(fig, path: PathLike) -> None:
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, format="png")


def deformed_grid_lines(disp2d: np.ndarray, step: int) -> list[np.ndarray]:
  """Polylines of a regular grid moved by an in-plane displacement.

  Args:
    disp2d: (H, W, 2) in-plane displacement in voxels, component k along axis k.
    step: grid spacing in voxels (>= 1).
  Returns: list of (n, 2) arrays of points (axis-0 coordinate, axis-1 coordinate) in
    voxels: first the lines of constant axis-0 index i = 0, step, ... (n = W points
    (i + u0[i, j], j + u1[i, j])), then the lines of constant axis-1 index j (n = H).
    A zero field gives the regular grid.
  """
  disp2d = np.asarray(disp2d, dtype=np.float64)
  if disp2d.ndim != 3 or disp2d.shape[-1] != 2:
    raise ValueError(f"deformed_grid_lines: disp2d must be (H, W, 2), got {disp2d.shape}.")
  if int(step) != step or step < 1:
    raise ValueError(f"deformed_grid_lines: step must be a positive integer, got {step!r}.")
  step = int(step)
  h, w = disp2d.shape[:2]
  ii, jj = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64),
                       indexing="ij")
  pts = np.stack([ii + disp2d[..., 0], jj + disp2d[..., 1]], axis=-1)
  return [pts[i] for i in range(0, h, step)] + [pts[:, j] for j in range(0, w, step)]


def _check_volume(name: str, vol: np.ndarray | None, shape: tuple[int, ...] | None,
                  allow_none: bool = False) -> np.ndarray | None:
  if vol is None:
    if allow_none:
      return None
    raise ValueError(f"pair_figure: {name} is None.")
  vol = np.asarray(vol)
  if vol.ndim != 3 or (shape is not None and vol.shape != shape):
    want = "(H, W, D)" if shape is None else str(shape)
    raise ValueError(f"pair_figure: {name} must have shape {want}, got {vol.shape}.")
  return vol


def default_slice_index(fixed_labels: np.ndarray | None, depth: int) -> int:
  """Slice (last axis) with the most fixed-label foreground; the middle one otherwise."""
  if fixed_labels is not None:
    counts = (np.asarray(fixed_labels) > 0).sum(axis=(0, 1))
    if counts.max() > 0:
      return int(np.argmax(counts))
  return depth // 2


def _show(ax, img2d: np.ndarray, title: str, **kwargs):
  # (H, W) slice drawn with axis 0 horizontal and axis 1 vertical, voxel centres at
  # integer coordinates, so overlays use the same (axis 0, axis 1) coordinates.
  kwargs.setdefault("cmap", "gray")
  im = ax.imshow(img2d.T, origin="lower", interpolation="nearest", **kwargs)
  ax.set_title(title, fontsize=9)
  ax.set_xticks([])
  ax.set_yticks([])
  return im


def _contours(ax, labels2d: np.ndarray | None, classes: Sequence[int],
              linestyle: str) -> None:
  if labels2d is None:
    return
  import matplotlib
  colors = matplotlib.colormaps["tab10"]
  for n, c in enumerate(classes):
    mask = (labels2d == c)
    if mask.any() and not mask.all():   # a contour exists only between 0 and 1
      # no X/Y and origin=None: Z[0, 0] sits at (0, 0), the voxel centre `_show` uses
      ax.contour(mask.T.astype(np.float32), levels=[0.5], colors=[colors(n % 10)],
                 linewidths=1.2, linestyles=linestyle)


def pair_figure(path: PathLike, fixed: np.ndarray, moving: np.ndarray,
                warped: np.ndarray, fixed_labels: np.ndarray | None,
                moving_labels: np.ndarray | None, warped_labels: np.ndarray | None,
                disp_vox: np.ndarray, slice_index: int | None = None, *,
                grid_step: int | None = None, title: str = ""):
  """PNG summary of one registered pair, on one slice of the last (slice) axis.

  Panels: fixed / moving / warped images with their label contours; label contours
  before (fixed solid, moving dashed) and after (fixed solid, warped dashed) on the fixed
  image; the deformation grid (`deformed_grid_lines` of the in-plane components u0, u1 of
  ``disp_vox``) over the moving image; and det(I + ∇u) (`metrics.jacobian_determinant`,
  full 3D) with a colorbar centred at 1.

  Args:
    path: PNG file to write.
    fixed, moving, warped: (H, W, D) images. *_labels: (H, W, D) int or None.
    disp_vox: (H, W, D, 3) displacement in voxels on the fixed grid.
    slice_index: index along the last axis; default `default_slice_index`.
    grid_step: grid spacing in voxels; default max(1, min(H, W) // 16).
  Returns: the matplotlib Figure (Agg canvas, not registered with pyplot), for
    inspection; axes titles start with "fixed", "moving", "warped", "before", "after",
    "grid", "jacobian".
  """
  from matplotlib.colors import TwoSlopeNorm
  fixed = _check_volume("fixed", fixed, None)
  shape = fixed.shape
  moving = _check_volume("moving", moving, shape)
  warped = _check_volume("warped", warped, shape)
  fixed_labels = _check_volume("fixed_labels", fixed_labels, shape, allow_none=True)
  moving_labels = _check_volume("moving_labels", moving_labels, shape, allow_none=True)
  warped_labels = _check_volume("warped_labels", warped_labels, shape, allow_none=True)
  disp = np.asarray(disp_vox)
  if disp.shape != shape + (3,):
    raise ValueError(f"pair_figure: disp_vox must have shape {shape + (3,)}, got "
                     f"{disp.shape}.")
  k = default_slice_index(fixed_labels, shape[2]) if slice_index is None else slice_index
  if not 0 <= int(k) < shape[2]:
    raise ValueError(f"pair_figure: slice_index {slice_index} outside [0, {shape[2]}).")
  k = int(k)
  step = grid_step if grid_step is not None else max(1, min(shape[:2]) // 16)
  label_vols = [v for v in (fixed_labels, moving_labels, warped_labels) if v is not None]
  classes = sorted({int(c) for v in label_vols for c in np.unique(v[:, :, k]) if c > 0})
  sl = lambda v: None if v is None else v[:, :, k]
  jac_det = metrics_lib.jacobian_determinant(disp)[:, :, k]

  images = [sl(v).astype(np.float64) for v in (fixed, moving, warped)]
  grey = {"vmin": min(float(v.min()) for v in images),
          "vmax": max(float(v.max()) for v in images)}   # one intensity scale
  diff = images[0] - images[2]
  diff_max = max(float(np.abs(diff).max()), 1e-12)

  fig = _new_figure(figsize=(16, 8.4), dpi=80, layout="constrained")
  axes = fig.subplots(2, 4)
  _show(axes[0, 0], images[0], f"fixed (slice {k})", **grey)
  _contours(axes[0, 0], sl(fixed_labels), classes, "solid")
  _show(axes[0, 1], images[1], "moving", **grey)
  _contours(axes[0, 1], sl(moving_labels), classes, "solid")
  _show(axes[0, 2], images[2], "warped moving", **grey)
  _contours(axes[0, 2], sl(warped_labels), classes, "solid")
  _show(axes[0, 3], images[1], f"grid: x + u(x), step {step} vox, on moving", **grey)
  for line in deformed_grid_lines(disp[:, :, k, :2], step):
    axes[0, 3].plot(line[:, 0], line[:, 1], color="yellow", linewidth=0.8)
  axes[0, 3].set_xlim(-0.5, shape[0] - 0.5)      # keep the image frame; clip the grid
  axes[0, 3].set_ylim(-0.5, shape[1] - 0.5)
  _show(axes[1, 0], images[0], "before: fixed (solid) vs moving (dashed)", **grey)
  _contours(axes[1, 0], sl(fixed_labels), classes, "solid")
  _contours(axes[1, 0], sl(moving_labels), classes, "dashed")
  _show(axes[1, 1], images[0], "after: fixed (solid) vs warped (dashed)", **grey)
  _contours(axes[1, 1], sl(fixed_labels), classes, "solid")
  _contours(axes[1, 1], sl(warped_labels), classes, "dashed")
  _show(axes[1, 2], diff, "fixed - warped", cmap="RdBu_r", vmin=-diff_max, vmax=diff_max)
  lo, hi = float(jac_det.min()), float(jac_det.max())
  norm = TwoSlopeNorm(vcenter=1.0, vmin=min(lo, 1.0 - 1e-3), vmax=max(hi, 1.0 + 1e-3))
  im = _show(axes[1, 3], jac_det,
             f"jacobian det (folded in slice: {int((jac_det <= 0).sum())})",
             cmap="RdBu_r", norm=norm)
  fig.colorbar(im, ax=axes[1, 3], shrink=0.8)
  if title:
    fig.suptitle(title)
  _save_png(fig, path)
  return fig


def dice_boxplot(path: PathLike, per_class_dice: Mapping[str, Sequence[float]], *,
                 title: str = "Dice per class"):
  """Box plot of per-pair Dice (fractions, drawn in %) per class name.

  NaN entries (class not scored in that pair) are left out of that class's box; a class
  with no finite value at all (absent from every pair) keeps its slot, labelled
  "(absent)"; all classes absent is an error. Returns the Figure (Agg canvas).
  """
  if not per_class_dice:
    raise ValueError(f"dice_boxplot({path}): per_class_dice is empty.")
  names, data = [], []
  for name, values in per_class_dice.items():
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    arr = arr[~np.isnan(arr)]
    names.append(str(name) if arr.size else f"{name}\n(absent)")
    data.append(arr * 100.0)
  if not any(d.size for d in data):
    raise ValueError(f"dice_boxplot({path}): no class has a finite Dice value.")
  fig = _new_figure(figsize=(max(4.0, 1.2 * len(names) + 2.0), 4.0), dpi=100,
                    layout="constrained")
  ax = fig.subplots()
  ax.boxplot(data, tick_labels=names, showmeans=True)
  ax.set_ylabel("Dice (%)")
  ax.set_title(title)
  ax.grid(axis="y", alpha=0.3)
  _save_png(fig, path)
  return fig


def tensorboard_scalars(path: PathLike) -> dict[str, dict[int, tuple[float, float]]]:
  """{tag: {step: (wall time, value)}} of a TensorBoard event file, or of every event file
  of a folder (a run's ``tb/``), read with the TFRecord framing (length, crc, data, crc) and
  tensorboardX's Event proto; a torn last record (a killed writer) is ignored."""
  import glob
  import struct
  from tensorboardX.proto import event_pb2
  path = os.fspath(path)
  paths = sorted(glob.glob(os.path.join(path, '*'))) if os.path.isdir(path) else [path]
  out: dict[str, dict[int, tuple[float, float]]] = {}
  for p in paths:
    with open(p, 'rb') as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack('<Q', data[pos:pos + 8])
      if pos + 12 + n + 4 > len(data):
        break
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      for v in event.summary.value:
        out.setdefault(v.tag, {})[event.step] = (event.wall_time, v.simple_value)
      pos += 12 + n + 4
  return out
