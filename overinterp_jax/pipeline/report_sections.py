"""The sections of ``report.md`` that the stages own, as markdown lines.

Each stage's ``report`` (``registry.Stage``) is one of the ``*_section`` functions here:
``(ctx, summaries) -> lines``, drawn from the stored summaries alone (``summaries``:
``{stage: summary}`` of the stages that ran). Formatting helpers (``fraction``, the
tables) are shared with ``report.py``.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from overinterp_jax.pipeline import backselect_stage, figures


def fraction(config) -> str:
  """``config.subsets.frac_kept`` as a heading shows it: ``"5%"``."""
  return f"{100 * float(config.subsets.frac_kept):g}%"


def pct(x) -> str:
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
  row = {"model": config.model.name, "seed": int(config.train.seed),
         "frac_kept": float(config.subsets.frac_kept), "full": full,
         "full_same_budget": full_retrained, "bs": bs,
         "random": rnd, "mask_only": mask_only, "border": border,
         "bs_minus_random": None if bs is None or rnd is None else bs - rnd,
         "reference_minus_bs": None if bs is None or reference is None else reference - bs}
  frac = fraction(config)
  retrain_epochs = int(config.retrain.num_epochs) or int(config.train.num_epochs)
  headers = ["model", "seed", f"full images ({config.train.num_epochs} ep)",
             f"full images, retrained ({retrain_epochs} ep)", f"{frac} BS", f"{frac} random",
             "BS − random", f"{frac} BS mask only"]
  cells = [config.model.name, str(config.train.seed), pct(full), pct(full_retrained), pct(bs),
           pct(rnd), pct(row["bs_minus_random"]), pct(mask_only)]
  if border is not None:
    headers.append(f"{frac} border frame")
    cells.append(pct(border))
  md = figures.markdown_table(headers, [cells])
  lines = [md, "", "Test accuracy (%); each model trained and tested on the same kind of input. "
           f"Subset models (and the second full-image column) train for {retrain_epochs} epochs."]
  for ref, which in ((full, f"the full-image model ({config.train.num_epochs} ep)"),
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
    chance = 1.0 / int(config.model.num_classes)
    verdict = ("the subset **positions alone predict the class** well above chance"
               if mask_only > chance + 0.1 else "positions alone predict little")
    lines.append(f"- Mask only: {pct(mask_only)}% from positions alone (chance "
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
  rows = [[k, pct(v["accuracy"]), f"{v['mean_confidence']:.4f}",
           pct(v["fraction_confident_99"])] for k, v in base.items()]
  if tau != 0.99:
    headers.append(f"≥ τ = {tau:g} confident (%)")
    for row, v in zip(rows, base.values()):
      row.append(pct(v.get("fraction_confident_tau")))
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
    rows.append([name, pct(m["test_accuracy"]),
                 str(m["epochs"]) if m.get("epochs") else "—",
                 pct(m.get("fraction_full_image_reaches_threshold")),
                 str(m["count"]), pct(m["fraction_with_sis"]),
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
           _num(d.get("median_paired_difference"), "g"), pct(d.get("fraction_larger"))]
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
  rows = [[split, str(v["num_images"]), pct(v["band_share_of_image"]),
           pct(v["fraction_kept_in_band"]), _num(v["ratio_to_uniform"], ".2f"),
           pct(v["max_position_frequency"])] for split, v in s["border_analysis"].items()]
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
  if selection == "exact":
    how = "exact backward selection"
  elif "coarse_to_fine" in s:
    how = f"coarse-to-fine backward selection: {s['coarse_to_fine']['how']}"
  else:
    how = (f"{selection} backward selection ("
           f"{backselect_stage.step_words(config.backselect)}, stage backselect's records)")
  p = s["patch_size"]
  out = [f"## SIS size at τ = {s['threshold']} ({s['num_images']} test images, {how}, "
         f"{p}×{p}-pixel features)", ""]
  if "coarse_to_fine" in s:
    starts = ", ".join(f"{name} {v:g}" for name, v in s["coarse_to_fine"]["median_start"].items())
    out += ["Median pixels the exact selection on pixels started from, per model: "
            f"{starts} (the rest of each image was ranked on patches).", ""]
  if "qualifying" in s:
    which = " and classifies correctly" if s["only_correct"] else ""
    who = "every model" if s.get("all_models") else "the base model"
    out += [f"Sampled from the {s['qualifying']} test images {who} gives confidence "
            f"≥ {s['min_confidence']:g}{which}.", ""]
  if not s["num_images"]:
    return out + ["No test image qualifies: no SIS to report.", ""]
  return out + [sis_table(s), ""] + differences_md(s)


def _smoothed_row(row: str, summary: dict) -> str:
  """A smoothed-control row's label naming its sample and the sample's size (rows of
  different samples never share a label), e.g. ``gradient/single, test sample (n = 40)``;
  the bare row for summaries written before they recorded their sample."""
  if "sample" not in summary:
    return row
  return figures.sample_label(row, summary["sample"], int(summary["images"]))


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
                [[_smoothed_row(k, v), str(v["count"]), f"{_num(v['median_pixels_sis'])} → "
                  f"{_num(v['median_pixels_dilated'])}",
                  f"{v['median_confidence_sis']:.4f}" if v["count"] else "—",
                  f"{v['median_confidence_dilated']:.4f}" if v["count"] else "—",
                  pct(v["fraction_dilated_below_threshold"])]
                 for k, v in s["smoothed"].items()]), ""]
  if "targeted" in s:
    t = s["targeted"]
    w, p = t["wrong_class"], t["predicted_class"]
    out += ["### Targeted SIS (random wrong class)", "",
            figures.markdown_table(
                ["target", "images", f"reach τ={tau} (%)", "median SIS (px)",
                 "median SIS (% of image)"],
                [["predicted class", str(t["num_images"]), pct(p.get("fraction_with_sis")),
                  _num(p.get("median_pixels")), _num(p.get("median_percent"), ".2f")],
                 ["random wrong class", str(t["num_images"]),
                  pct(w["fraction_reached_threshold"]),
                  _num(w.get("median_pixels")), _num(w.get("median_percent"), ".2f")]]),
            "", f"Wrong class: median full-image confidence {w['median_full_image_confidence']:.4f}, "
            f"median best confidence along backward selection {w['median_max_confidence']:.4f}; "
            f"the fully masked image alone reaches τ for {pct(w['fraction_fully_masked_reaches'])}%.",
            ""]
  if "masking_values" in s:
    out += ["### Masking value", "",
            figures.markdown_table(
                ["masked value", "median SIS (px)", "median SIS (%)", "images with SIS (%)",
                 f"base on own {frac} BS test subsets: acc (%)", "mean confidence", "test images"],
                [[k, _num(v["sis"].get("median_pixels")), _num(v["sis"].get("median_percent"), ".2f"),
                  pct(v["sis"].get("fraction_with_sis")),
                  pct(v["base_on_bs_subsets"]["accuracy"]),
                  f"{v['base_on_bs_subsets']['mean_confidence']:.4f}",
                  str(v["base_on_bs_subsets"]["count"])]
                 for k, v in s["masking_values"].items()]), ""]
  if "confidence_rise" in s:
    out += ["### Confidence along backward selection", "",
            figures.markdown_table(
                ["record", "images", "confidence rises above full image (%)",
                 "rises by > 0.01 (%)", "median max rise"],
                [[k, str(v["count"]), pct(v["fraction_rising"]), pct(v["fraction_rising_by_0.01"]),
                  _num(v['median_max_rise'], '.4f')] for k, v in s["confidence_rise"].items()]), ""]
  if s.get("gradient_vs_exact", {}).get("num_images"):
    g = s["gradient_vs_exact"]
    out += ["### Gradient vs exact selection (SIS sample)", "",
            f"On {g['num_images']} test images with {g['num_features']} features, Batched "
            "Gradient SIS (one feature per step) against exact backward selection: the "
            "gradient ranks the single-removal effects of the first step with a median "
            f"Spearman correlation of {g['first_step_spearman_median']:+.2f} against their "
            f"exact values, and whole removal orders at {g['order_spearman_median']:+.2f}; "
            f"the kept {g['kept_features']} features overlap by {pct(g['kept_overlap'])}%.",
            "", figures.markdown_table(
                ["subset kept from", "base model's mean confidence",
                 f"≥ τ = {tau} (%)"],
                [[k, f"{g[k]['mean_confidence']:.4f}", pct(g[k]["fraction_at_least_tau"])]
                 for k in ("exact", "gradient", "random")]), "",
            ("The gradient, a first-order estimate, ranks single removals poorly for this "
             "model (it is far from linear in its inputs), so the features it keeps hold less "
             "of the evidence than exact selection's: compare the confidences above."
             if g["first_step_spearman_median"] < 0.5 else
             "The gradient ranks single removals close to their exact order for this model."),
            ""]
  return "\n".join(out)


def train_section(ctx, s: dict) -> list[str]:
  """Table 1 (stage train's base model beside stage retrain's models), shown whichever ran."""
  md, _ = table1(s, ctx.config)
  return ["## Table 1: pixel-subset retraining", "", md, ""]


def subsets_section(ctx, s: dict) -> list[str]:
  if not (s.get("subsets") or {}).get("border_analysis"):
    return []
  return border_md(s["subsets"], fraction(ctx.config))


def sis_section(ctx, s: dict) -> list[str]:
  if "sis" not in s:
    return ["## SIS size", "", "Stage `sis` not run.", ""]
  return sis_md(s["sis"], ctx.config)


def controls_section(ctx, s: dict) -> list[str]:
  if "controls" not in s:
    return []
  return ["## Controls", "", controls_md(s["controls"], fraction(ctx.config))]
