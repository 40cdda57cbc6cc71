"""Stage ``report``: ``report.md``, ``report.json`` and PNG figures in the work directory.

Built only from what earlier stages stored (stage summaries, backselect
shards, SIS records), so it never recomputes anything and is identical for
the same config and seed. Sections for stages that did not run say so.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from overinterp_jax import sis
from overinterp_jax.data import class_names
from overinterp_jax.pipeline import backselect_stage, controls, figures, sis_stage, subsets_stage
from overinterp_jax.pipeline.context import MARKER_KEYS
from overinterp_jax.store import atomic, npz

FIGURES = {"sis_examples": "figures/sis_examples.png",
           "confidence_curves": "figures/confidence_vs_pixels_removed.png",
           "sis_sizes": "figures/sis_size_histograms.png",
           "smoothed_sis": "figures/smoothed_sis_confidence.png",
           "confidence_rise": "figures/confidence_rise.png",
           "kept_positions": "figures/kept_positions.png"}
EARLIER = ("train", "backselect", "subsets", "retrain", "sis", "controls")


def _without_timings(x):
  """``x`` less timings and what the runner adds to a stage's marker (not results)."""
  if isinstance(x, dict):
    return {k: _without_timings(v) for k, v in x.items()
            if "seconds" not in k and k not in MARKER_KEYS}
  return x


def fraction(config) -> str:
  """``config.subsets.frac_kept`` as a heading shows it: ``"5%"``."""
  return f"{100 * float(config.subsets.frac_kept):g}%"


def _pct(x) -> str:
  return "—" if x is None or not np.isfinite(x) else f"{100 * x:.2f}"


def _num(x, fmt: str = ".0f") -> str:
  return "—" if x is None or not np.isfinite(x) else format(x, fmt)


def _iqr(q1, q3) -> str:
  """``q1–q3`` in pixels, or one ``—`` when there is no SIS to take quartiles of."""
  return "—" if q1 is None or q3 is None else f"{_num(q1)}–{_num(q3)}"


def _gap_line(name: str, a: float, b: float, other: str, paper: str) -> str:
  """``- <name> is X points above|below <other> (paper: ...).`` for accuracies in [0, 1]."""
  gap = 100 * (a - b)
  return (f"- {name} is {abs(gap):.2f} points {'above' if gap > 0 else 'below'} {other} "
          f"(paper: {paper}).")


def table1(s: dict, config) -> tuple[str, dict]:
  train, retrain = s.get("train"), s.get("retrain")
  full = train["test_accuracy"] if train else None
  models = (retrain or {}).get("models", {})
  bs = models.get("bs", {}).get("test_accuracy")
  rnd = models.get("random", {}).get("test_accuracy")
  mask_only = models.get("mask_only", {}).get("test_accuracy")
  border = models.get("border", {}).get("test_accuracy")
  full_retrained = models.get("full", {}).get("test_accuracy")
  reference = full_retrained if full_retrained is not None else full
  # Keys name the retrain models, not a fraction: "frac_kept" is the subsets' fraction.
  row = {"model": config.model.name, "seed": int(config.seed),
         "frac_kept": float(config.subsets.frac_kept), "full": full,
         "full_same_budget": full_retrained, "bs": bs,
         "random": rnd, "mask_only": mask_only, "border": border,
         "bs_minus_random": None if bs is None or rnd is None else bs - rnd,
         "reference_minus_bs": None if bs is None or reference is None else reference - bs}
  frac = fraction(config)
  retrain_epochs = int(config.retrain.num_epochs) or int(config.num_epochs)
  headers = ["model", "seed", f"full images ({config.num_epochs} ep)",
             f"full images, retrained ({retrain_epochs} ep)", f"{frac} BS", f"{frac} random",
             "BS − random", f"{frac} BS mask only"]
  cells = [config.model.name, str(config.seed), _pct(full), _pct(full_retrained), _pct(bs),
           _pct(rnd), _pct(row["bs_minus_random"]), _pct(mask_only)]
  if border is not None:
    headers.append(f"{frac} border frame")
    cells.append(_pct(border))
  md = figures.markdown_table(headers, [cells])
  lines = [md, "", "Test accuracy (%); each model trained and tested on the same kind of input. "
           f"Subset models (and the second full-image column) train for {retrain_epochs} epochs."]
  for ref, which in ((full, f"the full-image model ({config.num_epochs} ep)"),
                     (full_retrained, f"the full-image model of the same budget "
                                      f"({retrain_epochs} ep)")):
    if bs is not None and ref is not None:
      lines.append(_gap_line(f"{frac} BS", bs, ref, which, "within a few points"))
  if bs is not None and rnd is not None:
    lines.append(_gap_line(f"{frac} BS", bs, rnd, f"{frac} random", "far above"))
  if border is not None and bs is not None:
    lines.append(_gap_line(f"{frac} border frame", border, bs, f"{frac} BS",
                           "ImageNet border pixels alone suffice for training and testing"))
  if mask_only is not None:
    chance = 1.0 / int(config.num_classes)
    verdict = ("the subset **positions alone predict the class** well above chance"
               if mask_only > chance + 0.1 else "positions alone predict little")
    lines.append(f"- Mask only: {_pct(mask_only)}% from positions alone (chance "
                 f"{100 * chance:.3g}%): {verdict}.")
  base = (retrain or {}).get("base_on_subsets")
  if base:
    lines += ["", f"Base model on its own {frac} test subsets (no retraining):", "",
              base_on_subsets_table(base, float(config.sis.threshold))]
  return "\n".join(lines), row


