"""Exact backward selection of N images at once (``batched_backselect``).

Also what the batched API shares: ``BackselectResult``; ``prepare_images``, which
checks the images, masked values, feature map and targets (``PreparedImages``);
``check_num_classes``; ``exact_phase``, the exact selection that
``hybrid_backselect`` runs after its gradient phase. Programs are sharded over
all local devices (``programs.batched_exact_program``).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from overinterp_jax import precision, sharding
from overinterp_jax.selection import exact, features, traced
from overinterp_jax.sis import programs
from overinterp_jax.sis.checks import positive_int


class BackselectResult(NamedTuple):
  """Backward selection of N images (``d`` features each).

  Fields:
    target_classes: ``[N]`` int32 class whose score was kept high.
    original_scores: ``[N]`` target score on the full image.
    order: ``[N, d]`` int32 feature ids, first removed first.
    values: ``[N, d]`` target score after each removal (the last entry is the
      fully masked image's score).
  """
  target_classes: np.ndarray
  original_scores: np.ndarray
  order: np.ndarray
  values: np.ndarray


class PreparedImages(NamedTuple):
  """Checked inputs of the batched API (``prepare_images``).

  Fields: ``images [N, H, W, C]``; ``fully_masked [N, H, W, C]``; ``shared_fully_masked``
  (every image has the same masked values); ``feature_map [H, W, 1]`` int32; ``d``
  features; ``pixel_shape`` ``(H, W)`` for pixel features, else None; ``targets [N]``
  int32 (-1: the predicted class).
  """
  images: jax.Array
  fully_masked: jax.Array
  shared_fully_masked: bool
  feature_map: jax.Array
  d: int
  pixel_shape: tuple[int, int] | None
  targets: np.ndarray


def prepare_images(images, fully_masked, feature_map, target_classes) -> PreparedImages:
  """The batched API's arguments checked (``ValueError`` when they do not fit together);
  arguments as in ``batched_backselect``."""
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"images must be [N, H, W, C], got shape {images.shape}.")
  if images.shape[0] == 0:
    raise ValueError("images is empty (N = 0).")
  if not jnp.issubdtype(images.dtype, jnp.floating):
    raise ValueError(f"images must be floating point (normalised), got {images.dtype}.")
  n, h, w, c = images.shape
  if fully_masked is None:
    fully_masked = jnp.zeros((h, w, c), images.dtype)
  fully_masked = jnp.asarray(fully_masked, images.dtype)
  shared_fully_masked = fully_masked.shape == (h, w, c)
  if shared_fully_masked:
    fully_masked = jnp.broadcast_to(fully_masked, images.shape)
  if fully_masked.shape != images.shape:
    raise ValueError(f"fully_masked must be [H, W, C] = {(h, w, c)} or [N, H, W, C] = "
                     f"{images.shape}, got {fully_masked.shape}.")
  pixel_shape = None
  if feature_map is None:
    feature_map = features.pixel_feature_map(h, w)
    pixel_shape = (h, w)
  fmap, d = features.validate_feature_map(feature_map, (h, w))
  if target_classes is None:
    targets = np.full((n,), -1, np.int32)
  else:
    targets = np.asarray(target_classes)
    if targets.shape != (n,) or not np.issubdtype(targets.dtype, np.integer):
      raise ValueError(f"target_classes must be [N] = [{n}] integers, got shape "
                       f"{targets.shape} and dtype {targets.dtype}.")
    if np.any(targets < 0):
      raise ValueError("target_classes must be >= 0.")
    targets = targets.astype(np.int32)
  return PreparedImages(images, fully_masked, shared_fully_masked, jnp.asarray(fmap), d,
                        pixel_shape, targets)


# What tracing a model that is not JAX code raises (numpy's np.asarray on a tracer,
# Python control flow on its values).
NOT_TRACEABLE = (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError,
                 jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


def check_num_classes(predict_fn, params, images, targets, apply_softmax):
  """``ValueError`` unless ``predict_fn`` traces (JAX code) and every target is below its
  number of classes."""
  class_scores, _, _ = programs.class_score_fn(predict_fn, params is not None, apply_softmax)
  try:
    out = jax.eval_shape(class_scores, traced.abstract(params),
                         jax.ShapeDtypeStruct((1,) + images.shape[1:], images.dtype))
  except NOT_TRACEABLE as e:
    raise ValueError(
        f"predict_fn must be JAX-traceable (jax.numpy code, a Flax model's apply): tracing "
        f"it raised {type(e).__name__} ({str(e).splitlines()[0]}). For a numpy, PyTorch "
        "or other host model use sis.backselect or sis.find_sis with a score function "
        "(engine='auto' or 'host' calls it on numpy batches).") from e
  num_classes = out.shape[1]
  if np.any(targets >= num_classes):
    raise ValueError(f"target_classes must be < num_classes = {num_classes}; got "
                     f"{int(targets.max())}.")


def _run_sharded(program, mesh, group: int, params, batched: Sequence, feature_map, n):
  multiple = group * mesh.devices.size
  padded = [sharding.pad_batch(a, multiple)[0] for a in batched]
  out = program(params, feature_map, *(sharding.shard_rows(mesh, a) for a in padded))
  targets, start, order, values, nonfinite = (sharding.to_host(o)[:n] for o in out)
  raise_if_nonfinite(nonfinite)
  return BackselectResult(targets, start, order, values)


def raise_if_nonfinite(nonfinite: np.ndarray) -> None:
  """``ValueError`` naming the first images whose ``nonfinite [N]`` flag is set."""
  if nonfinite.any():
    bad = np.flatnonzero(nonfinite)[:10].tolist()
    raise ValueError(f"predict_fn produced NaN or infinite scores for images {bad}; "
                     "SIS needs finite scores (check the inputs and the model).")


def batched_backselect(predict_fn: Callable, images, *, params: Any = None,
                       target_classes=None, fully_masked=None, feature_map=None,
                       apply_softmax: bool = True, eval_batch_size: int | None = None,
                       images_per_group: int | None = None,
                       memory_budget_bytes: int | None = None,
                       compute_dtype: str | None = None,
                       mesh=None) -> BackselectResult:
  """Exact backward selection of N images, sharded across devices.

  Each image's target score is ``softmax(predict_fn(x))[target]``. Every step
  evaluates every still-present feature's removal; the removal leaving the
  highest score wins (ties: lowest feature id). Cost: ``d(d+1)/2`` model
  evaluations per image, packed into calls of ``eval_batch_size``.

  Args:
    predict_fn: ``predict_fn(images [B, H, W, C]) -> logits [B, K]``, or
      ``predict_fn(params, images)`` when ``params`` is given (preferred for
      real models: parameters are then arguments, not compiled-in constants).
    images: ``[N, H, W, C]`` float, already normalised.
    params: optional pytree passed to ``predict_fn``.
    target_classes: ``[N]`` ints; default the argmax class on the full image.
    fully_masked: ``[H, W, C]`` or ``[N, H, W, C]`` masked values; default zeros
      (the dataset mean after normalisation).
    feature_map: ``[H, W]`` int feature ids ``0..d-1`` (superpixels, patches);
      default one feature per pixel (``d = H·W``, channels masked together).
    apply_softmax: False when ``predict_fn`` already returns the scores.
    eval_batch_size: masked images per model call per device; default from
      ``memory_budget_bytes`` (per device; default: half the device's free
      memory on GPUs and TPUs, 1 GiB on the CPU, ``overinterp_jax/memory.py``).
    compute_dtype: ``"float32"`` (default) or ``"bfloat16"``: the model runs
      in bfloat16 with float32 parameters, and candidates are ranked by the
      float32 log-probability of its logits (``overinterp_jax/precision.py``).
    images_per_group: images whose candidate removals are packed together into
      model calls; default enough to keep the padding of partly filled calls
      small. Groups are formed from consecutive images, independently of the
      number of devices.
    mesh: a 1-D mesh from ``overinterp_jax.sharding.data_mesh``; default every
      device (of every process, after ``jax.distributed.initialize()``).
      Results do not depend on the number of devices.

  Returns:
    ``BackselectResult`` of numpy arrays.
  """
  prepared = prepare_images(images, fully_masked, feature_map, target_classes)
  predict_fn = precision.in_compute_dtype(predict_fn, compute_dtype, params is not None)
  check_num_classes(predict_fn, params, prepared.images, prepared.targets, apply_softmax)
  return exact_phase(predict_fn, params, prepared, None, prepared.d,
                     apply_softmax=apply_softmax, eval_batch_size=eval_batch_size,
                     images_per_group=images_per_group,
                     memory_budget_bytes=memory_budget_bytes, mesh=mesh)


def exact_phase(predict_fn, params, prepared: PreparedImages, present0, num_steps: int, *,
                apply_softmax, eval_batch_size, images_per_group, memory_budget_bytes,
                mesh) -> BackselectResult:
  """Exact backward selection of ``num_steps`` features of each image.

  ``present0``: ``[N, d]`` bool, the features present at the start (exactly
  ``num_steps`` per image), or None for all ``d`` of them. The others stay masked
  throughout. ``order`` and ``values`` of the result are ``[N, num_steps]``; targets
  and original scores are on the full images. Arguments as in ``batched_backselect``.
  """
  images, d = prepared.images, prepared.d
  mesh = mesh if mesh is not None else sharding.data_mesh()
  n = images.shape[0]
  if eval_batch_size is None:
    fn = predict_fn if params is not None else (lambda _, x: predict_fn(x))
    eval_batch_size = programs.cached_eval_batch_size(
        fn, params, images[:1], jax.ShapeDtypeStruct((1,), jnp.int32),
        budget_bytes=programs.memory_budget(memory_budget_bytes, mesh), cap=n * num_steps)
  eval_batch_size = positive_int("eval_batch_size", eval_batch_size)
  if images_per_group is None:
    # Enough images that a step's partly filled last chunk wastes <= ~1/16 of the work.
    images_per_group = min(n, -(-16 * eval_batch_size // num_steps))
  group = positive_int("images_per_group", images_per_group)
  model = programs.traced_model(predict_fn, params, images,
                                (group,) + exact.chunk_sizes(eval_batch_size))
  program = programs.batched_exact_program(
      model, bool(apply_softmax), eval_batch_size, group, d, prepared.pixel_shape,
      prepared.shared_fully_masked, mesh, num_steps)
  present0 = np.ones((n, d), bool) if present0 is None else present0
  return _run_sharded(program, mesh, group,
                      sharding.put_replicated(mesh, (params, model.consts)),
                      [images, prepared.fully_masked, prepared.targets, present0],
                      prepared.feature_map, n)
