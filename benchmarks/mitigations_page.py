"""Writes docs/results/mitigations.md from a finished ``configs/cifar10_cpu.py:mitigations`` run.

  python benchmarks/mitigations_page.py --workdir=workdirs/mitigations \
      --log=workdirs/mitigations.log --command="python -m overinterp_jax.main ..."

The run may have been killed and resumed any number of times, all appending to one log
(absl's format). The page gives: the command; the machine; each model's training
(epochs, the sum of its epochs' seconds from ``metrics.jsonl``, test accuracy); the wall
time of every stage summed over the pieces of the run, read from the log (each process
is told apart by the thread id absl writes); whether the models predict the same class
on the SIS sample (each SIS targets its own model's prediction); and the run's own
report with its figures (copied to docs/results/mitigations/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from overinterp_jax import train  # noqa: E402  pylint: disable=wrong-import-position
from overinterp_jax.pipeline.figures import markdown_table  # noqa: E402  pylint: disable=wrong-import-position
from quickstart import cpu_name  # noqa: E402  pylint: disable=wrong-import-position

# absl: "I1201 00:13:19.501941 139814999464832 runner.py:105] Stage train: running."
LINE = re.compile(r"^[IWEF](\d\d)(\d\d) (\d\d):(\d\d):(\d\d)\.(\d+) +(\d+) ([\w.]+):\d+\] (.*)$")
RUN_STAGES = ("train", "backselect", "subsets", "retrain", "sis", "controls", "report")
MODELS = {"ensemble": ["ensemble_member_1", "ensemble_member_2"],
          "input_dropout": ["input_dropout_model"]}


def parse_log(path: str, year: int) -> list[dict]:
  """The log's absl lines as ``{"t": datetime, "process": thread id, "msg": text}``."""
  out = []
  with open(path, errors="replace") as fh:
    for line in fh:
      m = LINE.match(line.rstrip("\n"))
      if m:
        mo, d, h, mi, s, frac, tid, _, msg = m.groups()
        t = datetime.datetime(year, int(mo), int(d), int(h), int(mi), int(s),
                              int(frac[:6].ljust(6, "0")))
        out.append({"t": t, "process": tid, "msg": msg})
  return out


def pieces(lines: list[dict]) -> list[dict]:
  """One entry per process that wrote to the log: its first and last line and, per stage,
  the seconds it spent in it (to ``done`` or, if killed, to its last line)."""
  by_process: dict[str, list[dict]] = {}
  for x in lines:
    by_process.setdefault(x["process"], []).append(x)
  out = []
  for tid, xs in by_process.items():
    stages, current, started = {}, None, None
    for x in xs:
      m = re.match(r"Stage (\w+): (running|done in|already done)", x["msg"])
      if not m:
        continue
      if current is not None:  # the previous stage ends where the next begins
        stages[current] = stages.get(current, 0.0) + (x["t"] - started).total_seconds()
        current = None
      if m.group(2) == "running":
        current, started = m.group(1), x["t"]
    if current is not None:
      stages[current] = stages.get(current, 0.0) + (xs[-1]["t"] - started).total_seconds()
    if not stages:  # its stage lines were lost (e.g. overwritten by another writer)
      stages["stage not in the log"] = (xs[-1]["t"] - xs[0]["t"]).total_seconds()
    out.append({"process": tid, "start": xs[0]["t"], "end": xs[-1]["t"], "stages": stages})
  return sorted(out, key=lambda p: p["start"])


def sis_calls(lines: list[dict]) -> list[dict]:
  """The exact SIS runs of stage sis, one per model: ``{"name", "images", "seconds"}``, from
  a process's "Exact backward selection NAME: N images" line to its next such line or its
  "Stage sis: done" line. A run cut off by a kill is not listed (the re-run recomputes only
  its missing calls, so its time would be partial), nor are the controls' runs (their
  next line comes after other work)."""
  out, in_sis, open_call = [], set(), {}
  for x in lines:
    p, msg = x["process"], x["msg"]
    m = re.match(r"Exact backward selection (\w+): (\d+) images", msg)
    if p in open_call and (m or msg.startswith("Stage sis: done")):
      c = open_call.pop(p)
      out.append({"name": c["name"], "images": c["images"],
                  "seconds": (x["t"] - c["t"]).total_seconds()})
    if msg.startswith("Stage sis: running"):
      in_sis.add(p)
    elif msg.startswith("Stage "):
      in_sis.discard(p)
      open_call.pop(p, None)
    if m and p in in_sis:
      open_call[p] = {"name": m.group(1), "images": int(m.group(2)), "t": x["t"]}
  return out


