"""The SIS sample: what stages sis, controls and the report share of it (``ctx.sis_sample``).

One ``SisSample`` per run, made by ``context.Context``. It holds

  * the sample: the test images SISes are taken of (``indices``; ``config.sis.num_images``
    of one seeded permutation, restricted to images the models classify confidently with
    ``sis.min_confidence``, ``sis.only_correct``, ``sis.sample_all_models``), and the nested
    seeded test samples of the controls and figures (``test_sample``);
  * the SIS models by name (``predictor``; ``config.sis.models``) and their predictions on
    the full test images (``predictions``):

      - ``single``: the base model;
      - ``ensemble``: mean-logit ensemble of the base model and ``ensemble_size - 1``
        replicates trained with other seeds (optionally shorter, ``ensemble_epochs``);
      - ``input_dropout``: a model trained with input dropout (keep prob
        ``sis.input_dropout_keep_prob``), evaluated deterministically: logits averaged over
        ``input_dropout_samples`` fixed dropout masks (paper §6.4);

  * the features (``feature_map``: pixels, or ``p × p`` patches with ``sis.patch_size``);
  * the backward-selection records of the sample (``records``, stage sis's result; ``select``
    for another target or masked value), through the selection stage sis defines and the
    context hands in (``sis_stage.selection_records``).

Values read from the config are read on every call (never kept), so the config keys they
depend on are recorded for whichever stage asks (``config_reads``). The models and their
predictions are built once per run and kept here.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from overinterp_jax import config_schema
from overinterp_jax.pipeline import trained
from overinterp_jax.selection import features
from overinterp_jax.store import hashing

MODELS = config_schema.SIS_MODELS

# ``(ctx, name, apply, variables, fingerprint, indices, *, masking, target_classes) ->
# records``: the backward selection of stage sis (``sis_stage.selection_records``).
Selection = Callable[..., dict]


def patch_feature_map(p: int, height_width) -> Optional[np.ndarray]:
  """``[H, W]`` feature ids of ``p × p`` patches, or None for ``p == 1`` (pixels);
  ValueError naming ``config.sis.patch_size`` unless ``p`` divides both sides."""
  h, w = height_width
  if p == 1:
    return None
  if h % p or w % p:
    raise ValueError(f"config.sis.patch_size={p} must divide the image size {h}x{w}.")
  return features.patch_feature_map(h, w, p)


class SisSample:
  """The SIS sample of the run of ``ctx`` (``context.Context``), its models and records."""

  def __init__(self, ctx, selection: Selection):
    self._ctx, self._selection = ctx, selection
    # {name: (apply, variables, fingerprint, test accuracy)} of the SIS models, and their
    # predictions on the full test images: {name: ([N] predicted class, [N] softmax
    # confidence in it)}; the models' apply functions, keyed on what builds them.
    self.predictors: dict[str, tuple] = {}
    self.predicted: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    self._applies: dict = {}

  # ---------------------------------------------------------------------- the selection

  def selection_name(self) -> str:
    """How the SIS records were selected, as figures and tables label them."""
    c = self._ctx.config
    if c.sis.selection in ("exact", "coarse_to_fine"):
      return c.sis.selection
    return c.backselect.method

  def reuses_backselect(self) -> bool:
    """True when the base model's SIS records are stage backselect's own test records (then
    a control's separate backselect row would repeat them)."""
    return self._ctx.config.sis.selection == "backselect"

  def feature_map(self) -> Optional[np.ndarray]:
    """``[H, W]`` feature ids of ``p × p`` patches (``config.sis.patch_size``), or None for
    pixels."""
    return patch_feature_map(int(self._ctx.config.sis.patch_size), self._ctx.height_width)

  def pixels_per_feature(self) -> int:
    return int(self._ctx.config.sis.patch_size) ** 2

  # ------------------------------------------------------------------------- the images

  def test_sample(self, count: int) -> np.ndarray:
    """Sorted indices of ``count`` test images (0 = all), the first ``count`` of one
    permutation seeded by ``sis.sample_seed``: smaller samples are subsets of larger ones.
    Never the first ``count`` images (image folders are ordered by class)."""
    n = self._ctx.data.num_examples("test")
    k = n if int(count) <= 0 else min(int(count), n)
    return np.sort(self.test_sample_order()[:k])

  def test_sample_order(self) -> np.ndarray:
    """``[N]`` a permutation of the test images seeded by ``sis.sample_seed``."""
    ctx = self._ctx
    return np.random.default_rng(int(ctx.config.sis.sample_seed)).permutation(
        ctx.data.num_examples("test"))

  def restricted(self) -> bool:
    """Whether the sample draws from the ``qualifying`` images only."""
    c = self._ctx.config.sis
    return float(c.min_confidence) > 0 or c.only_correct or c.sample_all_models

  def qualifying(self) -> np.ndarray:
    """``[N]`` bool: test images the SIS sample may draw from: the base model's confidence
    ``>= sis.min_confidence`` (and right when ``sis.only_correct``); with
    ``sis.sample_all_models``, every model of ``sis.models``'s."""
    c = self._ctx.config.sis
    names = tuple(c.models) if c.sample_all_models else ("single",)
    ok = np.ones(self._ctx.data.num_examples("test"), bool)
    for name in names:
      predicted, confidence = self.predictions(name)
      ok &= confidence >= float(c.min_confidence)
      if c.only_correct:
        ok &= predicted == self._ctx.labels("test")
    return ok

  def indices(self) -> np.ndarray:
    """The test images of the SIS sample (sorted): the first ``sis.num_images`` (0 = all) of
    one seeded permutation among those ``qualifying``."""
    c = self._ctx.config.sis
    if not self.restricted():
      return self.test_sample(int(c.num_images))
    order = self.test_sample_order()
    chosen = order[self.qualifying()[order]]
    return np.sort(chosen[:int(c.num_images)] if int(c.num_images) > 0 else chosen)

  # ------------------------------------------------------------------------- the models

  def base_predictions(self) -> tuple[np.ndarray, np.ndarray]:
    """``([N] predicted class, [N] softmax confidence in it)`` of the base model on each full
    test image: from stage backselect's records (their targets are the predictions) when
    ``sis.selection == "backselect"``, else by inference (computed once per run)."""
    ctx = self._ctx
    if self.reuses_backselect():
      small = ctx.backselect("test").small()
      return small["targets"], small["original_scores"]
    if "single" not in self.predicted:
      logits = ctx.predict_logits(ctx.base.apply, ctx.base.variables, ctx.feed("test"))
      p = trained.softmax(logits.astype(np.float64))
      self.predicted["single"] = (p.argmax(-1), p.max(axis=-1))
    return self.predicted["single"]

  def predictions(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """``([N] predicted class, [N] confidence)`` of SIS model ``name`` on the full test
    images."""
    if name == "single":
      return self.base_predictions()
    self.predictor(name)  # computes them with the model's test accuracy
    return self.predicted[name]

  def predictor(self, name: str) -> tuple:
    """``(apply, variables, fingerprint, test_accuracy)`` of SIS model ``name``, built once per
    run (the ensemble's and input-dropout model's test-set evaluation is not repeated)."""
    if name not in self.predictors:
      self.predictors[name] = self._build_predictor(name)
    return self.predictors[name]

  def ensemble_members(self) -> list:
    ctx = self._ctx
    c = ctx.config
    members = [ctx.base]
    epochs = int(c.sis.ensemble_epochs) or int(c.train.num_epochs)
    for i in range(1, int(c.sis.ensemble_size)):
      members.append(ctx.train_model(f"ensemble_member_{i}", trained.variant(
          c, {"train.seed": int(c.train.seed) + i, "train.num_epochs": epochs})))
    return members

  def input_dropout_model(self) -> trained.Trained:
    c = self._ctx.config
    epochs = int(c.sis.input_dropout_epochs) or int(c.train.num_epochs)
    return self._ctx.train_model("input_dropout_model", trained.variant(
        c, {"model.input_keep_prob": float(c.sis.input_dropout_keep_prob),
            "train.num_epochs": epochs}))

  def _apply(self, key: tuple, build: Callable[[], Callable]) -> Callable:
    """The apply function built by ``build``, once per run for each ``key``."""
    if key not in self._applies:
      self._applies[key] = build()
    return self._applies[key]

  def _build_predictor(self, name: str) -> tuple:
    ctx = self._ctx
    c = ctx.config.sis
    if name == "single":
      return ctx.base.apply, ctx.base.variables, ctx.base_fp, ctx.base.metrics["accuracy"]
    if name == "ensemble":
      members = self.ensemble_members()
      apply = self._apply(("ensemble", ctx.base.apply),
                          lambda: trained.ensemble_apply(ctx.base.apply))
      stacked = trained.stack_variables(members)
      fp = hashing.fingerprint("ensemble", [m.key for m in members])
      acc = self._keep_predictions(name, ctx.predict_logits(apply, stacked, ctx.feed("test")))
      return apply, stacked, fp, acc
    if name == "input_dropout":
      model = self.input_dropout_model()
      samples, seed = int(c.input_dropout_samples), int(c.input_dropout_seed)
      apply = self._apply(("input_dropout", model.module, samples, seed),
                          lambda: trained.input_dropout_apply(model, samples, seed))
      # the model's key and the arguments of its apply function
      fp = hashing.fingerprint("input_dropout", model.key, samples, seed)
      acc = self._keep_predictions(
          name, ctx.predict_logits(apply, model.variables, ctx.feed("test")))
      return apply, model.variables, fp, acc
    raise ValueError(f"config.sis.models: unknown model {name!r}; known: {list(MODELS)}.")

  def _keep_predictions(self, name: str, logits: np.ndarray) -> float:
    """Keeps model ``name``'s predictions and confidences on the test images from its
    ``logits [N, K]``; returns its test accuracy."""
    p = trained.softmax(logits.astype(np.float64))
    self.predicted[name] = (p.argmax(-1), p.max(axis=-1))
    return float((p.argmax(-1) == self._ctx.labels("test")).mean())

  # ------------------------------------------------------------------------ the records

  def select(self, name: str, apply: Callable, variables, fingerprint: str, *,
             masking: str = "mean", target_classes=None) -> dict:
    """Backward-selection records (dense: ``order``, ``values [n, d]``, ``targets``,
    ``original_scores``) of the sample's images by the selection of ``sis.selection``, kept
    under ``sis/<name>``: model ``apply``/``variables`` (identified by ``fingerprint``),
    masked value ``masking`` (``masked_data.MASKING_VALUES``), toward ``target_classes``
    ``[n]`` (None: the predictions)."""
    return self._selection(self._ctx, name, apply, variables, fingerprint, self.indices(),
                           masking=masking, target_classes=target_classes)

  def records(self, name: str) -> dict:
    """The stored record of SIS model ``name`` (stage sis's result)."""
    with self._ctx.owned_by("sis"):
      apply, variables, fp, _ = self.predictor(name)
      return self.select(name, apply, variables, fp)