def base_on_subsets_table(base: dict, tau: float) -> str:
  """The base model on its own subsets: accuracy, mean confidence, and how often it is
  ≥ 0.99 and ≥ τ confident (one column when τ is 0.99: the two would repeat each other)."""
  headers = ["subsets", "accuracy (%)", "mean confidence", "≥ 0.99 confident (%)"]
  rows = [[k, _pct(v["accuracy"]), f"{v['mean_confidence']:.4f}",
           _pct(v["fraction_confident_99"])] for k, v in base.items()]
  if tau != 0.99:
    headers.append(f"≥ τ = {tau:g} confident (%)")
    for row, v in zip(rows, base.values()):
      row.append(_pct(v.get("fraction_confident_tau")))
  return figures.markdown_table(headers, rows)


def _interval(m: Optional[dict]) -> str:
  """``median [low, high]`` of a ``sis_stats`` result, or ``—``."""
  mid = m.get("median", m.get("difference")) if m else None
  if mid is None:
    return "—"
  return f"{mid:g} [{m['low']:g}, {m['high']:g}]"


def sis_table(s: dict) -> str:
  rows = []
  for name, m in s["models"].items():
    rows.append([name, _pct(m["test_accuracy"]),
                 str(m["epochs"]) if m.get("epochs") else "—",
                 _pct(m.get("fraction_full_image_reaches_threshold")),
                 str(m["count"]), _pct(m["fraction_with_sis"]),
                 _num(m.get("median_pixels")), _interval(m.get("median_interval")),
                 _iqr(m.get("q1_pixels"), m.get("q3_pixels")),
                 _num(m.get("median_percent"), ".2f")])
  return figures.markdown_table(
      ["model", "test acc (%)", "trained (ep)", "full image ≥ τ (% of test)", "SISes",
       "images with SIS (%)", "median size (px)", "median, 95% CI (px)", "IQR (px)",
       "median size (% of image)"], rows)


def differences_md(s: dict) -> list[str]:
  """Paired differences of median SIS size against the single model, and one sentence
  per paper claim (mitigations make SISes larger) saying whether the run supports it."""
  diffs = s.get("differences") or {}
  if not diffs:
    return []
  rows = [[f"{name} − single", str(d["count"]), _interval(d),
           _num(d.get("median_paired_difference"), "g"), _pct(d.get("fraction_larger"))]
          for name, d in diffs.items()]
  out = ["Paired differences on the same images (bootstrap over images):", "",
         figures.markdown_table(["difference of median SIS size", "images",
                                 "difference, 95% CI (px)", "median per-image difference (px)",
                                 "images where larger (%)"], rows), ""]
  claims = {"ensemble": "Ensembles reduce overinterpretation (larger SISes)",
            "input_dropout": "Input dropout reduces overinterpretation (larger SISes)"}
  for name, d in diffs.items():
    if name not in claims:
      continue
    if d["difference"] is None:
      verdict = "cannot be judged: no image has a SIS for both models"
    elif d["low"] > 0:
      verdict = "**supported**: the interval lies above 0"
    elif d["high"] < 0:
      verdict = "**contradicted**: the interval lies below 0 (smaller SISes)"
    else:
      verdict = "**not shown**: the interval contains 0"
    numbers = "" if d["difference"] is None else (
        f" (difference of median SIS sizes {_interval(d)} px over the {d['count']} images "
        "with a SIS for both models)")
    out.append(f"- {claims[name]}: {verdict}{numbers}.")
  return out + [""]


