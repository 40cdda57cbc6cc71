"""Times the README's quick start and writes its results page, docs/results/quickstart.md.

  python benchmarks/quickstart.py

Runs ``python -m overinterp_jax.main --config=configs/cifar10_cpu.py:analyze`` in a fresh
work directory (the shipped model on the shipped 1,000 test images), measures its wall
time and the machine's load, then writes the page: the command, the machine, the time,
the shipped model's record, and the run's own report with its figures (copied to
docs/results/quickstart/). Re-run it whenever the shipped model changes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = ["-m", "overinterp_jax.main", "--config=configs/cifar10_cpu.py:analyze"]


def cpu_name() -> str:
  try:
    with open("/proc/cpuinfo") as fh:
      for line in fh:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def run_quickstart(workdir: str) -> dict:
  """Runs the quick start in ``workdir``; returns wall seconds and load averages."""
  load_before = os.getloadavg()[0]
  t0 = time.perf_counter()
  proc = subprocess.run([sys.executable, *COMMAND, f"--workdir={workdir}"], cwd=REPO,
                        capture_output=True, text=True)
  seconds = time.perf_counter() - t0
  if proc.returncode != 0:
    sys.exit(f"The quick start failed:\n{proc.stderr[-4000:]}")
  return {"seconds": seconds, "load_before": load_before, "load_after": os.getloadavg()[0]}


def config():
  """The quick start's config (``configs/cifar10_cpu.py:analyze``)."""
  sys.path.insert(0, REPO)
  from configs import cifar10_cpu  # pylint: disable=import-outside-toplevel
  return cifar10_cpu.get_config("analyze")


def sis_words() -> str:
  """How the quick start selects SIS pixels, from its config."""
  c = config()
  if c.sis.selection != "coarse_to_fine":
    return f"{c.sis.selection} backward selection ({c.sis.patch_size}×{c.sis.patch_size} features)"
  sizes = [f"{p}×{p}" for p in tuple(c.coarse_to_fine.patch_sizes)[:-1]]
  return (f"coarse-to-fine selection (exact selection on {' and '.join(sizes)} patches places "
          "exact selection on single pixels)")


def write_page(workdir: str, timing: dict, out: str) -> None:
  sys.path.insert(0, REPO)  # this checkout's package, whatever is installed
  from overinterp_jax.models import shipped  # pylint: disable=import-outside-toplevel
  record = shipped.info("resnet20_cifar10")
  figures_dir = os.path.join(os.path.dirname(out), "quickstart")
  shutil.rmtree(figures_dir, ignore_errors=True)
  shutil.copytree(os.path.join(workdir, "figures"), figures_dir)
  with open(os.path.join(workdir, "report.md")) as fh:
    report = fh.read()
  report = report.replace("](figures/", "](quickstart/")
  report = re.sub(r"^#", "##", report, flags=re.M)  # its headings go one level down
  with open(os.path.join(workdir, "timings.json")) as fh:
    stages = json.load(fh)
  minutes, seconds = divmod(round(timing["seconds"]), 60)
  lines = [
      "# Quick start: the shipped ResNet-20 on the shipped CIFAR-10 test images", "",
      "* **Command:** `time python -m overinterp_jax.main --config=configs/cifar10_cpu.py:analyze"
      " --workdir=/tmp/qs`, in a fresh work directory (timed by `python benchmarks/quickstart.py`,"
      " which wrote this page).",
      "* **What runs:** no training. Stage `train` loads the shipped model; Batched Gradient SIS"
      " ranks every pixel of the 1,000 shipped test images (128 pixels per step); the model is"
      f" scored on its own 5% subsets and on random ones; {sis_words()} finds SISes of single"
      f" pixels at τ = {config().sis.threshold:g} of {config().sis.num_images} images it"
      f" classifies with confidence ≥ {config().sis.min_confidence:g}; the smoothed-SIS and"
      " confidence-rise controls; the report.",
      f"* **Machine:** {os.cpu_count()} CPU cores ({cpu_name()}), no accelerator; load average"
      f" {timing['load_before']:.1f} before and {timing['load_after']:.1f} after the run.",
      f"* **Date:** {datetime.date.today().isoformat()}.",
      f"* **Wall time:** {minutes} min {seconds} s for the whole command, JAX start-up and"
      " compilation included; per stage (s): "
      + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()) + ".",
      f"* **Model:** `{record['name']}` ({record['model']}, `{record['config']}`,"
      f" {record['num_epochs']} epochs): {100 * record['test_accuracy']:.2f}% on the"
      f" {record['test_images']:,} CIFAR-10 test images, {100 * record['slice_accuracy']:.1f}%"
      f" on the shipped 1,000; weights sha256 `{record['sha256'][:16]}…`.",
      *([f"* **Note on this model:** {record['note']}"] if record.get("note") else []), "",
      "The run's report, as written to `/tmp/qs/report.md`:", "", report.strip(), ""]
  with open(out, "w") as fh:
    fh.write("\n".join(lines))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "results", "quickstart.md"))
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as workdir:
    timing = run_quickstart(workdir)
    write_page(workdir, timing, args.out)
  print(f"{timing['seconds']:.1f} s (load {timing['load_before']:.1f} -> "
        f"{timing['load_after']:.1f}); wrote {args.out}")


if __name__ == "__main__":
  main()
