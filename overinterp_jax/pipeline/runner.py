"""Runs the configured stages in order, skipping those already done.

A stage is done when ``stages/<stage>.json`` exists with the fingerprint of
the config parts it depends on and every file it produced is still as it was
(the marker lists their sizes and sha256, ``artifacts.describe_files``); a
missing, truncated or changed file makes the stage run again. A file belongs
to the first stage that wrote or read it, so re-running a stage never
invalidates later ones. Everything expensive inside a stage (trained models,
backselect shards, SIS records) is cached on its own and validated when read,
so a stage killed half-way, or re-run for one bad file, redoes only what is
missing. Wall time per stage goes to ``timings.json`` (kept out of the report,
which must not depend on it).
"""
from __future__ import annotations

import os
import time
from typing import Optional

from absl import logging

from overinterp_jax.pipeline import (artifacts, controls, report, retrain_stage, sis_stage,
                                     subsets_stage)
from overinterp_jax.pipeline.context import Context

STAGES = ("train", "backselect", "subsets", "retrain", "sis", "controls", "report")


def _train(ctx) -> dict:
  return {"fingerprint": ctx.base_fp, "model": ctx.config.model,
          "test_accuracy": ctx.base.metrics["accuracy"], "test_loss": ctx.base.metrics["loss"],
          "num_epochs": int(ctx.config.num_epochs)}


def _backselect_fp(ctx) -> str:
  return artifacts.fingerprint(*[ctx.backselect_fp(s) for s in ("train", "test")])


def _backselect(ctx) -> dict:
  out = {"fingerprint": _backselect_fp(ctx), "method": ctx.config.backselect.method}
  for split in ("train", "test"):
    r = ctx.backselect(split)
    n = len(r)
    out[split] = {"count": n, "num_features": r.num_features,
                  "mean_original_score": float(r.original_scores.mean()) if n else None}
  return out


RUNNERS = {
    "train": (lambda ctx: ctx.base_fp, _train),
    "backselect": (_backselect_fp, _backselect),
    "subsets": (subsets_stage.subsets_fp, subsets_stage.run),
    "retrain": (retrain_stage.fingerprint, retrain_stage.run),
    "sis": (sis_stage.fingerprint, sis_stage.run),
    "controls": (controls.fingerprint, controls.run),
    "report": (report.fingerprint, report.run),
}


def _finished(ctx, stage: str, fp: str) -> Optional[dict]:
  """The marker of ``stage`` if it is of this config and its files are intact, else None."""
  summary = artifacts.load_json(ctx.stage_summary_path(stage), fp)
  if summary is None:
    return None
  if "outputs" not in summary:
    logging.warning("Stage %s: its marker lists no files (written by an older version); "
                    "running it again (its cached results are reused).", stage)
    return None
  problems = artifacts.changed_files(ctx.workdir, summary["outputs"])
  if problems:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5
                                      else "")
    logging.warning("Stage %s: %s. Running it again.", stage, shown)
    return None
  return summary


def run_pipeline(config, workdir: str, dataset, mesh=None) -> dict:
  """Runs ``config.stages`` in pipeline order; returns ``{stage: summary}`` (each with the
  ``outputs`` it owns)."""
  ctx = Context(config, workdir, dataset, mesh)
  timings = artifacts.load_json(ctx.path("timings.json")) or {}
  summaries = {}
  for stage in STAGES:
    if stage not in config.stages:
      continue
    fp_fn, run_fn = RUNNERS[stage]
    fp = fp_fn(ctx)
    summary = _finished(ctx, stage, fp)
    if summary is not None:
      logging.info("Stage %s: already done.", stage)
    else:
      logging.info("Stage %s: running.", stage)
      t0 = time.perf_counter()
      with artifacts.recording() as touched:
        summary = run_fn(ctx)
      owned = {os.path.abspath(ctx.path(rel)) for s in summaries.values()
               for rel in s["outputs"]}
      summary["fingerprint"] = fp
      summary["outputs"] = artifacts.describe_files(ctx.workdir, touched - owned)
      artifacts.save_json(ctx.stage_summary_path(stage), summary)
      timings[stage] = round(time.perf_counter() - t0, 1)
      artifacts.save_json(ctx.path("timings.json"), timings)
      logging.info("Stage %s: done in %.1f s.", stage, timings[stage])
    summaries[stage] = summary
  return summaries