def overlaps(ps: list[dict]) -> list[tuple[int, int]]:
  return [(i, j) for i in range(len(ps)) for j in range(i + 1, len(ps))
          if ps[j]["start"] < ps[i]["end"]]


def training_runs(workdir: str, config: dict) -> list[dict]:
  """Per model directory, base first: ``{"label", "dir", "epochs", "seconds", "accuracy"}``
  from its ``metrics.jsonl`` (epochs None: not trained). Seconds: the sum of its epochs'."""
  dirs = [("single (base)", config["model"]["weights"] or os.path.join(workdir, "base_model"))]
  for name, members in MODELS.items():
    dirs += [(f"{name}: {m}", os.path.join(workdir, m)) for m in members]
  runs = []
  for label, d in dirs:
    metrics = train.read_metrics(os.path.join(d, "metrics.jsonl"))
    runs.append({
        "label": label, "dir": d, "epochs": metrics[-1]["epoch"] if metrics else None,
        "seconds": sum(r.get("epoch_seconds") or 0.0 for r in metrics),
        "accuracy": next((r["test_accuracy"] for r in reversed(metrics)
                          if r.get("test_accuracy") is not None), None)})
  return runs


def training_rows(runs: list[dict]) -> list[list[str]]:
  rows = []
  for r in runs:
    if r["epochs"] is None:
      rows.append([r["label"], "—", "—", "—", "not trained"])
    else:
      rows.append([r["label"], str(r["epochs"]), f"{r['seconds'] / 60:.1f}",
                   "—" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}",
                   os.path.relpath(r["dir"], REPO)])
  return rows


def agreement(workdir: str, names) -> list[str]:
  """How often each model's target (its prediction on the full image) equals the single
  model's on the SIS sample."""
  recs = {}
  for name in names:
    path = os.path.join(workdir, "sis", f"{name}.npz")
    if os.path.exists(path):
      with np.load(path) as z:
        recs[name] = np.asarray(z["targets"])
  if "single" not in recs:
    return []
  out = []
  for name, t in recs.items():
    if name != "single":
      same = int((t == recs["single"]).sum())
      out.append(f"{name} predicts the single model's class on {same} of {len(t)} images")
  return out


def _dropout_seed(config: dict) -> int:
  """``sis.input_dropout_seed`` of a saved config (``sis.input_dropout_key`` before issue 29)."""
  sis = config["sis"]
  return sis["input_dropout_seed"] if "input_dropout_seed" in sis else sis["input_dropout_key"]


