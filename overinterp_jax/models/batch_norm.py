"""The batch norm every model here uses: PyTorch's ``BatchNorm2d`` defaults."""
from __future__ import annotations

import flax.linen as nn

# Flax's momentum weighs the old running statistics: 0.9 = PyTorch's momentum 0.1.
DEFAULT_MOMENTUM = 0.9


def batch_norm(train: bool, momentum: float = DEFAULT_MOMENTUM) -> nn.BatchNorm:
  """Batch statistics in training, running averages (updated with ``momentum``) in
  evaluation; epsilon 1e-5 as PyTorch."""
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=1e-5)
