"""One Table-1 markdown table from several pipeline work directories.

  python -m overinterp_jax.collect workdirs/table1/*_seed*

Reads each directory's ``report.json`` (written by the ``report`` stage) and
prints one row per architecture and seed, plus a mean row per architecture.
"""
from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

from overinterp_jax.pipeline.figures import markdown_table

COLUMNS = (("full", "full images"), ("full_same_budget", "full images (retrain budget)"),
           ("bs_5pct", "5% BS"), ("random_5pct", "5% random"), ("bs_minus_random", "BS − random"),
           ("mask_only_5pct", "5% BS mask only"))


def _pct(x) -> str:
  return "—" if x is None else f"{100 * x:.2f}"


def collect(workdirs) -> str:
  rows, by_model = [], defaultdict(list)
  for w in workdirs:
    path = os.path.join(w, "report.json")
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist: run the pipeline's report stage in {w}.")
    with open(path) as fh:
      t1 = json.load(fh)["table1"]
    rows.append([t1["model"], str(t1["seed"])] + [_pct(t1.get(k)) for k, _ in COLUMNS])
    by_model[t1["model"]].append(t1)
  for model, items in by_model.items():
    if len(items) > 1:
      means = []
      for k, _ in COLUMNS:
        vals = [t[k] for t in items if t.get(k) is not None]
        means.append(_pct(sum(vals) / len(vals)) if vals else "—")
      rows.append([f"**{model}**", f"mean of {len(items)}"] + means)
  return markdown_table(["model", "seed"] + [c for _, c in COLUMNS], rows)


def main(argv) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  print(collect(argv[1:]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
