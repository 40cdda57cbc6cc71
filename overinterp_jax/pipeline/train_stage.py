"""Stage ``train``: the base model, trained in ``base_model/`` or given.

The base model is trained from ``config`` (``config.train``, with its ``augment``, and
``config.model``), or given: a shipped model (``config.model.pretrained``) or weights from a path
(``config.model.weights``), measured on the run's test images (``shipped_base``).
Every later stage builds on it through ``Context.base``.
"""
from __future__ import annotations

from overinterp_jax.pipeline import registry, report_sections, shipped_base, trained


def base_model(ctx) -> trained.Trained:
  """The base model of the context ``ctx``: trained in ``base_model/``, the shipped
  ``config.model.pretrained``, or ``config.model.name`` with the weights at
  ``config.model.weights``; its ``key`` identifies it."""
  with ctx.owned_by("train"):
    if ctx.config.model.weights:
      base = shipped_base.load_weights(ctx.config, ctx.data, ctx.mesh)
      base.key = shipped_base.weights_fingerprint(ctx.config.model.weights, ctx.data_fp)
      return base
    if ctx.config.model.pretrained:
      base = shipped_base.load(ctx.config, ctx.data, ctx.mesh)
      base.key = shipped_base.fingerprint(ctx.config.model.pretrained, ctx.data_fp)
      return base
    return ctx.train_model("base_model", ctx.config)


def run(ctx) -> dict:
  return {"model": ctx.config.model.name,
          "test_accuracy": ctx.base.metrics["accuracy"], "test_loss": ctx.base.metrics["loss"],
          "num_epochs": int(ctx.config.train.num_epochs)}


STAGE = registry.Unit("train", "train", run, report_sections.train_section)
