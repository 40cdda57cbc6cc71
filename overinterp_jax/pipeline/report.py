"""Stage ``report``: ``report.md``, ``report.json`` and PNG figures in the work directory.

Built only from what earlier stages stored (stage summaries, backselect
shards, SIS records), so it never recomputes anything and is identical for
the same config and seed. Sections for stages that did not run say so.
"""
from __future__ import annotations

import os

import numpy as np

from overinterp_jax import sis
from overinterp_jax.data import class_names
from overinterp_jax.pipeline import controls, figures, registry, sis_stage, subsets_stage
from overinterp_jax.pipeline.context import MARKER_KEYS
from overinterp_jax.pipeline.report_sections import fraction, pct, table1
from overinterp_jax.store import atomic, npz

FIGURES = {"sis_examples": "figures/sis_examples.png",
           "confidence_curves": "figures/confidence_vs_pixels_removed.png",
           "sis_sizes": "figures/sis_size_histograms.png",
           "smoothed_sis": "figures/smoothed_sis_confidence.png",
           "confidence_rise": "figures/confidence_rise.png",
           "kept_positions": "figures/kept_positions.png"}


def _without_timings(x):
  """``x`` less timings and what the runner adds to a stage's marker (not results)."""
  if isinstance(x, dict):
    return {k: _without_timings(v) for k, v in x.items()
            if "seconds" not in k and k not in MARKER_KEYS}
  return x


# Test images (a seeded sample) whose backselect curves the figures draw.
FIGURE_SAMPLE = 1000


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


def draw_figures(ctx, s: dict) -> dict:
  """Writes the figures whose inputs exist; returns ``{name: relative path}``."""
  made = {}
  tau = float(ctx.config.sis.threshold)
  h, w = ctx.height_width
  n_fig = int(ctx.config.report.num_figure_images)
  if "sis" in s and s["sis"]["num_images"]:
    idx = sis_stage.sample_indices(ctx)
    rows = figure_rows(len(idx), n_fig)
    fmap = sis_stage.feature_map(ctx)
    recs = {name: sis_stage.records_for(ctx, name) for name in s["sis"]["models"]}
    masks, exists, sizes, curves = {}, {}, {}, {}
    for name, rec in recs.items():
      b = sis_stage.sis_of(rec, tau)
      masks[name] = sis.feature_mask_to_pixels(b.mask[rows], fmap, (h, w))
      exists[name] = b.exists[rows]
      sizes[name] = (b.size * sis_stage.pixels_per_feature(ctx))[b.exists]
      curves[f"{sis_stage.selection_name(ctx)}/{name}, SIS sample"] = rec["values"]
    single = next(iter(recs.values()))
    names = class_names.display_names(ctx.data.class_names)
    labels = ctx.labels("test")
    titles = [f"{names[labels[i]]}\n→ {names[t]} {p:.3f}"
              for i, t, p in zip(idx[rows], single["targets"][rows],
                                 single["original_scores"][rows])]
    made["sis_examples"] = figures.sis_grid(ctx.path(FIGURES["sis_examples"]),
                                            ctx.feed("test").images(idx[rows]), masks,
                                            titles=titles, exists_by_model=exists,
                                            max_images=n_fig)
    made["sis_sizes"] = figures.size_histograms(ctx.path(FIGURES["sis_sizes"]), sizes,
                                                num_features=h * w)
    if "backselect" in s:
      curves[f"{ctx.config.backselect.method}/single, test sample"] = ctx.backselect("test").rows(
          sis_stage.test_sample(ctx, FIGURE_SAMPLE))["values"]
    made["confidence_curves"] = figures.confidence_curves(
        ctx.path(FIGURES["confidence_curves"]), curves, threshold=tau)
  border = (s.get("subsets") or {}).get("border_analysis")
  if border:
    freq = npz.load(subsets_stage.analysis_path(ctx),
                    subsets_stage.analysis_key(s["subsets"]["mask_sha256"]))
    if freq is not None:
      maps = {f"{fraction(ctx.config)} BS, {split} ({v['num_images']} images)":
              freq[f"bs_{split}/frequency"] / max(v["num_images"], 1)
              for split, v in border.items()}
      made["kept_positions"] = figures.position_heatmaps(
          ctx.path(FIGURES["kept_positions"]), maps, band=int(s["subsets"]["border_width"]))
  c = s.get("controls", {})
  if "smoothed" in c:
    arrays = npz.load(ctx.path("controls", "smoothed.npz"),
                      controls.smoothed_key(c["smoothed"]))
    if arrays is not None:
      titles = _smoothed_titles(ctx, c["smoothed"])
      before = {titles[k]: arrays[f"{k}/sis"] for k in c["smoothed"]}
      after = {titles[k]: arrays[f"{k}/dilated"] for k in c["smoothed"]}
      made["smoothed_sis"] = figures.paired_confidence(
          ctx.path(FIGURES["smoothed_sis"]), before, after, threshold=tau,
          labels=("SIS", f"dilated SIS ({int(ctx.config.controls.dilation)}×"
                         f"{int(ctx.config.controls.dilation)})"))
  if "confidence_rise" in c:
    values, original, label_by = {}, {}, {}
    for name in s["sis"]["models"] if s["sis"]["num_images"] else ():
      rec = sis_stage.records_for(ctx, name)
      row = f"{sis_stage.selection_name(ctx)}/{name}"
      values[row], original[row] = rec["values"], rec["original_scores"]
      label_by[row] = sample_label(row, "SIS sample", len(rec["values"]))
    rec = ctx.backselect("test").rows(sis_stage.test_sample(ctx, FIGURE_SAMPLE))
    key = controls.backselect_row(ctx)
    values[key], original[key] = rec["values"], rec["original_scores"]
    label_by[key] = sample_label(key, "test sample", len(rec["values"]))
    made["confidence_rise"] = figures.rise_curves(ctx.path(FIGURES["confidence_rise"]), values,
                                                  original, label_by=label_by)
  return {k: os.path.relpath(v, ctx.workdir) for k, v in made.items()}


