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

# (report.json's table1 key, column heading); "{frac}" is the rows' subsets.frac_kept.
COLUMNS = (("full", "full images"), ("full_same_budget", "full images (retrain budget)"),
           ("bs", "{frac} BS"), ("random", "{frac} random"), ("bs_minus_random", "BS − random"),
           ("mask_only", "{frac} BS mask only"))
# table1 keys of reports written before the keys named the retrain models.
_OLD_KEYS = ("bs_5pct", "random_5pct", "mask_only_5pct")


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
    if any(k in t1 for k in _OLD_KEYS):
      raise ValueError(f"{path} has the table1 keys of an older version ({', '.join(_OLD_KEYS)}"
                       f"): delete {os.path.join(w, 'stages', 'report.json')} and rerun the "
                       "pipeline in that directory to rewrite its report.")
    rows.append([t1["model"], str(t1["seed"])] + [_pct(t1.get(k)) for k, _ in COLUMNS])
    by_model[t1["model"]].append(t1)
  for model, items in by_model.items():
    if len(items) > 1:
      means = []
      for k, _ in COLUMNS:
        vals = [t[k] for t in items if t.get(k) is not None]
        means.append(_pct(sum(vals) / len(vals)) if vals else "—")
      rows.append([f"**{model}**", f"mean of {len(items)}"] + means)
  fracs = {t["frac_kept"] for items in by_model.values() for t in items}
  frac = f"{100 * fracs.pop():g}%" if len(fracs) == 1 else "mixed-fraction"
  return markdown_table(["model", "seed"] + [c.format(frac=frac) for _, c in COLUMNS], rows)


def main(argv) -> int:
  if len(argv) < 2:
    print(__doc__, file=sys.stderr)
    return 2
  print(collect(argv[1:]))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv))
