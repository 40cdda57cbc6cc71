"""Stage ``report``: ``report.md``, ``report.json`` and PNG figures in the work directory.

Built only from what earlier stages stored (stage summaries, backselect
shards, SIS records), so it never recomputes anything and is identical for
the same config and seed. Sections for stages that did not run say so. Each stage
writes its own section and figures (``registry.Stage``); this module imports none of
them, only the registry.
"""
from __future__ import annotations

import os

from overinterp_jax.pipeline import registry
from overinterp_jax.pipeline.context import MARKER_KEYS
from overinterp_jax.pipeline.report_sections import fraction, pct, table1
from overinterp_jax.store import atomic


def _without_timings(x):
  """``x`` less timings and what the runner adds to a stage's marker (not results)."""
  if isinstance(x, dict):
    return {k: _without_timings(v) for k, v in x.items()
            if "seconds" not in k and k not in MARKER_KEYS}
  return x


def draw_figures(ctx, s: dict) -> dict:
  """The figures of every stage before this one (``registry.figures``) whose inputs exist
  (``s``: the stages' summaries), in the registry's ``figure_order``; returns ``{name: path
  relative to the work directory}``."""
  made = {}
  earlier = registry.earlier("report")
  for stage in registry.figure_order():
    if stage in earlier:
      made.update(registry.figures(registry.get(stage), ctx, s))
  return {k: os.path.relpath(v, ctx.workdir) for k, v in made.items()}


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