def _smoothed_titles(ctx, smoothed: dict) -> dict:
  """``{row of the smoothed control: panel title}``: the row, its sample and the sample's
  size (the SIS sample, or ``controls.smoothed_images`` test images for stage backselect's
  records), and how many of those images have a SIS when not all do."""
  sample = {controls.backselect_row(ctx): ("test sample", len(sis_stage.test_sample(
      ctx, int(ctx.config.controls.smoothed_images))))}
  titles = {}
  for row, v in smoothed.items():
    what, n = sample.get(row, ("SIS sample", len(sis_stage.sample_indices(ctx))))
    titles[row] = sample_label(row, what, n, "\n") + (
        f"\n{v['count']:,} with a non-empty SIS" if v["count"] != n else "")
  return titles


def run(ctx) -> dict:
  c = ctx.config
  earlier = registry.earlier("report")
  s = {stage: ctx.load_summary(stage) for stage in earlier if stage in c.stages}
  s = {k: v for k, v in s.items() if v is not None}
  view = getattr(ctx.data, "view", None)  # streamed data: the analysis view (data.view)
  md = [f"# Overinterpretation report: {c.model.name} (seed {c.train.seed})", "",
        f"Data: {c.data.source} ({ctx.data.num_examples('train')} train / "
        f"{ctx.data.num_examples('test')} test images, {ctx.height_width[0]}×{ctx.height_width[1]}"
        f"{'; ' + view.describe() if view is not None and view.size else ''}). "
        f"Stages run: {', '.join(k for k in earlier if k in s)}.", ""]
  for stage in earlier:
    md += registry.get(stage).report(ctx, s)
  figs = draw_figures(ctx, s) if atomic.is_writer() else {}
  md += ["## Figures", ""] + [f"- {k}: ![{k}]({v})" for k, v in figs.items()] + [""]
  if "sis_examples" in figs:
    md += ["In `sis_examples`, each row is one test image, labelled `true class → predicted "
           "class confidence`: the predicted class is the SIS target and the confidence is the "
           f"`{next(iter(s['sis']['models']))}` model's on the full image. Each further column shows one model's SIS on a "
           "gray background (\"no SIS\": that model is below τ on the full image).", ""]
  _, t1 = table1(s, c)
  report = {"table1": t1, "stages": _without_timings(s), "figures": figs}
  atomic.save_json(ctx.path("report.json"), report)
  if not atomic.is_writer():
    return {"report": "report.md", "figures": figs}
  atomic.write_atomic(ctx.path("report.md"), lambda fh: fh.write("\n".join(md)))
  return {"report": "report.md", "figures": figs}


def headline(summaries: dict, config) -> list[str]:
  """A few lines for the end of a run: the base model's accuracy and Table 1's numbers."""
  _, row = table1(summaries, config)
  frac = fraction(config)
  cells = [(f"full images ({config.train.num_epochs} ep)", row["full"]),
           ("full images, retrained", row["full_same_budget"]), (f"{frac} BS", row["bs"]),
           (f"{frac} random", row["random"]), ("BS − random", row["bs_minus_random"]),
           (f"{frac} BS mask only", row["mask_only"])]
  cells = [f"{name} {pct(value)}" for name, value in cells if value is not None]
  return [f"Test accuracy (%): {', '.join(cells)}."] if cells else []


STAGE = registry.Unit("report", "report", run)
