"""What bfloat16 compute does to exact backward selection (run after the `train` stage).

With the base model of a pipeline work directory, on a seeded sample of test
images, runs exact backselect (``sis.batched_backselect``) on p×p-pixel
features twice, in float32 and with ``compute_dtype="bfloat16"``, and compares:
  * Spearman correlation of the features' removal positions, per image;
  * how often the whole order is identical;
  * SIS sizes at τ (the config's ``sis.threshold``): mean |difference|, how
    often equal, and whether a SIS exists in both;
  * overlap of the kept ⌈frac_kept·d⌉ last-removed features (the subsets);
  * seconds per image of each.

  python benchmarks/precision_effect.py --config=configs/cifar10_cpu.py \\
      --workdir=workdirs/cifar10_cpu --num_images=16 --patch=4 --out=precision.json
"""
from __future__ import annotations

import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from overinterp_jax import sis
import workdir_script
from overinterp_jax.selection import features
from overinterp_jax.selection.rank_stats import spearman

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Pipeline config.", lock_config=True)
flags.DEFINE_string("workdir", None, "Work directory with a finished train stage.")
flags.DEFINE_integer("num_images", 16, "Test images (the sis stage's seeded permutation).")
flags.DEFINE_integer("patch", 4, "Feature side in pixels (4: 64 features on CIFAR).")
flags.DEFINE_string("out", "", "Write the results here as JSON.")


def compare(ctx) -> dict:
  tau = float(ctx.config.sis.threshold)
  frac = float(ctx.config.subsets.frac_kept)
  h, w = ctx.height_width
  fmap = features.patch_feature_map(h, w, FLAGS.patch)
  idx = ctx.sis_sample.test_sample(FLAGS.num_images)
  images = ctx.feed("test").batch(idx)[0]
  runs, seconds = {}, {}
  for policy in ("float32", "bfloat16"):
    start = time.perf_counter()
    runs[policy] = sis.batched_backselect(
        ctx.base.apply, images, params=ctx.base.variables, feature_map=fmap,
        target_classes=None if policy == "float32" else runs["float32"].target_classes,
        compute_dtype=policy, mesh=ctx.mesh)
    seconds[policy] = (time.perf_counter() - start) / len(idx)
  f32, b16 = runs["float32"], runs["bfloat16"]
  s32, s16 = sis.sis_from_backselect(f32, tau), sis.sis_from_backselect(b16, tau)
  both = s32.exists & s16.exists
  k32, k16 = sis.keep_mask(f32.order, frac), sis.keep_mask(b16.order, frac)
  per_image = [spearman(a[None], b[None]) for a, b in zip(f32.order, b16.order)]
  return {
      "num_images": int(len(idx)), "num_features": int(fmap.max() + 1), "threshold": tau,
      "spearman_mean": float(np.mean(per_image)), "spearman_min": float(np.min(per_image)),
      "identical_orders": float(np.mean(np.all(f32.order == b16.order, axis=1))),
      "sis_exists_float32": int(s32.exists.sum()), "sis_exists_bfloat16": int(s16.exists.sum()),
      "sis_exists_both": int(both.sum()),
      "sis_size_float32": s32.size[both].tolist(), "sis_size_bfloat16": s16.size[both].tolist(),
      "sis_size_mean_abs_diff": float(np.abs(s32.size[both] - s16.size[both]).mean())
                                if both.any() else None,
      "sis_size_equal": float(np.mean(s32.size[both] == s16.size[both])) if both.any() else None,
      "kept_overlap": float((k32 & k16).sum(1).mean() / k32[0].sum()),
      "max_abs_confidence_diff": float(np.abs(f32.values - b16.values).max()),
      "seconds_per_image": seconds}


def main(argv):
  del argv
  workdir_script.run(compare)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  sys.path.insert(0, ".")
  app.run(main)
