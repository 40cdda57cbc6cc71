"""Stage ``subsets``: backward-selection and random pixel-subsets of train and test images.

BS subsets keep the last-removed ``ceil(frac_kept · d)`` pixels of each
image's backward selection (whole steps where records store only the step,
``kept_count``); random subsets keep as many uniformly random
pixels, drawn per split from fixed seeds (the public code: 1234 train, 5678
test; one generator per split, drawn shard after shard, so the masks do not
depend on the shard size). The backselect records are read shard by shard
and each mask file is written as it goes: ``subsets/<kind>_<split>.npy``,
``[N, H, ceil(W/8)]`` bit-packed uint8 (128 bytes per CIFAR image), which the
input pipeline memory-maps (``data.loader.PackedMasks``) and applies on the
fly; ``subsets/<kind>_<split>.json`` holds its fingerprint and sha256, checked
before a file is reused.

Border subsets keep a frame of the same pixel count at the image's edge (the
same positions in every image, ``border_mask``): the paper's evidence that
ImageNet border pixels alone suffice. The stage also measures where the BS
subsets' pixels lie (``border_analysis``): how often each position is kept, and
the fraction of kept pixels inside the outer band as wide as that frame against
the band's share of the image (what uniformly placed pixels would give); its figure
(``draw_figures``) maps those frequencies.
"""
from __future__ import annotations

import os

import numpy as np
from absl import logging

from overinterp_jax import config_reads, config_schema, sis
from overinterp_jax.data import loader
from overinterp_jax.pipeline import (backselect_stage, figures, record_shards, registry,
                                     report_sections)
from overinterp_jax.selection import records
from overinterp_jax.store import atomic, hashing, npz

ALL_KINDS = config_schema.SUBSET_KINDS
# Per-image mask files; "border" is one mask for every image.
KINDS = tuple(kind for kind in ALL_KINDS if kind != "border")
FIGURES = {"kept_positions": "figures/kept_positions.png"}


def kept_count(ctx) -> int:
  """Pixels every subset keeps: ``ceil(frac_kept · d)``, rounded up to whole removal steps
  where the backselect records store only each pixel's step (``record_shards.rank_unit``:
  Batched Gradient SIS above 65,536 pixels; 9,001 of 89,401 at 299×299, k = 100)."""
  h, w = ctx.height_width
  unit = record_shards.rank_unit(h * w, backselect_stage.per_step(ctx.config.backselect))
  return records.whole_steps_to_keep(
      h * w, records.pixels_to_keep(h * w, float(ctx.config.subsets.frac_kept)), unit)


def mask_path(ctx, kind: str, split: str) -> str:
  return ctx.path("subsets", f"{kind}_{split}.npy")


def _valid(path: str, key: config_reads.Key, shape: tuple) -> bool:
  """Whether ``path`` holds masks of this key (config values read, rankings) and shape whose
  bytes still have their stored sha256."""
  meta = atomic.load_json(path[:-4] + ".json")
  if (meta is None or not os.path.exists(path) or "stored" not in meta
      or meta.get("fingerprint") != key.expected(meta["stored"])
      or tuple(meta.get("shape", ())) != shape):
    return False
  if hashing.file_sha256(path) != meta["sha256"]:
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
  if not atomic.is_writer():
    return
  os.makedirs(ctx.path("subsets"), exist_ok=True)
  tmp = {kind: f"{p}.{os.getpid()}.tmp" for kind, p in paths.items()}
  out = {kind: np.lib.format.open_memmap(tmp[kind], mode="w+", dtype=np.uint8, shape=shape)
         for kind in KINDS}
  kept = kept_count(ctx)
  rng = np.random.default_rng(int(c.random_train_seed if split == "train" else
                                  c.random_test_seed))
  for rows, shard in recs.shards():
    bs = records.keep_last_removed(shard["order"], kept, h * w).reshape(-1, h, w)
    rand = sis.draw_random_keep_mask(rng, len(bs), h * w, kept)
    out["bs"][rows] = np.packbits(bs, axis=-1)
    out["random"][rows] = np.packbits(rand.reshape(-1, h, w), axis=-1)
  fp, stored = key.stamp()
  for kind in KINDS:
    out[kind].flush()
    del out[kind]
    os.replace(tmp[kind], paths[kind])
    atomic.save_json(paths[kind][:-4] + ".json",
                     {"fingerprint": fp, "stored": stored, "shape": list(shape),
                      "sha256": hashing.file_sha256(paths[kind])})


