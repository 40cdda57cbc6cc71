"""Figures and tables for the pipeline's report.

Pure helpers: each plotting function validates its inputs (raising
``ValueError`` that names the offending argument), draws one matplotlib figure
with the Agg canvas (no pyplot, no global state), writes it as a PNG atomically
(``atomic.write_atomic``) and returns ``path`` as a string.
The PNG carries no software/version metadata, so the same inputs give the same
bytes.

Conventions: images are uint8 ``[N, H, W, C]`` with ``C`` in {1, 3}; SIS masks
are bool ``[N, H, W]`` (True = pixel kept); confidences are floats in [0, 1];
along backward selection, column ``j`` of a ``[N, d]`` array is the state after
``j + 1`` of ``d`` removal steps, drawn at x = (j + 1) / d (fraction of pixels
removed). A label whose array has zero images (``N = 0``) is listed in the
legend but draws nothing; an empty dict is an error.
"""
from __future__ import annotations

import io
import math
import os
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from numpy.typing import ArrayLike

from overinterp_jax.store import atomic


DPI = 120
PANEL_INCHES = 1.6
# Test images (a seeded sample) whose backselect curves the stages' figures draw.
FIGURE_SAMPLE = 1000
_KINDS = {
    "bool": (lambda dt: dt == np.bool_, "bool"),
    "uint8": (lambda dt: dt == np.uint8, "uint8"),
    "int": (lambda dt: np.issubdtype(dt, np.integer), "an integer dtype"),
    "float": (lambda dt: np.issubdtype(dt, np.floating), "a floating dtype"),
}


def _array(name: str, x: ArrayLike, *, ndim: int, kind: str) -> np.ndarray:
  """``x`` as a numpy array, checked for ``ndim`` dims and dtype ``kind``."""
  arr = np.asarray(x)
  if arr.ndim != ndim:
    raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
  accepts, description = _KINDS[kind]
  if not accepts(arr.dtype):
    raise ValueError(f"{name} must have {description}, got {arr.dtype}")
  if kind == "float" and not np.all(np.isfinite(arr)):
    raise ValueError(f"{name} contains non-finite values")
  return arr


def _nonempty_dict(name: str, d: Mapping) -> Mapping:
  if not isinstance(d, Mapping):
    raise ValueError(f"{name} must be a dict, got {type(d).__name__}")
  if not d:
    raise ValueError(f"{name} is empty")
  return d


def _same_keys(name_a: str, a: Mapping, name_b: str, b: Mapping) -> None:
  if set(a) != set(b):
    raise ValueError(f"{name_a} and {name_b} must have the same keys, got "
                     f"{sorted(map(str, a))} and {sorted(map(str, b))}")


def _float_rows(name: str, d: Mapping, *, ndim: int) -> dict:
  """Each value of ``d`` as a float array of ``ndim`` dims.

  Zero rows (``N = 0``) are allowed: that label is listed but draws nothing.
  """
  out = {}
  for key, value in _nonempty_dict(name, d).items():
    arr = _array(f"{name}[{key!r}]", value, ndim=ndim, kind="float")
    if ndim == 2 and arr.shape[1] == 0:
      raise ValueError(f"{name}[{key!r}] has no removal steps (shape {arr.shape})")
    out[key] = arr.astype(np.float64)
  return out


def _check_unit_interval(name: str, arr: np.ndarray) -> None:
  if arr.size and (arr.min() < 0 or arr.max() > 1):
    raise ValueError(f"{name} must lie in [0, 1], got range [{arr.min():g}, {arr.max():g}]")


def _check_threshold(threshold: float | None) -> None:
  if threshold is not None and not math.isfinite(threshold):
    raise ValueError(f"threshold must be finite, got {threshold}")


def _with_median(label, values: np.ndarray, unit: str = "") -> str:
  """Legend text: ``label (median M<unit>)``, or ``label (n = 0)`` when empty."""
  if values.size == 0:
    return f"{label} (n = 0)"
  return f"{label} (median {np.median(values):.3g}{unit})"


def _new_figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str | os.PathLike) -> str:
  """Writes ``fig`` to ``path`` as PNG atomically; returns ``path`` as a string. The PNG
  is rendered in memory first, so the temporary file of ``atomic.write_atomic`` is
  open only while the finished bytes are written (a kill while rendering leaves none)."""
  path = os.fspath(path)
  buffer = io.BytesIO()
  try:
    fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
  finally:
    fig.clear()
  atomic.write_atomic(path, lambda fh: fh.write(buffer.getvalue()), binary=True)
  return path