def border_md(s: dict, frac: str) -> list[str]:
  """Where the BS subsets' pixels lie: the outer band against its share of the image."""
  band = s["border_width"]
  rows = [[split, str(v["num_images"]), _pct(v["band_share_of_image"]),
           _pct(v["fraction_kept_in_band"]), _num(v["ratio_to_uniform"], ".2f"),
           _pct(v["max_position_frequency"])] for split, v in s["border_analysis"].items()]
  return [f"## Border analysis ({frac} BS subsets)", "",
          figures.markdown_table(
              ["split", "images", f"outer {band}-px band: share of image (%)",
               "kept pixels in band (%)", "ratio to uniform", "most-kept position (% of images)"],
              rows), "",
          f"The band is as wide as the {frac} border frame ({s['pixels_kept']} pixels at the "
          "edge); uniformly placed pixels would put the band's share of the image in it. "
          "`kept_positions` shows how often each position is kept.", ""]


def sis_md(s: dict, config) -> list[str]:
  """The SIS section: heading, which images, the table."""
  selection = s.get("selection", "exact")
  how = ("exact backward selection" if selection == "exact" else
         f"{selection} backward selection ({backselect_stage.step_words(config.backselect)}, "
         "stage backselect's records)")
  p = s["patch_size"]
  out = [f"## SIS size at τ = {s['threshold']} ({s['num_images']} test images, {how}, "
         f"{p}×{p}-pixel features)", ""]
  if "qualifying" in s:
    which = " and classifies correctly" if s["only_correct"] else ""
    who = "every model" if s.get("all_models") else "the base model"
    out += [f"Sampled from the {s['qualifying']} test images {who} gives confidence "
            f"≥ {s['min_confidence']:g}{which}.", ""]
  if not s["num_images"]:
    return out + ["No test image qualifies: no SIS to report.", ""]
  return out + [sis_table(s), ""] + differences_md(s)


