"""Stage ``subsets``: backward-selection and random pixel-subsets of train and test images.

BS subsets keep the last-removed ``ceil(frac_kept · d)`` pixels of each
image's backward selection; random subsets keep as many uniformly random
pixels, drawn once per split from fixed seeds (the public code: 1234 train,
5678 test). Masks are ``[N, H, W]`` bool, stored bit-packed in
``subsets/masks.npz``.
"""
from __future__ import annotations

import numpy as np

from overinterp_jax import config_reads, sis
from overinterp_jax.pipeline import artifacts, masked_data
from overinterp_jax.selection import records

KINDS = ("bs", "random")


def compute_masks(ctx) -> dict:
  """``{"bs_train", "bs_test", "random_train", "random_test"}`` -> ``[N, H, W]`` bool."""
  c = ctx.config.subsets
  h, w = ctx.height_width
  masks = {}
  for split in ("train", "test"):
    order = ctx.backselect(split)["order"]
    masks[f"bs_{split}"] = sis.keep_mask(order, float(c.frac_kept)).reshape(-1, h, w)
    seed = int(c.random_seed_train if split == "train" else c.random_seed_test)
    masks[f"random_{split}"] = sis.random_keep_mask(
        len(order), h * w, float(c.frac_kept), seed).reshape(-1, h, w)
  return masks


def load_or_compute(ctx) -> dict:
  h, w = ctx.height_width
  path = ctx.path("subsets", "masks.npz")
  # keyed by the rankings and what it reads
  with ctx.owned_by("subsets"), config_reads.recording() as reads:
    orders = {split: ctx.backselect(split)["order"] for split in ("train", "test")}
    key = config_reads.Key(artifacts.checksum(orders), ctx.config, reads)
    stored = artifacts.load(path, key)
    if stored is None:
      masks = compute_masks(ctx)
      artifacts.save(path, {k: masked_data.pack_masks(v) for k, v in masks.items()}, key)
      return masks
  return {k: masked_data.unpack_masks(v, w).reshape(-1, h, w) for k, v in stored.items()}


def run(ctx) -> dict:
  masks = load_or_compute(ctx)
  d = int(np.prod(ctx.height_width))
  kept = records.pixels_to_keep(d, float(ctx.config.subsets.frac_kept))
  counts = {k: int(v.reshape(len(v), -1).sum(1).max()) for k, v in masks.items() if len(v)}
  if any(c != kept for c in counts.values()):
    raise AssertionError(f"Subsets keep {counts} pixels, expected {kept} each.")
  return {"pixels_kept": kept, "num_pixels": d,
          "frac_kept": float(ctx.config.subsets.frac_kept),
          "mask_checksum": artifacts.checksum(masks)}