def edge_distance(height: int, width: int) -> np.ndarray:
  """``[H, W]`` int: each pixel's distance to the nearest image edge (0 on the edge)."""
  i, j = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  return np.minimum(np.minimum(i, height - 1 - i), np.minimum(j, width - 1 - j))


def border_mask(height: int, width: int, kept: int) -> np.ndarray:
  """``[H, W]`` bool: a frame of exactly ``kept`` pixels at the image edge.

  Whole rings are taken from the outside in; the innermost, partial ring keeps
  ``m`` of its ``P`` pixels evenly spaced along its perimeter (pixel ``p`` of the ring,
  in clockwise order from its top-left corner, is kept when ``⌊(p+1)m/P⌋ > ⌊pm/P⌋``).
  At 299×299 with 10% (9,001 pixels) that is 7 full rings and part of the 8th.
  """
  if not 0 <= kept <= height * width:
    raise ValueError(f"border_mask: {kept} pixels do not fit a {height}x{width} image.")
  ring = edge_distance(height, width)
  mask = np.zeros((height, width), bool)
  left = kept
  for r in range(int(ring.max()) + 1):
    if left == 0:
      break
    pixels = _ring_clockwise(height, width, r)
    if len(pixels) <= left:
      mask[pixels[:, 0], pixels[:, 1]] = True
      left -= len(pixels)
      continue
    p = np.arange(len(pixels))
    take = (p + 1) * left // len(pixels) > p * left // len(pixels)
    mask[pixels[take, 0], pixels[take, 1]] = True
    left = 0
  return mask


def _ring_clockwise(height: int, width: int, r: int) -> np.ndarray:
  """``[P, 2]`` (row, col) of the pixels at edge distance ``r``, clockwise from the
  ring's top-left corner."""
  top, bottom, left, right = r, height - 1 - r, r, width - 1 - r
  if top == bottom or left == right:  # a single row or column
    return np.array([(i, j) for i in range(top, bottom + 1) for j in range(left, right + 1)])
  path = ([(top, j) for j in range(left, right + 1)]
          + [(i, right) for i in range(top + 1, bottom + 1)]
          + [(bottom, j) for j in range(right - 1, left - 1, -1)]
          + [(i, left) for i in range(bottom - 1, top, -1)])
  return np.array(path)


def border_width(height: int, width: int, kept: int) -> int:
  """Rings (pixels from the edge) the border frame of ``kept`` pixels reaches into."""
  ring = edge_distance(height, width)
  return int(ring[border_mask(height, width, kept)].max()) + 1 if kept else 0