def _integer_counts(ax) -> None:
  """The y-axis of a histogram of counts: from 0 (at least to 1, when nothing is drawn),
  whole-number ticks only (no "2.5 images")."""
  ax.set_ylim(0, max(1.0, ax.get_ylim()[1]))
  ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _padded_range(arrays: Sequence[np.ndarray], margin: float = 0.05) -> tuple[float, float]:
  """y-limits from the smallest to the largest value of ``arrays`` plus ``margin`` on each
  side, so a curve at the data's extreme (e.g. 1.0) is not hidden by the frame; (0, 1)
  when there are no values."""
  values = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.zeros(0)
  if values.size == 0:
    return 0.0, 1.0
  return float(values.min()) - margin, float(values.max()) + margin


def _steps_x(d: int) -> np.ndarray:
  """x positions (fraction of pixels removed) of ``d`` removal steps: ``[d]``."""
  return np.arange(1, d + 1) / d


def _show_image(ax, image: np.ndarray) -> None:
  """Shows a uint8 ``[H, W, C]`` image without ticks."""
  if image.shape[-1] == 1:
    ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
  else:
    ax.imshow(image, interpolation="nearest")
  ax.set_xticks([])
  ax.set_yticks([])


def _grid_masks(masks_by_model: Mapping[str, ArrayLike], shape: tuple[int, int, int]) -> dict:
  """Each model's mask as bool ``shape`` = ``[N, H, W]``, checked against the images."""
  masks = {}
  for model, mask in _nonempty_dict("masks_by_model", masks_by_model).items():
    name = f"masks_by_model[{model!r}]"
    mask = _array(name, mask, ndim=3, kind="bool")
    if mask.shape != shape:
      raise ValueError(f"{name} must have shape {shape} to match images, got {mask.shape}")
    masks[model] = mask
  return masks


def _grid_exists(exists_by_model: Mapping[str, ArrayLike] | None, masks: Mapping,
                 n_total: int) -> dict:
  """model -> bool ``[N]``, True where the image has an SIS (all True where not listed)."""
  exists = {model: np.ones(n_total, bool) for model in masks}
  for model, flags in (exists_by_model or {}).items():
    name = f"exists_by_model[{model!r}]"
    if model not in masks:
      raise ValueError(f"{name}: {model!r} is not a key of masks_by_model")
    flags = _array(name, flags, ndim=1, kind="bool")
    if flags.shape != (n_total,):
      raise ValueError(f"{name} must have shape {(n_total,)}, got {flags.shape}")
    exists[model] = flags
  return exists


def _grid_background(background: ArrayLike | None, channels: int) -> np.ndarray:
  """The uint8 ``[C]`` colour of pixels outside the SIS (mid-gray 128 when None)."""
  if background is None:
    return np.full(channels, 128, np.uint8)
  background = _array("background", background, ndim=1, kind="int")
  if background.shape != (channels,):
    raise ValueError(f"background must have shape {(channels,)}, got {background.shape}")
  if background.min() < 0 or background.max() > 255:
    raise ValueError(f"background must lie in [0, 255], got {background.tolist()}")
  return background.astype(np.uint8)


def _draw_grid(fig: Figure, images: np.ndarray, masks: Mapping[str, np.ndarray],
               exists: Mapping[str, np.ndarray], background: np.ndarray,
               titles: list | None) -> None:
  """Draws the rows of ``sis_grid`` (one per image of ``images``, uint8 ``[n, H, W, C]``)
  on ``fig``: the original, then each model's SIS on ``background`` or "no SIS"."""
  n, height, width, channels = images.shape
  axes = fig.subplots(n, 1 + len(masks), squeeze=False)
  blank = np.broadcast_to(background, (height, width, channels))
  for i in range(n):
    _show_image(axes[i, 0], images[i])
    if titles is not None:
      axes[i, 0].set_ylabel(str(titles[i]), fontsize=7)
    for col, model in enumerate(masks, start=1):
      ax = axes[i, col]
      if exists[model][i]:
        _show_image(ax, np.where(masks[model][i][..., None], images[i], blank))
      else:
        _show_image(ax, blank)
        ax.text(0.5, 0.5, "no SIS", transform=ax.transAxes, ha="center", va="center",
                fontsize=8)
  axes[0, 0].set_title("image", fontsize=8)
  for col, model in enumerate(masks, start=1):
    axes[0, col].set_title(str(model), fontsize=8)


