"""Stage ``train``: the base model, trained in ``base_model/`` or given.

The base model is trained from ``config`` (the top-level training keys, ``augment``,
``model``), or given: a shipped model (``config.pretrained``) or weights from a path
(``config.model.weights``), measured on the run's test images (``shipped_base``).
Every later stage builds on it through ``Context.base``.
"""
from __future__ import annotations

from overinterp_jax.pipeline import registry, report_sections, shipped_base, trained


def base_model(ctx) -> trained.Trained:
  """The base model of the context ``ctx``: trained in ``base_model/``, the shipped
  ``config.pretrained``, or ``config.model.name`` with the weights at
  ``config.model.weights``; its ``key`` identifies it."""
  with ctx.owned_by("train"):
    if ctx.config.model.weights:
      base = shipped_base.load_weights(ctx.config, ctx.data, ctx.mesh)
      base.key = shipped_base.weights_fingerprint(ctx.config.model.weights, ctx.data_fp)
      return base
    if ctx.config.pretrained:
      base = shipped_base.load(ctx.config, ctx.data, ctx.mesh)
      base.key = shipped_base.fingerprint(ctx.config.pretrained, ctx.data_fp)
      return base
    return ctx.train_model("base_model", ctx.config)


def run(ctx) -> dict:
  return {"model": ctx.config.model.name,
          "test_accuracy": ctx.base.metrics["accuracy"], "test_loss": ctx.base.metrics["loss"],
          "num_epochs": int(ctx.config.num_epochs)}


# The training keys are top-level (config.lr, config.num_epochs, ...): no section of its own.
STAGE = registry.Unit("train", None, run, report_sections.train_section)