def load_or_compute(ctx) -> dict:
  """``{"bs_train", "bs_test", "random_train", "random_test"}`` -> ``loader.PackedMasks``
  (memory-mapped), computed where missing or invalid, and ``"border_train"``,
  ``"border_test"`` -> ``loader.ConstantMask`` (the same frame for every image)."""
  h, w = ctx.height_width
  masks = {}
  # Keyed by the rankings (a checksum of the backselect records) and what it reads.
  with ctx.owned_by("subsets"), config_reads.recording() as reads:
    key = config_reads.Key(hashing.fingerprint(
        *[ctx.backselect(split).checksum() for split in ("train", "test")]), ctx.config, reads)
    for split in ("train", "test"):
      shape = (ctx.data.num_examples(split), h, -(-w // 8))
      if not all(_valid(mask_path(ctx, kind, split), key, shape) for kind in KINDS):
        _write_masks(ctx, split, key)
      for kind in KINDS:
        path = mask_path(ctx, kind, split)
        atomic.note(path)
        atomic.note(path[:-4] + ".json")
        masks[f"{kind}_{split}"] = loader.PackedMasks(path, w)
        masks[f"{kind}_{split}"].digest = atomic.load_json(path[:-4] + ".json")["sha256"]
    frame = border_mask(h, w, kept_count(ctx))
    for split in ("train", "test"):
      masks[f"border_{split}"] = loader.ConstantMask(frame, ctx.data.num_examples(split))
  return masks


def kept_counts(masks, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """``(per_image [N] int, per_position [H, W] int)``: kept pixels of each image and how
  many images keep each position, read ``chunk`` images at a time."""
  per_image, per_position = [], 0
  for i in range(0, len(masks), chunk):
    m = masks[np.arange(i, min(i + chunk, len(masks)))]
    per_image.append(m.reshape(len(m), -1).sum(1))
    per_position = per_position + m.sum(0, dtype=np.int64)
  return np.concatenate(per_image), np.asarray(per_position)


def border_analysis(frequency: np.ndarray, num_images: int, band: int) -> dict:
  """Where kept pixels lie: ``frequency [H, W]`` (images keeping each position) of
  ``num_images`` images against the outer ``band`` pixels of the image."""
  h, w = frequency.shape
  inside = edge_distance(h, w) < band
  total = int(frequency.sum())
  in_band = int(frequency[inside].sum())
  uniform = float(inside.mean())
  frac = in_band / total if total else float("nan")
  return {"num_images": int(num_images), "band_pixels": int(band),
          "band_share_of_image": uniform, "fraction_kept_in_band": frac,
          "ratio_to_uniform": frac / uniform if total else float("nan"),
          "max_position_frequency": float(frequency.max() / num_images) if num_images else 0.0}


def analysis_path(ctx) -> str:
  return ctx.path("subsets", "kept_frequency.npz")


def analysis_key(mask_sha256: dict) -> str:
  """The key of ``analysis_path``'s file: the masks it counts (the summary's
  ``mask_sha256``)."""
  return hashing.fingerprint(mask_sha256)


def run(ctx) -> dict:
  masks = load_or_compute(ctx)
  h, w = ctx.height_width
  d = h * w
  kept = kept_count(ctx)
  band = border_width(h, w, kept)
  digests, frequency, analysis = {}, {}, {}
  for name, m in masks.items():
    if not len(m):
      continue
    if isinstance(m, loader.ConstantMask):
      per_image = np.array([m.mask.sum()])
    else:
      per_image, frequency[name] = kept_counts(m)
    if per_image.min() != kept or per_image.max() != kept:
      raise AssertionError(f"Subsets {name} keep {per_image.min()}..{per_image.max()} pixels, "
                           f"expected {kept} each.")
    digests[name] = m.digest  # hashed once, when verified or written (load_or_compute)
  for split in ("train", "test"):
    if f"bs_{split}" in frequency:
      analysis[split] = border_analysis(frequency[f"bs_{split}"], len(masks[f"bs_{split}"]), band)
  path = analysis_path(ctx)
  npz.save(path, {f"{k}/frequency": v for k, v in frequency.items() if k.startswith("bs_")},
           analysis_key(digests))
  atomic.note(path)
  return {"pixels_kept": kept, "num_pixels": d,
          "frac_kept": float(ctx.config.subsets.frac_kept),
          "border_width": band, "border_analysis": analysis,
          "mask_sha256": digests}


def draw_figures(ctx, s: dict) -> dict:
  """How often each position is kept in the BS subsets of each split (``s``: the stages'
  summaries), when the stage analysed them; ``{name: path}`` of the files written."""
  border = (s.get("subsets") or {}).get("border_analysis")
  if not border:
    return {}
  freq = npz.load(analysis_path(ctx), analysis_key(s["subsets"]["mask_sha256"]))
  if freq is None:
    return {}
  maps = {f"{report_sections.fraction(ctx.config)} BS, {split} ({v['num_images']} images)":
          freq[f"bs_{split}/frequency"] / max(v["num_images"], 1)
          for split, v in border.items()}
  return {"kept_positions": figures.position_heatmaps(
      ctx.path(FIGURES["kept_positions"]), maps, band=int(s["subsets"]["border_width"]))}


STAGE = registry.Unit("subsets", "subsets", run, report_sections.subsets_section,
                      draw_figures)
