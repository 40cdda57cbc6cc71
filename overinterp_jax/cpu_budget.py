"""Techniques that fit CIFAR-10 training into a CPU hour, outside the core training loop.

The training loop (``train.fit``) asks this module, per epoch, for the image
scale, the batch multiplier and which examples to mirror; with the defaults
(no progressive resizing, random flips on the device) every answer is "as
configured", so accelerator configs never see these techniques.

  * **Progressive resizing** (``config.train.progressive_resizing``): the first
    epochs train on downscaled images, optionally with an ``m``-times larger
    batch (small images fill a CPU poorly at a small batch); the learning-rate
    schedule advances ``m`` base steps per step at ``m`` times the rate
    (``scale_schedule``), so the rate per image follows the base batch's.
  * **Alternating flip** (``config.train.augment.flip = "alternating"``; Jordan 2024,
    "94% on CIFAR-10 in 3.29 seconds"): each example is mirrored in every
    other epoch instead of at random (``mirrored``).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax

FLIPS = ("random", "alternating")


def resizing_phases(config) -> list[tuple[float, float, int]]:
  """``config.train.progressive_resizing`` as ``[(scale, fraction, batch multiplier)]``,
  validated."""
  phases = tuple(config.train.progressive_resizing or ())
  out = []
  for phase in phases:
    if len(phase) not in (2, 3):
      raise ValueError("config.train.progressive_resizing must be ((scale, fraction of the epochs"
                       f"[, batch multiplier]), ...), got {phases!r}.")
    scale, fraction = float(phase[0]), float(phase[1])
    multiplier = phase[2] if len(phase) == 3 else 1
    if not 0 < scale <= 1 or not fraction > 0:
      raise ValueError(f"config.train.progressive_resizing: each scale must be in (0, 1] and each "
                       f"fraction > 0, got {phases!r}.")
    if int(multiplier) != multiplier or multiplier < 1:
      raise ValueError(f"config.train.progressive_resizing: a batch multiplier must be an integer "
                       f">= 1, got {phases!r}.")
    out.append((scale, fraction, int(multiplier)))
  if sum(f for _, f, _ in out) >= 1:
    raise ValueError(f"config.train.progressive_resizing: the fractions must sum to < 1 (training "
                     f"ends at full resolution), got {phases!r}.")
  return out


def _per_epoch(config, field: int, full_size_value) -> list:
  values, end = [], 0.0
  for phase in resizing_phases(config):
    end += phase[1]
    values += [phase[field]] * (round(end * config.train.num_epochs) - len(values))
  return values + [full_size_value] * (config.train.num_epochs - len(values))


def epoch_scales(config) -> list[float]:
  """Scale of the training images' side in each epoch (1.0 = full resolution).

  ``config.train.progressive_resizing``: ``((scale, fraction of the epochs[, batch
  multiplier]), ...)`` phases trained before the full-resolution epochs, e.g.
  ``((0.5, 0.25), (0.75, 0.25))``: the first quarter of the epochs on images of
  half the side, the next quarter at three quarters, the rest at full size.
  """
  return _per_epoch(config, 0, 1.0)


def epoch_batch_multipliers(config) -> list[int]:
  """Per epoch, how many times ``config.train.batch_size`` its batch is (the optional third
  element of a ``progressive_resizing`` phase; 1 otherwise)."""
  return _per_epoch(config, 2, 1)


def scaled_height_width(height_width, scale: float) -> tuple[int, int]:
  return tuple(max(1, round(d * scale)) for d in height_width)


def scale_schedule(base: optax.Schedule, config, steps_per_epoch: int) -> optax.Schedule:
  """``base`` (per step of ``config.train.batch_size``) for epochs whose batch is ``m`` times
  larger: each of their steps advances ``m`` base steps at ``m`` times the rate (the linear
  scaling rule), so the rate per image is the base batch's at the same point of training."""
  multipliers = epoch_batch_multipliers(config)
  if all(m == 1 for m in multipliers):
    return base
  m = np.asarray(multipliers)
  real_starts = jnp.asarray(np.cumsum(np.concatenate([[0], steps_per_epoch // m[:-1]])))
  base_starts = jnp.arange(len(m)) * steps_per_epoch
  m = jnp.asarray(m)

  def schedule(count):
    epoch = jnp.clip(jnp.searchsorted(real_starts, count, side="right") - 1, 0, len(m) - 1)
    base_step = base_starts[epoch] + (count - real_starts[epoch]) * m[epoch]
    return m[epoch] * base(base_step)
  return schedule


def augment_flip(config) -> str:
  """``config.train.augment.flip``: ``"random"`` (each image mirrored with probability 1/2 in each
  step, on the device: the paper's recipe) or ``"alternating"`` (``mirrored``)."""
  flip = config.train.augment.flip
  if flip not in FLIPS:
    raise ValueError(f"config.train.augment.flip must be one of {FLIPS}, got {flip!r}.")
  return flip


def alternating_flips(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """``[num_examples]`` bool, whether each example is mirrored in ``epoch`` (0-based).

  Epoch 0 mirrors a random half (a fixed draw per example from ``seed``); every
  later epoch mirrors exactly the examples the previous one did not, so each
  example is seen both ways in every two consecutive epochs.
  """
  first = np.random.default_rng([seed, 0xF11F]).random(num_examples) < 0.5
  return first ^ bool(epoch % 2)


def mirrored(config, epoch: int, num_examples: int, augmenting: bool):
  """The examples to mirror on the host in ``epoch`` (``[N]`` bool), or None when flips
  are random (done on the device) or there is no augmentation."""
  if not augmenting or augment_flip(config) != "alternating":
    return None
  return alternating_flips(config.train.seed, epoch, num_examples)
