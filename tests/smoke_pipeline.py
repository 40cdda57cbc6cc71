"""Running ``main`` on the smoke config in a subprocess, as a user would (shared by tests)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("sis_examples.png", "confidence_vs_pixels_removed.png", "sis_size_histograms.png",
           "smoothed_sis_confidence.png", "confidence_rise.png")


def command(workdir, *args):
  return [sys.executable, "-m", "overinterp_jax.main", "--config=configs/smoke.py",
          f"--workdir={workdir}", *args]


def env():
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def run_main(workdir, *args):
  return subprocess.run(command(workdir, *args), cwd=REPO, capture_output=True, text=True,
                        timeout=900, env=env())


def outputs(workdir):
  """The bytes of the report and its figures: equal for equal results."""
  out = {name: (workdir / name).read_bytes() for name in ("report.md", "report.json")}
  out.update({f: (workdir / "figures" / f).read_bytes() for f in FIGURES})
  return out