def sis_grid(path: str | os.PathLike, images: ArrayLike,
             masks_by_model: Mapping[str, ArrayLike], *,
             titles: Sequence[str] | None = None,
             background: ArrayLike | None = None,
             exists_by_model: Mapping[str, ArrayLike] | None = None,
             max_images: int = 8) -> str:
  """Grid of images and their SIS on a plain background (the paper's Figure 1).

  Args:
    path: output PNG.
    images: uint8 ``[N, H, W, C]``, ``C`` in {1, 3}.
    masks_by_model: model name -> bool ``[N, H, W]``, True = pixel in that
      model's SIS.
    titles: ``N`` row labels (e.g. ``"cat 0.998 | 41 px"``), or None.
    background: uint8-valued ``[C]`` colour of pixels outside the SIS
      (default mid-gray 128).
    exists_by_model: optional model name -> bool ``[N]``; where False the
      image has no SIS for that model and its panel is all background with
      the text "no SIS". Models not listed have an SIS for every image.
    max_images: rows drawn: the first ``min(N, max_images)`` images.

  One row per image: column 0 the original, then one column per model. Each panel
  is at least as many figure pixels as the image has (full resolution at ``DPI``).
  """
  images = _array("images", images, ndim=4, kind="uint8")
  n_total, height, width, channels = images.shape
  if n_total == 0:
    raise ValueError("images is empty")
  if channels not in (1, 3):
    raise ValueError(f"images must have 1 or 3 channels, got shape {images.shape}")
  if not isinstance(max_images, int) or max_images < 1:
    raise ValueError(f"max_images must be a positive int, got {max_images!r}")
  masks = _grid_masks(masks_by_model, (n_total, height, width))
  exists = _grid_exists(exists_by_model, masks, n_total)
  background = _grid_background(background, channels)
  if titles is not None:
    titles = list(titles)
    if len(titles) != n_total:
      raise ValueError(f"titles must have {n_total} entries (one per image), got {len(titles)}")

  n = min(n_total, max_images)
  panel = max(PANEL_INCHES, 1.1 * max(height, width) / DPI)
  fig = _new_figure(panel * (1 + len(masks)) + (1.0 if titles else 0.0), panel * n + 0.3)
  _draw_grid(fig, images[:n], masks, exists, background, titles)
  return _save(fig, path)


