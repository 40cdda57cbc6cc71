"""Argument checks shared by the SIS API: thresholds and positive counts."""
from __future__ import annotations

import math

import numpy as np


def check_threshold(threshold, probability: bool) -> float:
  """``threshold`` as a finite float; in [0, 1] when the scores are ``probability``."""
  try:
    tau = float(threshold)
  except (TypeError, ValueError):
    raise ValueError(f"threshold must be a number, got {threshold!r}.") from None
  if not math.isfinite(tau):
    raise ValueError(f"threshold must be finite, got {threshold!r}.")
  if probability and not 0.0 <= tau <= 1.0:
    raise ValueError(f"threshold must be in [0, 1] for probability scores, got {tau}.")
  return tau


def positive_int(name: str, value) -> int:
  """``value`` as an int; ``ValueError`` naming ``name`` unless it is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
    raise ValueError(f"{name} must be a positive integer, got {value!r}.")
  return int(value)
