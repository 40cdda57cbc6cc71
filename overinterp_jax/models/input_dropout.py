"""Input dropout (the paper's mitigation, ``ModelWithInputDropout``).

Each pixel (all its channels together) is kept with probability ``keep_prob``
(0.8 in the paper) and otherwise replaced by the masked value: 0 in
normalised space (the mean colour) or the pixel of a given fully-masked
image. The model runs on ``num_samples`` such draws and their **logits** are
averaged. As in the reference, dropout is active in training **and**
evaluation, so the module always needs a PRNG stream named ``'input_dropout'``:

    model = InputDropout(create_model('resnet18', 10), keep_prob=0.8)
    logits, upd = model.apply(v, x, train=True, rngs={'input_dropout': key},
                              mutable=['batch_stats'])

The wrapper shares its scope with the wrapped model, so its variables are
exactly the wrapped model's (checkpoints are interchangeable).

For SIS the score function must be deterministic (docs/method.md §6, decision
4): ``input_dropout_predict_fn(model, variables, key)`` fixes the key **and**
uses the same ``num_samples`` pixel masks for every image of a batch, so each
image's logits depend only on that image and the key, never on its batch or
position in it.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from overinterp_jax.models.predict import PredictFn

RNG_NAME = "input_dropout"


def sample_keep_masks(key: jax.Array, shape: tuple[int, ...], keep_prob: float) -> jax.Array:
  """Bernoulli(keep_prob) pixel masks, ``shape + (1,)`` bool (True = pixel kept).

  ``shape`` is e.g. ``(B, H, W)``; the trailing 1 broadcasts over channels.
  """
  if not 0.0 < keep_prob <= 1.0:
    raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}.")
  return jax.random.bernoulli(key, keep_prob, tuple(shape) + (1,))


def apply_keep_masks(images: jax.Array, keep: jax.Array,
                     fully_masked_input: Optional[jax.Array] = None) -> jax.Array:
  """``where(keep, images, fully_masked_input)``; masked value 0 if none is given.

  ``images [..., H, W, C]``, ``keep [..., H, W, 1]`` bool and
  ``fully_masked_input`` (``[H, W, C]`` or any shape broadcasting to
  ``images``) float32.
  """
  masked = jnp.zeros((), images.dtype) if fully_masked_input is None else fully_masked_input
  return jnp.where(keep, images, jnp.asarray(masked, images.dtype))


def drop_pixels(key: jax.Array, images: jax.Array, keep_prob: float = 0.8,
                fully_masked_input: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """One input-dropout draw per image.

  Args:
    key: PRNG key.
    images: ``[B, H, W, C]`` float32 (normalised).
    keep_prob: probability that a pixel is kept.
    fully_masked_input: value of dropped pixels (default 0).

  Returns:
    ``(dropped images [B, H, W, C], keep [B, H, W, 1] bool)``.
  """
  keep = sample_keep_masks(key, images.shape[:-1], keep_prob)
  return apply_keep_masks(images, keep, fully_masked_input), keep


class InputDropout(nn.Module):
  """Wraps ``model`` with input dropout; ``[B, H, W, C] -> logits [B, K]``.

  Attributes:
    model: the wrapped Linen classifier (``__call__(x, train)``).
    keep_prob: probability that a pixel is kept (paper: 0.8).
    num_samples: dropout draws per image; their logits are averaged
      (the batch is tiled, so the model sees ``num_samples·B`` images).
    per_example_masks: True (training): each image gets its own masks.
      False: the ``num_samples`` masks are shared by every image of the batch,
      which makes an image's output independent of its batch (used by
      ``input_dropout_predict_fn``).
  """
  model: nn.Module
  keep_prob: float = 0.8
  num_samples: int = 1
  per_example_masks: bool = True

  def setup(self):
    nn.share_scope(self, self.model)

  def __call__(self, images: jax.Array, train: bool = False,
               fully_masked_input: Optional[jax.Array] = None) -> jax.Array:
    if self.num_samples < 1:
      raise ValueError(f"num_samples must be >= 1, got {self.num_samples}.")
    if not self.is_initializing() and not self.has_rng(RNG_NAME):
      raise ValueError(
          f"InputDropout needs a PRNG stream {RNG_NAME!r}: pass "
          f"rngs={{{RNG_NAME!r}: key}} to apply, or build a deterministic predict "
          "function with input_dropout_predict_fn(model, variables, key).")
    b, h, w, c = images.shape
    batch = b if self.per_example_masks else 1
    keep = sample_keep_masks(self.make_rng(RNG_NAME), (self.num_samples, batch, h, w),
                             self.keep_prob)
    dropped = apply_keep_masks(images[None], keep, fully_masked_input)  # [S, B, H, W, C]
    logits = self.model(dropped.reshape(self.num_samples * b, h, w, c), train=train)
    return logits.reshape(self.num_samples, b, -1).mean(axis=0)


def input_dropout_predict_fn(model: InputDropout, variables: Any, key: jax.Array,
                             fully_masked_input: Optional[jax.Array] = None) -> PredictFn:
  """Deterministic ``predict(images [B, H, W, C]) -> logits [B, K]`` (eval mode).

  The same ``key`` gives the same ``model.num_samples`` pixel masks on every
  call and for every image, so ``predict`` is a fixed function of its input
  (what backward selection needs); different keys give different functions.
  """
  if not isinstance(model, InputDropout):
    raise ValueError(f"input_dropout_predict_fn needs an InputDropout model, got "
                     f"{type(model).__name__}.")
  shared = model.clone(per_example_masks=False)

  def predict(images: jax.Array) -> jax.Array:
    return shared.apply(variables, images, train=False, rngs={RNG_NAME: key},
                        fully_masked_input=fully_masked_input)
  return predict
