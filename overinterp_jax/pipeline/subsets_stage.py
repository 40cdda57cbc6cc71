"""Stage ``subsets``: backward-selection and random pixel-subsets of train and test images.

BS subsets keep the last-removed ``ceil(frac_kept · d)`` pixels of each
image's backward selection; random subsets keep as many uniformly random
pixels, drawn per split from fixed seeds (the public code: 1234 train, 5678
test; one generator per split, drawn shard after shard, so the masks do not
depend on the shard size). The backselect records are read shard by shard
and each mask file is written as it goes: ``subsets/<kind>_<split>.npy``,
``[N, H, ceil(W/8)]`` bit-packed uint8 (128 bytes per CIFAR image), which the
input pipeline memory-maps (``data.loader.PackedMasks``) and applies on the
fly; ``subsets/<kind>_<split>.json`` holds its fingerprint and sha256, checked
before a file is reused.
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from overinterp_jax import config_reads, sis
from overinterp_jax.data import loader
from overinterp_jax.pipeline import artifacts
from overinterp_jax.selection import records

KINDS = ("bs", "random")


def mask_path(ctx, kind: str, split: str) -> str:
  return ctx.path("subsets", f"{kind}_{split}.npy")


def _valid(path: str, key: config_reads.Key, shape: tuple) -> bool:
  """Whether ``path`` holds masks of this key (config values read, rankings) and shape whose
  bytes still have their stored sha256."""
  meta = artifacts.load_json(path[:-4] + ".json")
  if (meta is None or not os.path.exists(path) or "stored" not in meta
      or meta.get("fingerprint") != key.expected(meta["stored"])
      or tuple(meta.get("shape", ())) != shape):
    return False
  if artifacts.file_sha256(path) != meta["sha256"]:
    logging.warning("Subset masks %s differ from their stored checksum: rebuilt.", path)
    return False
  key.used(meta["stored"])
  return True


def _write_masks(ctx, split: str, key: config_reads.Key) -> None:
  """Both kinds' packed masks of ``split``, shard by shard from the backselect records."""
  c = ctx.config.subsets
  h, w = ctx.height_width
  recs = ctx.backselect(split)
  n = len(recs)
  shape = (n, h, -(-w // 8))
  paths = {kind: mask_path(ctx, kind, split) for kind in KINDS}
  if not artifacts.is_writer():
    return
  os.makedirs(ctx.path("subsets"), exist_ok=True)
  tmp = {kind: f"{p}.{os.getpid()}.tmp" for kind, p in paths.items()}
  out = {kind: np.lib.format.open_memmap(tmp[kind], mode="w+", dtype=np.uint8, shape=shape)
         for kind in KINDS}
  kept = records.pixels_to_keep(h * w, float(c.frac_kept))
  rng = np.random.default_rng(int(c.random_seed_train if split == "train" else
                                  c.random_seed_test))
  for rows, shard in recs.shards():
    bs = sis.keep_mask(shard["order"], float(c.frac_kept)).reshape(-1, h, w)
    scores = rng.random((len(bs), h * w))
    chosen = np.argpartition(scores, h * w - kept, axis=1)[:, h * w - kept:]
    rand = np.zeros((len(bs), h * w), bool)
    np.put_along_axis(rand, chosen, True, axis=1)
    out["bs"][rows] = np.packbits(bs, axis=-1)
    out["random"][rows] = np.packbits(rand.reshape(-1, h, w), axis=-1)
  fp, stored = key.stamp()
  for kind in KINDS:
    out[kind].flush()
    del out[kind]
    os.replace(tmp[kind], paths[kind])
    artifacts.save_json(paths[kind][:-4] + ".json",
                        {"fingerprint": fp, "stored": stored, "shape": list(shape),
                         "sha256": artifacts.file_sha256(paths[kind])})


def load_or_compute(ctx) -> dict:
  """``{"bs_train", "bs_test", "random_train", "random_test"}`` -> ``loader.PackedMasks``
  (memory-mapped), computed where missing or invalid."""
  h, w = ctx.height_width
  masks = {}
  # Keyed by the rankings (a checksum of the backselect records) and what it reads.
  with ctx.owned_by("subsets"), config_reads.recording() as reads:
    key = config_reads.Key(artifacts.fingerprint(
        *[ctx.backselect(split).checksum() for split in ("train", "test")]), ctx.config, reads)
    for split in ("train", "test"):
      shape = (ctx.data.num_examples(split), h, -(-w // 8))
      if not all(_valid(mask_path(ctx, kind, split), key, shape) for kind in KINDS):
        _write_masks(ctx, split, key)
      for kind in KINDS:
        path = mask_path(ctx, kind, split)
        artifacts.note(path)
        artifacts.note(path[:-4] + ".json")
        masks[f"{kind}_{split}"] = loader.PackedMasks(path, w)
        masks[f"{kind}_{split}"].digest = artifacts.load_json(path[:-4] + ".json")["sha256"]
  return masks


def run(ctx) -> dict:
  masks = load_or_compute(ctx)
  d = int(np.prod(ctx.height_width))
  kept = records.pixels_to_keep(d, float(ctx.config.subsets.frac_kept))
  digests = {}
  for name, m in masks.items():
    if not len(m):
      continue
    per_image = np.concatenate([m[np.arange(i, min(i + 4096, len(m)))].reshape(
        min(4096, len(m) - i), -1).sum(1) for i in range(0, len(m), 4096)])
    if per_image.min() != kept or per_image.max() != kept:
      raise AssertionError(f"Subsets {name} keep {per_image.min()}..{per_image.max()} pixels, "
                           f"expected {kept} each.")
    digests[name] = m.digest  # hashed once, when verified or written (load_or_compute)
  return {"pixels_kept": kept, "num_pixels": d,
          "frac_kept": float(ctx.config.subsets.frac_kept),
          "mask_sha256": digests}
