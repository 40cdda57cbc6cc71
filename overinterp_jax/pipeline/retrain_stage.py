"""Stage ``retrain``: fresh models trained and tested on pixel-subsets (the paper's Table 1).

Kinds (``config.retrain.kinds``):
  * ``bs``: 5% backward-selection subsets (pixel values kept, rest masked);
  * ``random``: 5% random subsets;
  * ``border``: a frame of the same pixel count at the image edge, the same
    positions in every image (stage subsets' ``border_mask``);
  * ``mask_only``: the BS subsets' *positions* only (kept pixels set to a
    constant) — if positions alone predict the class, the BS accuracy
    says little about the pixels' content;
  * ``full``: full images with the same (possibly short) retraining budget,
    the fair reference when ``retrain.num_epochs`` is below ``train.num_epochs``.
Each model trains on the train subsets (image and mask cropped/flipped
together every epoch) and is tested on the matching test subsets. The
stage also measures the base model on its own BS, random and border test subsets.
"""
from __future__ import annotations

import numpy as np

from overinterp_jax import config_schema
from overinterp_jax.pipeline import registry, trained
from overinterp_jax.data import loader
from overinterp_jax.store import hashing

KINDS = config_schema.RETRAIN_KINDS


def _mask_source(kind: str) -> str:
  """The subset masks a kind of input uses (mask-only: the BS masks' positions)."""
  return "bs" if kind == "mask_only" else kind


def masked_split(ctx, masks: dict, kind: str, split: str) -> loader.Feed:
  """``split``'s images as inputs of kind ``kind``, its pixel masks applied on the fly."""
  if kind == "full":
    return ctx.feed(split)
  return ctx.feed(split).with_masks(masks[f"{_mask_source(kind)}_{split}"],
                                    mask_only=kind == "mask_only")


def masks_checksum(masks: dict, kind: str) -> str:
  """What identifies the masks of ``kind``'s train and test images ("full": none)."""
  if kind == "full":
    return "full"
  return hashing.fingerprint(*[masks[f"{_mask_source(kind)}_{split}"].digest
                                for split in ("train", "test")])


def retrain_config(ctx):
  """The base model's training config, ``retrain.num_epochs`` long, at full resolution
  throughout: resizing would blend kept pixels with masked ones."""
  c = ctx.config
  epochs = int(c.retrain.num_epochs) or int(c.train.num_epochs)
  no_resizing = {"train.progressive_resizing": ()} if c.train.progressive_resizing else {}
  return trained.variant(c, {"train.num_epochs": epochs, **no_resizing})


def run(ctx) -> dict:
  masks = ctx.pixel_subsets()
  out = {"models": {}, "base_on_subsets": {}}
  labels = ctx.labels("test")
  targets = ctx.backselect("test").targets
  tau = float(ctx.config.sis.threshold)
  for kind in config_schema.SUBSET_KINDS:
    logits = ctx.predict_logits(ctx.base.apply, ctx.base.variables,
                                masked_split(ctx, masks, kind, "test"))
    m = trained.accuracy_and_confidence(logits, labels, targets)
    p = trained.softmax(logits.astype(np.float64))[np.arange(len(targets)), targets]
    m["fraction_confident_99"] = float((p >= 0.99).mean())
    m["fraction_confident_tau"] = float((p >= tau).mean())
    out["base_on_subsets"][kind] = m
  config = retrain_config(ctx)
  for kind in ctx.config.retrain.kinds:
    model = ctx.train_model(f"retrain_{kind}", config,
                            train_feed=masked_split(ctx, masks, kind, "train"),
                            test_feed=masked_split(ctx, masks, kind, "test"),
                            data_fp=masks_checksum(masks, kind))
    out["models"][kind] = {"test_accuracy": model.metrics["accuracy"],
                           "test_loss": model.metrics["loss"],
                           "num_epochs": int(config.train.num_epochs),
                           "train_seconds": model.seconds}
  return out


# Its models' accuracies are Table 1's columns (stage train's section).
STAGE = registry.Unit("retrain", "retrain", run)