def position_heatmaps(path: str | os.PathLike, frequencies: Mapping[str, ArrayLike], *,
                      band: int = 0) -> str:
  """How often each pixel position is kept, one panel per label.

  Args:
    path: output PNG.
    frequencies: label -> float ``[H, W]`` fraction of images keeping each position
      (in [0, 1]).
    band: width (pixels) of the outer band outlined on each panel; 0 = none.
  """
  maps = {}
  for label, value in _nonempty_dict("frequencies", frequencies).items():
    arr = _array(f"frequencies[{label!r}]", value, ndim=2, kind="float")
    _check_unit_interval(f"frequencies[{label!r}]", arr)
    maps[label] = arr
  height, width = next(iter(maps.values())).shape
  panel = max(2.5, 1.1 * max(height, width) / DPI)
  fig = _new_figure(panel * len(maps) + 0.8, panel + 0.5)
  axes = fig.subplots(1, len(maps), squeeze=False)[0]
  top = max(float(m.max()) for m in maps.values()) or 1.0
  for ax, (label, m) in zip(axes, maps.items()):
    im = ax.imshow(m, cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
    if band:
      ax.add_patch(Rectangle((band - 0.5, band - 0.5), width - 2 * band, height - 2 * band,
                             fill=False, edgecolor="white", linestyle="--", linewidth=0.8))
    ax.set_title(str(label), fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(im, ax=list(axes), shrink=0.8, label="fraction of images keeping the pixel")
  return _save(fig, path)


def confidence_curves(path: str | os.PathLike, curves: Mapping[str, ArrayLike], *,
                      xlabel: str = "fraction of pixels removed",
                      ylabel: str = "target-class confidence",
                      threshold: float | None = None) -> str:
  """Confidence along backward selection: median and 25-75% band per label.

  Args:
    path: output PNG.
    curves: label -> float ``[N, d]``; row i is image i's target-class
      confidence (in [0, 1]) after each of ``d`` removal steps, drawn at
      x = (j + 1) / d. ``d`` may differ between labels.
    threshold: optional confidence drawn as a dashed horizontal line.
  """
  curves = _float_rows("curves", curves, ndim=2)
  _check_threshold(threshold)
  fig = _new_figure(5.0, 3.5)
  ax = fig.subplots()
  for label, values in curves.items():
    if len(values) == 0:
      ax.plot([], [], label=f"{label} (n = 0)")
      continue
    x = _steps_x(values.shape[1])
    q25, median, q75 = np.percentile(values, [25, 50, 75], axis=0)
    (line,) = ax.plot(x, median, label=f"{label} (n = {values.shape[0]:,})")
    ax.fill_between(x, q25, q75, color=line.get_color(), alpha=0.25, linewidth=0)
  if threshold is not None:
    ax.axhline(threshold, color="k", linestyle="--", linewidth=1,
               label=f"threshold {threshold:g}")
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel=xlabel, ylabel=ylabel)
  ax.legend(fontsize=8)
  return _save(fig, path)


def _histogram_upper(max_percent: float) -> float:
  """Smallest of 1, 2, 5, 10, 20, 50, 100 (%) that is >= ``max_percent``."""
  for upper in (1, 2, 5, 10, 20, 50, 100):
    if max_percent <= upper:
      return float(upper)
  return 100.0


def size_histograms(path: str | os.PathLike, sizes: Mapping[str, ArrayLike], *,
                    num_features: int,
                    xlabel: str = "SIS size (% of pixels)") -> str:
  """Overlaid histograms of SIS sizes as a percentage of the input's features.

  Args:
    path: output PNG.
    sizes: label -> int ``[N]`` SIS sizes in features, each in
      [0, num_features].
    num_features: features per input (e.g. H * W pixels).

  Bins are shared: 40 from 0 to the smallest of 1, 2, 5, 10, 20, 50, 100 (%)
  covering the largest size. The legend gives each label's median (%).
  """
  if not isinstance(num_features, (int, np.integer)) or num_features < 1:
    raise ValueError(f"num_features must be a positive int, got {num_features!r}")
  percents = {}
  for label, value in _nonempty_dict("sizes", sizes).items():
    name = f"sizes[{label!r}]"
    arr = _array(name, value, ndim=1, kind="int")
    if arr.size and (arr.min() < 0 or arr.max() > num_features):
      raise ValueError(f"{name} must lie in [0, num_features={num_features}], got range "
                       f"[{arr.min()}, {arr.max()}]")
    percents[label] = 100.0 * arr / num_features
  upper = _histogram_upper(max((p.max() for p in percents.values() if p.size), default=100.0))
  bins = np.linspace(0, upper, 41)
  fig = _new_figure(5.0, 3.5)
  ax = fig.subplots()
  for label, p in percents.items():
    ax.hist(p, bins=bins, alpha=0.5, label=_with_median(label, p, "%"))
  ax.set(xlim=(0, upper), xlabel=xlabel, ylabel="images")
  _integer_counts(ax)
  ax.legend(fontsize=8)
  return _save(fig, path)


def paired_confidence(path: str | os.PathLike, before: Mapping[str, ArrayLike],
                      after: Mapping[str, ArrayLike], *,
                      labels: tuple[str, str] = ("SIS", "dilated SIS"),
                      threshold: float | None = None, title: str = "") -> str:
  """Per name, overlaid histograms of confidences before vs after a change.

  Args:
    path: output PNG.
    before, after: name -> float ``[N]`` confidences in [0, 1]; same names,
      and the same ``N`` per name (paired by image).
    labels: legend entries for ``before`` and ``after``.
    threshold: optional confidence drawn as a dashed vertical line.
    title: optional figure title.

  One panel per name; 20 bins over [0, 1]; the legend gives medians.
  """
  before = _float_rows("before", before, ndim=1)
  after = _float_rows("after", after, ndim=1)
  _same_keys("before", before, "after", after)
  if len(labels) != 2:
    raise ValueError(f"labels must have 2 entries, got {len(labels)}")
  _check_threshold(threshold)
  for name in before:
    if before[name].shape != after[name].shape:
      raise ValueError(f"before[{name!r}] and after[{name!r}] must have the same shape, got "
                       f"{before[name].shape} and {after[name].shape}")
    _check_unit_interval(f"before[{name!r}]", before[name])
    _check_unit_interval(f"after[{name!r}]", after[name])
  bins = np.linspace(0, 1, 21)
  fig = _new_figure(3.2 * len(before), 3.0 + (0.3 if title else 0.0))
  axes = fig.subplots(1, len(before), squeeze=False)[0]
  for ax, name in zip(axes, before):
    for values, label in ((before[name], labels[0]), (after[name], labels[1])):
      ax.hist(values, bins=bins, alpha=0.5, label=_with_median(label, values))
    if threshold is not None:
      ax.axvline(threshold, color="k", linestyle="--", linewidth=1)
    ax.set(xlim=(0, 1), xlabel="confidence")
    ax.set_title(str(name), fontsize=9)
    _integer_counts(ax)
    ax.legend(fontsize=7)
  axes[0].set_ylabel("images")
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def rise_curves(path: str | os.PathLike, values: Mapping[str, ArrayLike],
                original: Mapping[str, ArrayLike], *,
                label_by: Mapping[str, str] | None = None) -> str:
  """Fraction of images whose confidence has risen above the full-image value.

  Args:
    path: output PNG.
    values: label -> float ``[N, d]`` confidences after each of ``d`` removal
      steps of backward selection.
    original: label -> float ``[N]`` confidences on the full image; same
      labels and ``N`` as ``values``.
    label_by: optional label -> legend text (labels not listed show as is).

  For each label, y at x = (j + 1) / d is the fraction of images with
  ``max(values[:, :j + 1]) > original``. The y-axis spans the curves' range plus a
  margin (``_padded_range``), clipped to [0, 1.02]: a fraction is never below 0.
  Lines are drawn over the frame and each label has its own line style, so curves at
  0 or 1, or on top of each other, stay visible.
  """
  values = _float_rows("values", values, ndim=2)
  original = _float_rows("original", original, ndim=1)
  _same_keys("values", values, "original", original)
  for label, v in values.items():
    if original[label].shape != (v.shape[0],):
      raise ValueError(f"original[{label!r}] must have shape {(v.shape[0],)} to match "
                       f"values[{label!r}] {v.shape}, got {original[label].shape}")
  label_by = dict(label_by or {})
  fig = _new_figure(5.0, 3.5)
  ax = fig.subplots()
  drawn = []
  for i, (label, v) in enumerate(values.items()):
    text = str(label_by.get(label, label))
    if len(v) == 0:
      ax.plot([], [], label=f"{text} (n = 0)")
      continue
    rose = np.maximum.accumulate(v - original[label][:, None], axis=1) > 0
    drawn.append(rose.mean(axis=0))
    # Curves often coincide (e.g. all at 1.0): styles keep each one visible.
    ax.plot(_steps_x(v.shape[1]), drawn[-1], label=text, linewidth=2,
            linestyle=("-", "--", ":", "-.")[i % 4], clip_on=False)
  low, high = _padded_range(drawn)
  ax.set(xlim=(0, 1), ylim=(max(low, 0.0), min(high, 1.02)),
         xlabel="fraction of pixels removed", ylabel="fraction of images")
  ax.set_title("images whose confidence rose above the full-image value", fontsize=9)
  ax.legend(fontsize=8)
  return _save(fig, path)


def figure_rows(num_images: int, num_rows: int) -> np.ndarray:
  """Positions of the images a grid shows: ``num_rows`` spread evenly over the sample, first
  and last included. The sample is in test-set order, which in a folder of class
  subfolders is by class, so the first rows alone would show a single class."""
  if num_images <= num_rows:
    return np.arange(num_images)
  return np.unique(np.round(np.linspace(0, num_images - 1, num_rows)).astype(int))


def sample_label(row: str, sample: str, n: int, sep: str = ", ") -> str:
  """A figure's label of a record row naming its sample and the sample's size, e.g.
  ``"gradient/single, test sample (n = 1,000)"``: rows of different samples never share
  a label. ``sep``: between the row and its sample (a newline in panel titles)."""
  return f"{row.replace(' (test sample)', '')}{sep}{sample} (n = {n:,})"


def _cell(value) -> str:
  if isinstance(value, str):
    text = value
  elif isinstance(value, (float, np.floating)):
    text = f"{value:.4g}"
  else:
    text = str(value)
  return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
  """A GitHub markdown table, ending in a newline.

  Floats (Python or numpy) are written with 4 significant digits; strings as
  given; anything else with ``str``. ``|`` in a cell is escaped.
  """
  headers = list(headers)
  if not headers:
    raise ValueError("headers is empty")
  lines = ["| " + " | ".join(map(_cell, headers)) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  for i, row in enumerate(rows):
    row = list(row)
    if len(row) != len(headers):
      raise ValueError(f"rows[{i}] has {len(row)} cells, headers has {len(headers)}")
    lines.append("| " + " | ".join(map(_cell, row)) + " |")
  return "\n".join(lines) + "\n"