def controls_md(s: dict, frac: str) -> str:
  """The controls' section; ``frac``: the kept fraction as shown (``fraction``)."""
  tau = s["threshold"]
  out = []
  if "smoothed" in s:
    out += [f"### Smoothed SIS (dilated by {next(iter(s['smoothed'].values()))['dilation']}×"
            f"{next(iter(s['smoothed'].values()))['dilation']})", "",
            figures.markdown_table(
                ["SIS source", "SISes", "median px SIS → dilated", "median conf SIS",
                 "median conf dilated", f"dilated < τ={tau} (%)"],
                [[k, str(v["count"]), f"{_num(v['median_pixels_sis'])} → "
                  f"{_num(v['median_pixels_dilated'])}",
                  f"{v['median_confidence_sis']:.4f}" if v["count"] else "—",
                  f"{v['median_confidence_dilated']:.4f}" if v["count"] else "—",
                  _pct(v["fraction_dilated_below_threshold"])]
                 for k, v in s["smoothed"].items()]), ""]
  if "targeted" in s:
    t = s["targeted"]
    w, p = t["wrong_class"], t["predicted_class"]
    out += ["### Targeted SIS (random wrong class)", "",
            figures.markdown_table(
                ["target", "images", f"reach τ={tau} (%)", "median SIS (px)",
                 "median SIS (% of image)"],
                [["predicted class", str(t["num_images"]), _pct(p.get("fraction_with_sis")),
                  _num(p.get("median_pixels")), _num(p.get("median_percent"), ".2f")],
                 ["random wrong class", str(t["num_images"]),
                  _pct(w["fraction_reached_threshold"]),
                  _num(w.get("median_pixels")), _num(w.get("median_percent"), ".2f")]]),
            "", f"Wrong class: median full-image confidence {w['median_full_image_confidence']:.4f}, "
            f"median best confidence along backward selection {w['median_max_confidence']:.4f}; "
            f"the fully masked image alone reaches τ for {_pct(w['fraction_fully_masked_reaches'])}%.",
            ""]
  if "masking_values" in s:
    out += ["### Masking value", "",
            figures.markdown_table(
                ["masked value", "median SIS (px)", "median SIS (%)", "images with SIS (%)",
                 f"base on own {frac} BS test subsets: acc (%)", "mean confidence", "test images"],
                [[k, _num(v["sis"].get("median_pixels")), _num(v["sis"].get("median_percent"), ".2f"),
                  _pct(v["sis"].get("fraction_with_sis")),
                  _pct(v["base_on_bs_subsets"]["accuracy"]),
                  f"{v['base_on_bs_subsets']['mean_confidence']:.4f}",
                  str(v["base_on_bs_subsets"]["count"])]
                 for k, v in s["masking_values"].items()]), ""]
  if "confidence_rise" in s:
    out += ["### Confidence along backward selection", "",
            figures.markdown_table(
                ["record", "images", "confidence rises above full image (%)",
                 "rises by > 0.01 (%)", "median max rise"],
                [[k, str(v["count"]), _pct(v["fraction_rising"]), _pct(v["fraction_rising_by_0.01"]),
                  _num(v['median_max_rise'], '.4f')] for k, v in s["confidence_rise"].items()]), ""]
  if s.get("gradient_vs_exact", {}).get("num_images"):
    g = s["gradient_vs_exact"]
    out += ["### Gradient vs exact selection (SIS sample)", "",
            f"On {g['num_images']} test images with {g['num_features']} features, Batched "
            "Gradient SIS (one feature per step) against exact backward selection: the "
            "gradient ranks the single-removal effects of the first step with a median "
            f"Spearman correlation of {g['first_step_spearman_median']:+.2f} against their "
            f"exact values, and whole removal orders at {g['order_spearman_median']:+.2f}; "
            f"the kept {g['kept_features']} features overlap by {_pct(g['kept_overlap'])}%.",
            "", figures.markdown_table(
                ["subset kept from", "base model's mean confidence",
                 f"≥ τ = {tau} (%)"],
                [[k, f"{g[k]['mean_confidence']:.4f}", _pct(g[k]["fraction_at_least_tau"])]
                 for k in ("exact", "gradient", "random")]), "",
            ("The gradient, a first-order estimate, ranks single removals poorly for this "
             "model (it is far from linear in its inputs), so the features it keeps hold less "
             "of the evidence than exact selection's: compare the confidences above."
             if g["first_step_spearman_median"] < 0.5 else
             "The gradient ranks single removals close to their exact order for this model."),
            ""]
  return "\n".join(out)


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
  s = {stage: ctx.load_summary(stage) for stage in EARLIER if stage in c.stages}
  s = {k: v for k, v in s.items() if v is not None}
  view = getattr(ctx.data, "view", None)  # streamed data: the analysis view (data.view)
  md = [f"# Overinterpretation report: {c.model.name} (seed {c.seed})", "",
        f"Data: {c.data.source} ({ctx.data.num_examples('train')} train / "
        f"{ctx.data.num_examples('test')} test images, {ctx.height_width[0]}×{ctx.height_width[1]}"
        f"{'; ' + view.describe() if view is not None and view.size else ''}). "
        f"Stages run: {', '.join(k for k in EARLIER if k in s)}.", ""]
  md += ["## Table 1: pixel-subset retraining", ""]
  t1_md, t1 = table1(s, c)
  md += [t1_md, ""]
  if "backselect" in s:
    b = s["backselect"]
    md += [f"Pixel ranking: {b['method']} backward selection of {b['train']['count']} train and "
           f"{b['test']['count']} test images"
           + (f", {backselect_stage.step_words(c.backselect)}." if b["method"] != "exact"
              else "."), ""]
  if (s.get("subsets") or {}).get("border_analysis"):
    md += border_md(s["subsets"], fraction(c))
  if "sis" in s:
    md += sis_md(s["sis"], c)
  else:
    md += ["## SIS size", "", "Stage `sis` not run.", ""]
  if "controls" in s:
    md += ["## Controls", "", controls_md(s["controls"], fraction(c))]
  figs = draw_figures(ctx, s) if atomic.is_writer() else {}
  md += ["## Figures", ""] + [f"- {k}: ![{k}]({v})" for k, v in figs.items()] + [""]
  if "sis_examples" in figs:
    md += ["In `sis_examples`, each row is one test image, labelled `true class → predicted "
           "class confidence`: the predicted class is the SIS target and the confidence is the "
           f"`{next(iter(s['sis']['models']))}` model's on the full image. Each further column shows one model's SIS on a "
           "gray background (\"no SIS\": that model is below τ on the full image).", ""]
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
  cells = [(f"full images ({config.num_epochs} ep)", row["full"]),
           ("full images, retrained", row["full_same_budget"]), (f"{frac} BS", row["bs"]),
           (f"{frac} random", row["random"]), ("BS − random", row["bs_minus_random"]),
           (f"{frac} BS mask only", row["mask_only"])]
  cells = [f"{name} {_pct(value)}" for name, value in cells if value is not None]
  return [f"Test accuracy (%): {', '.join(cells)}."] if cells else []