def write_page(workdir: str, log: str, command: str, out: str, reading: str = "") -> None:
  with open(os.path.join(workdir, "config.json")) as fh:
    config = json.load(fh)
  if not os.path.exists(os.path.join(workdir, "report.md")):
    sys.exit(f"{workdir} has no report.md: the run has not finished its report stage.")
  lines = parse_log(log, datetime.date.today().year)
  ps = pieces(lines)
  totals: dict[str, float] = {}
  for p in ps:
    for stage, s in p["stages"].items():
      if stage in RUN_STAGES:
        totals[stage] = totals.get(stage, 0.0) + s
  figures_dir = os.path.join(os.path.dirname(out), "mitigations")
  shutil.rmtree(figures_dir, ignore_errors=True)
  shutil.copytree(os.path.join(workdir, "figures"), figures_dir)
  with open(os.path.join(workdir, "report.md")) as fh:
    report = fh.read().replace("](figures/", "](mitigations/")
  report = re.sub(r"^#", "##", report, flags=re.M)
  piece_rows = [[str(i + 1), p["start"].strftime("%Y-%m-%d %H:%M"), p["end"].strftime("%H:%M"),
                 ", ".join(f"{k} {v / 60:.1f} min" for k, v in p["stages"].items()) or "—"]
                for i, p in enumerate(ps)]
  both = overlaps(ps)
  agree = agreement(workdir, config["sis"]["models"])
  runs = training_runs(workdir, config)
  calls = sis_calls(lines)
  call_rows = [[c["name"], str(c["images"]), f"{c['seconds'] / 60:.1f}",
                f"{c['seconds'] / c['images']:.1f}"] for c in calls]
  page = [
      "# Mitigations with intervals: ensembles and input dropout on CIFAR-10 (CPU)", "",
      f"* **Command:** `{command}`, killed and re-run with the same command where the table of "
      "pieces below shows more than one (the run resumes from checkpoints and stored SIS calls).",
      f"* **Config:** `configs/cifar10_cpu.py:mitigations` (saved as `{workdir}/config.json`).",
      f"* **Machine:** {os.cpu_count()} CPU cores ({cpu_name()}), no accelerator.",
      f"* **Dates:** {ps[0]['start']:%Y-%m-%d %H:%M} to {ps[-1]['end']:%Y-%m-%d %H:%M} (UTC).",
      "* **Page written by** `python benchmarks/mitigations_page.py` from the work directory "
      "and the run's log.", "",
      *([reading, ""] if reading else []),
      "## Models and their training", "",
      "Every model trains with the base model's recipe and budget "
      "(`configs/cifar10_cpu.py`: 33 epochs), with its own seed; the input-dropout model keeps "
      "each pixel with probability 0.8. Seconds: the sum of each epoch's own time in "
      "`metrics.jsonl` (evaluation passes apart).", "",
      markdown_table(["model", "epochs", "training (min)", "test accuracy (%)", "directory"],
                     training_rows(runs)), "",
      *(["The input-dropout model's accuracy here is training's evaluation, with its fixed "
         "evaluation dropout mask; the SIS table below evaluates it as SIS sees it, with "
         f"{config['sis']['input_dropout_samples']} fixed mask(s) from "
         f"`sis.input_dropout_seed = {_dropout_seed(config)}`, so the two differ "
         "slightly. The ensemble's accuracy is that of its mean logits (SIS table).", ""]
        if "input_dropout" in config["sis"]["models"] else []),
      "## Wall time per stage", "",
      "Summed over the pieces of the run (each a process, from the log): "
      + ", ".join(f"{k} {v / 60:.1f} min" for k, v in totals.items()) + ".", "",
      markdown_table(["piece", "start", "end", "stages (time in this piece)"], piece_rows), "",
      f"Stage sis trains the models it compares that are missing: "
      f"{sum(r['seconds'] for r in runs[1:]) / 60:.1f} min of its time are the epochs of the ensemble's "
      "extra members and the input-dropout model (table above); the rest is loading and "
      "evaluating the models, the exact SISes, and epochs lost to kills (a re-run resumes "
      "from the last checkpoint).", "",
      *(["Exact SIS runs of stage sis (from the log; a run cut by a kill is not listed):", "",
         markdown_table(["model", "images", "minutes", "s / image"], call_rows), ""]
        if call_rows else []),
      *([f"Pieces {', '.join(f'{i + 1} and {j + 1}' for i, j in both)} overlap: two processes "
         "ran at once on the same directory (a restart whose kill missed the first process; "
         "both computed the same deterministic epochs, and a run now locks its work "
         "directory). The later one's first lines were overwritten in the log by the earlier "
         "one (which wrote without appending), so its time is not in the stage totals; the "
         "earlier one's includes the contention.", ""] if both else []),
      *(["On the SIS sample, " + "; ".join(agree) + ".", ""] if agree else []),
      "## The run's report", "", report.strip(), ""]
  with open(out, "w") as fh:
    fh.write("\n".join(page))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=os.path.join(REPO, "workdirs", "mitigations"))
  parser.add_argument("--log", default=os.path.join(REPO, "workdirs", "mitigations.log"))
  parser.add_argument("--command", required=True)
  parser.add_argument("--reading", default=os.path.join(REPO, "benchmarks", "results",
                                                        "mitigations_reading.md"),
                      help="markdown placed after the page's header: what the run says, "
                           "written by a person from the numbers (empty: none)")
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "results", "mitigations.md"))
  args = parser.parse_args(argv)
  reading = ""
  if args.reading:
    with open(args.reading) as fh:
      reading = fh.read().strip()
  write_page(args.workdir, args.log, args.command, args.out, reading)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
