"""Report figures and tables: PNGs written atomically and deterministically, inputs validated."""
import os

import numpy as np
import pytest

from overinterp_jax.pipeline import figures

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _images(n=3, h=8, w=8, c=3, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def _masks(n=3, h=8, w=8, seed=1):
  return np.random.default_rng(seed).random((n, h, w)) < 0.2


def _curves(n=5, d=16, seed=2):
  return np.sort(np.random.default_rng(seed).random((n, d)), axis=1)[:, ::-1].copy()


def _confidences(n=6, seed=3):
  return np.random.default_rng(seed).random(n)


CASES = {
    "sis_grid": lambda p: figures.sis_grid(
        p, _images(), {"a": _masks(), "b": _masks(seed=5)}, titles=["x 0.9 | 3 px"] * 3,
        exists_by_model={"b": np.array([True, False, True])}, max_images=2),
    "sis_grid_gray": lambda p: figures.sis_grid(p, _images(c=1), {"a": _masks()},
                                                background=np.array([0], np.uint8)),
    "confidence_curves": lambda p: figures.confidence_curves(
        p, {"a": _curves(), "b": _curves(d=8, seed=4), "none": np.zeros((0, 4))}, threshold=0.9),
    "size_histograms": lambda p: figures.size_histograms(
        p, {"a": np.array([1, 2, 5]), "b": np.array([3, 30]), "none": np.zeros(0, int)},
        num_features=64),
    "paired_confidence": lambda p: figures.paired_confidence(
        p, {"m1": _confidences(), "m2": np.zeros(0)}, {"m1": _confidences(seed=4), "m2": np.zeros(0)},
        threshold=0.9, title="smoothed"),
    "rise_curves": lambda p: figures.rise_curves(
        p, {"a": _curves(), "b": _curves(seed=6)}, {"a": _confidences(5), "b": _confidences(5, 7)},
        label_by={"a": "model A"}),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_writes_deterministic_png(tmp_path, name):
  first = tmp_path / "one" / "deep" / f"{name}.png"
  second = tmp_path / f"{name}_again.png"
  assert CASES[name](str(first)) == str(first)
  CASES[name](second)
  data = first.read_bytes()
  assert len(data) > len(PNG_SIGNATURE) and data.startswith(PNG_SIGNATURE)
  assert data == second.read_bytes()
  leftovers = [f for _, _, files in os.walk(tmp_path) for f in files if ".tmp" in f]
  assert leftovers == []


def test_sis_grid_draws_sis_on_background(tmp_path):
  images = np.full((1, 4, 4, 3), 200, np.uint8)
  masks = np.zeros((1, 4, 4), bool)
  masks[0, 0, 0] = True
  path = figures.sis_grid(tmp_path / "g.png", images, {"m": masks},
                          background=np.array([0, 0, 255], np.uint8))
  assert os.path.getsize(path) > 0


@pytest.mark.parametrize("call, match", [
    (lambda p: figures.sis_grid(p, _images(), {}), "masks_by_model is empty"),
    (lambda p: figures.sis_grid(p, _images().astype(np.float32), {"a": _masks()}), "images"),
    (lambda p: figures.sis_grid(p, _images()[0], {"a": _masks()}), "images"),
    (lambda p: figures.sis_grid(p, _images(c=2), {"a": _masks()}), "images"),
    (lambda p: figures.sis_grid(p, _images(), {"a": _masks(h=7)}), r"masks_by_model\['a'\]"),
    (lambda p: figures.sis_grid(p, _images(), {"a": _masks().astype(np.uint8)}),
     r"masks_by_model\['a'\]"),
    (lambda p: figures.sis_grid(p, _images(), {"a": _masks()}, titles=["x"]), "titles"),
    (lambda p: figures.sis_grid(p, _images(), {"a": _masks()}, background=np.array([1, 2])),
     "background"),
    (lambda p: figures.sis_grid(p, _images(), {"a": _masks()},
                                exists_by_model={"a": np.ones(2, bool)}),
     r"exists_by_model\['a'\]"),
    (lambda p: figures.sis_grid(p, _images(), {"a": _masks()},
                                exists_by_model={"z": np.ones(3, bool)}),
     r"exists_by_model\['z'\]"),
    (lambda p: figures.sis_grid(p, _images(), {"a": _masks()}, max_images=0), "max_images"),
    (lambda p: figures.confidence_curves(p, {}), "curves is empty"),
    (lambda p: figures.confidence_curves(p, {"a": _confidences()}), r"curves\['a'\]"),
    (lambda p: figures.confidence_curves(p, {"a": np.ones((2, 3), int)}), r"curves\['a'\]"),
    (lambda p: figures.size_histograms(p, {}, num_features=10), "sizes is empty"),
    (lambda p: figures.size_histograms(p, {"a": np.array([0.5])}, num_features=10),
     r"sizes\['a'\]"),
    (lambda p: figures.size_histograms(p, {"a": np.array([11])}, num_features=10),
     r"sizes\['a'\]"),
    (lambda p: figures.size_histograms(p, {"a": np.array([1])}, num_features=0), "num_features"),
    (lambda p: figures.paired_confidence(p, {"a": _confidences()}, {"b": _confidences()}),
     "before and after"),
    (lambda p: figures.paired_confidence(p, {"a": _confidences()}, {"a": _confidences(5)}),
     r"before\['a'\] and after\['a'\]"),
    (lambda p: figures.paired_confidence(p, {"a": _confidences() + 1}, {"a": _confidences()}),
     r"before\['a'\]"),
    (lambda p: figures.rise_curves(p, {"a": _curves()}, {"a": _confidences(4)}),
     r"original\['a'\]"),
    (lambda p: figures.rise_curves(p, {"a": _curves()}, {}), "original is empty"),
])
def test_bad_inputs_raise(tmp_path, call, match):
  path = tmp_path / "bad.png"
  with pytest.raises(ValueError, match=match):
    call(path)
  assert not path.exists()
  assert os.listdir(tmp_path) == []


def test_rise_curves_fraction(tmp_path, monkeypatch):
  plotted = []
  original_plot = figures.Figure.add_subplot

  def spy(self, *args, **kwargs):
    ax = original_plot(self, *args, **kwargs)
    real = ax.plot
    ax.plot = lambda x, y, **kw: plotted.append((np.asarray(x), np.asarray(y))) or real(x, y, **kw)
    return ax

  monkeypatch.setattr(figures.Figure, "add_subplot", spy)
  values = np.array([[0.5, 0.9, 0.1, 0.0], [0.2, 0.1, 0.3, 0.0]])
  figures.rise_curves(tmp_path / "r.png", {"a": values}, {"a": np.array([0.6, 0.25])})
  (x, y), = plotted
  np.testing.assert_allclose(x, [0.25, 0.5, 0.75, 1.0])
  np.testing.assert_allclose(y, [0.0, 0.5, 1.0, 1.0])


def test_rise_curves_at_one_are_inside_the_frame(tmp_path, monkeypatch):
  limits = []
  save = figures._save
  monkeypatch.setattr(figures, "_save",
                      lambda fig, path: limits.append(fig.axes[0].get_ylim()) or save(fig, path))
  values = np.array([[0.9, 0.95, 0.99], [0.8, 0.9, 0.95]])  # every image rises at once
  figures.rise_curves(tmp_path / "r.png", {"a": values}, {"a": np.array([0.5, 0.6])})
  (low, high), = limits
  assert low < 1.0 < high and high - 1.0 < 0.1  # the curve at y = 1 shows, not on the border


def test_markdown_table():
  table = figures.markdown_table(["model", "acc", "n", "note"],
                                 [["a|b", 0.123456, 3, "0.5"], ["c", np.float32(12345.67), 10, ""]])
  assert table == ("| model | acc | n | note |\n"
                   "|---|---|---|---|\n"
                   "| a\\|b | 0.1235 | 3 | 0.5 |\n"
                   "| c | 1.235e+04 | 10 |  |\n")


def test_markdown_table_bad_row():
  with pytest.raises(ValueError, match=r"rows\[1\] has 1 cells, headers has 2"):
    figures.markdown_table(["a", "b"], [[1, 2], [3]])
  with pytest.raises(ValueError, match="headers is empty"):
    figures.markdown_table([], [])


def test_sis_grid_rows_spread_over_the_sample():
  """The grid's images come from the whole sample (test-set order is by class in an image
  folder), not only its first rows; a sample no larger than the grid is shown whole."""
  np.testing.assert_array_equal(figures.figure_rows(100, 8), [0, 14, 28, 42, 57, 71, 85, 99])
  np.testing.assert_array_equal(figures.figure_rows(5, 8), np.arange(5))
  np.testing.assert_array_equal(figures.figure_rows(9, 8), [0, 1, 2, 3, 5, 6, 7, 8])


def _drawn_axes(monkeypatch):
  """What the first axes of each figure written while the test runs show: y-limits and
  ticks, legend texts, whether each line is clipped to the frame (read before saving
  clears the figure)."""
  drawn = []

  def spy(fig, path, save=figures._save):
    ax = fig.axes[0]
    legend = ax.get_legend()
    drawn.append({"ylim": ax.get_ylim(), "yticks": ax.get_yticks(),
                  "legend": [t.get_text() for t in legend.get_texts()] if legend else [],
                  "clipped": [line.get_clip_on() for line in ax.get_lines()]})
    return save(fig, path)

  monkeypatch.setattr(figures, "_save", spy)
  return drawn


def test_rise_curves_axis_never_below_zero(tmp_path, monkeypatch):
  axes = _drawn_axes(monkeypatch)
  flat = np.array([[0.1, 0.2, 0.3], [0.2, 0.1, 0.0]])  # never above the full image's 0.9
  figures.rise_curves(tmp_path / "r.png", {"a": flat}, {"a": np.array([0.9, 0.9])})
  low, high = axes[0]["ylim"]
  assert low == 0.0 and 0.0 < high <= 1.02
  assert axes[0]["clipped"] == [False]  # the curve at 0 shows over the frame


def test_histogram_counts_have_integer_ticks(tmp_path, monkeypatch):
  axes = _drawn_axes(monkeypatch)
  figures.size_histograms(tmp_path / "h.png", {"a": np.array([1, 2]), "b": np.array([3])},
                          num_features=64)
  figures.paired_confidence(tmp_path / "p.png", {"m": np.array([0.5, 0.9])},
                            {"m": np.array([0.4, 0.95])})
  figures.paired_confidence(tmp_path / "e.png", {"m": np.zeros(0)}, {"m": np.zeros(0)})
  assert axes[-1]["ylim"] == (0.0, 1.0)  # nothing drawn: still no negative counts
  for drawn in axes:
    ticks = drawn["yticks"]
    assert len(ticks) >= 2 and np.all(ticks == np.round(ticks)), ticks


def test_curve_labels_give_their_sample_size(tmp_path, monkeypatch):
  axes = _drawn_axes(monkeypatch)
  figures.confidence_curves(tmp_path / "c.png", {"a": _curves(n=1200), "b": np.zeros((0, 4))})
  figures.rise_curves(tmp_path / "r.png", {"a": _curves()}, {"a": _confidences(5)},
                      label_by={"a": "model A (n = 5)"})
  assert [a["legend"] for a in axes] == [["a (n = 1,200)", "b (n = 0)"], ["model A (n = 5)"]]


def test_sample_labels_name_their_sample_and_its_size():
  assert (figures.sample_label("gradient/single (test sample)", "test sample", 1000)
          == "gradient/single, test sample (n = 1,000)")
  assert figures.sample_label("gradient/single", "SIS sample", 40) == (
      "gradient/single, SIS sample (n = 40)")


def test_smoothed_panels_name_their_sample_size(monkeypatch):
  """The smoothed control's rows: the SIS sample and stage backselect's test sample have
  different sizes (40 and 1,000 on the ImageNet smoke run); each panel title gives its own."""
  from types import SimpleNamespace
  from overinterp_jax.pipeline import controls
  ctx = SimpleNamespace(config=SimpleNamespace(controls=SimpleNamespace(smoothed_images=1000)),
                        sis_sample=SimpleNamespace(test_sample=lambda n: np.arange(n),
                                                   indices=lambda: np.arange(40)))
  monkeypatch.setattr(controls, "backselect_row", lambda ctx: "gradient/single (test sample)")
  titles = controls.smoothed_titles(ctx, {"gradient/single": {"count": 40},
                                          "gradient/single (test sample)": {"count": 990}})
  assert titles == {
      "gradient/single": "gradient/single\nSIS sample (n = 40)",
      "gradient/single (test sample)":
          "gradient/single\ntest sample (n = 1,000)\n990 with a non-empty SIS"}


@pytest.mark.parametrize("tau, columns", [(0.99, 4), (0.9, 5)])
def test_base_on_subsets_table_has_no_repeated_column(tau, columns):
  """At τ = 0.99 the "≥ τ" column would repeat the "≥ 0.99" one: it is left out."""
  from overinterp_jax.pipeline import report_sections
  base = {"bs": {"accuracy": 0.5, "mean_confidence": 0.7, "fraction_confident_99": 0.25,
                 "fraction_confident_tau": 0.25 if tau == 0.99 else 0.5}}
  header, _, row = report_sections.base_on_subsets_table(base, tau).splitlines()
  assert len(header.strip("|").split(" | ")) == columns
  assert len(row.strip("|").split(" | ")) == columns
  assert ("≥ τ" in header) == (tau != 0.99)


def test_smoothed_table_rows_name_their_sample_and_its_size():
  """The smoothed control's table: stage backselect's row says which test sample and how
  many images (it said "(test sample)" for 40 images here and for 1,000 in a figure)."""
  from overinterp_jax.pipeline import report_sections
  row = {"count": 38, "dilation": 3, "median_pixels_sis": 320.0, "median_pixels_dilated": 1532.0,
         "median_confidence_sis": 0.95, "median_confidence_dilated": 0.99,
         "fraction_dilated_below_threshold": 0.0}
  s = {"threshold": 0.9, "smoothed": {
      "gradient/single": dict(row, sample="SIS sample", images=40),
      "gradient/single (test sample)": dict(row, sample="test sample", images=1000)}}
  md = report_sections.controls_md(s, "10%")
  assert "| gradient/single, SIS sample (n = 40) | 38 |" in md
  assert "| gradient/single, test sample (n = 1,000) | 38 |" in md
  assert "(test sample) |" not in md
  # A summary written before rows recorded their sample keeps its row as it was.
  old = {"threshold": 0.9, "smoothed": {"gradient/single (test sample)": row}}
  assert "| gradient/single (test sample) | 38 |" in report_sections.controls_md(old, "10%")
