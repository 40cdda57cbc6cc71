"""Runs the configured stages in order (``registry``), skipping those already done.

A stage's dependencies are derived, not listed: it runs with a recording
config (``config_reads``), and its marker ``stages/<stage>.json`` stores the
config paths it read (``config_reads``) and its fingerprint: a hash of the
fingerprints of the stages before it (every earlier stage of ``config.stages``:
a linear chain), the data's identity and the values at those paths. The stage is
done when the current config gives the same fingerprint and every file it
produced is still as it was (the marker lists their sizes and sha256,
``atomic.describe_files``); a missing, truncated or changed file makes the
stage run again. So changing any value a stage read reruns it and every later
stage; a value it never read does not. A file belongs to the first stage that
wrote or read it, so re-running a stage never invalidates later ones' files.
Everything expensive inside a stage (trained models, backselect shards, SIS
records) is cached on its own, keyed the same way by what its producer read, and
validated when read, so a stage killed half-way, or re-run for one bad file,
redoes only what is missing. Wall time per stage goes to ``timings.json`` (kept
out of the report, which must not depend on it).
"""
from __future__ import annotations

import os
import time
from typing import Optional

from absl import logging

from overinterp_jax import config_reads
from overinterp_jax.pipeline import registry
from overinterp_jax.pipeline.context import MARKER_KEYS, Context
from overinterp_jax.store import atomic, hashing, locks


def stage_fingerprint(config, upstream: dict, data_fp: str, paths) -> str:
  """The fingerprint of a stage that read ``paths`` of ``config``, after stages ``upstream``
  (``{stage: fingerprint}``) on the data ``data_fp``."""
  return hashing.fingerprint(upstream, data_fp, config_reads.values_fingerprint(config, paths))


def _finished(ctx, stage: str, upstream: dict) -> Optional[dict]:
  """The marker of ``stage`` if it is of this config and its files are intact, else None."""
  summary = atomic.load_json(ctx.stage_summary_path(stage))
  if summary is None:
    return None
  if any(k not in summary for k in ("outputs", "config_reads", "config_known")):
    logging.warning("Stage %s: its marker lists no files or config reads (written by an older "
                    "version); running it again (its cached results are reused).", stage)
    return None
  if summary["fingerprint"] != stage_fingerprint(ctx.config, upstream, ctx.data_fp,
                                                 summary["config_reads"]):
    logging.info("Stage %s: its config values or earlier stages changed.", stage)
    return None
  newer = config_reads.changed_new_keys(ctx.config, summary["config_known"])
  if newer:
    logging.info("Stage %s: keys newer than its run are set (%s).", stage, ", ".join(newer))
    return None
  problems = atomic.changed_files(ctx.workdir, summary["outputs"])
  if problems:
    shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5
                                      else "")
    logging.warning("Stage %s: %s. Running it again.", stage, shown)
    return None
  return summary


def run_pipeline(config, workdir: str, dataset, mesh=None) -> dict:
  """Runs ``config.stages`` in pipeline order (``registry.names()``); returns ``{stage:
  summary}`` (each with the ``outputs`` it owns and the ``config_reads`` its fingerprint
  covers)."""
  ctx = Context(config_reads.recording_view(config), workdir, dataset, mesh)
  timings = atomic.load_json(ctx.path("timings.json")) or {}
  summaries = {}
  for stage in registry.names():
    if stage not in config.stages:
      continue
    upstream = {s: summary["fingerprint"] for s, summary in summaries.items()}
    summary = _finished(ctx, stage, upstream)
    if summary is not None:
      logging.info("Stage %s: already done.", stage)
    else:
      locks.require_writable(ctx.workdir, f"stage {stage} must run")
      logging.info("Stage %s: running.", stage)
      t0 = time.perf_counter()
      ctx.stage = stage
      with atomic.recording() as touched, config_reads.recording() as reads:
        summary = registry.get(stage).run(ctx)
      ctx.stage = None
      owned = {os.path.abspath(ctx.path(rel)) for s in summaries.values()
               for rel in s["outputs"]}
      paths = sorted(reads.paths)
      summary["fingerprint"] = stage_fingerprint(ctx.config, upstream, ctx.data_fp, paths)
      summary["config_reads"] = paths
      summary["config_known"] = config_reads.leaf_paths(ctx.config)
      summary["upstream"] = upstream
      summary["outputs"] = atomic.describe_files(ctx.workdir, touched - owned)
      atomic.save_json(ctx.stage_summary_path(stage), summary)
      timings[stage] = round(time.perf_counter() - t0, 1)
      atomic.save_json(ctx.path("timings.json"), timings)
      logging.info("Stage %s: done in %.1f s.", stage, timings[stage])
    summaries[stage] = summary
  return summaries
