"""Small models for tests and per-step-overhead benchmarks.

``CNN3``: three 3×3 stride-2 convs (16/32/64 channels), global average pool,
Dense. ``MLP``: flatten, one hidden layer (256, ReLU), Dense. Both take
``[B, H, W, C]`` float32 and return logits ``[B, num_classes]``; ``train`` is
accepted for interface parity and ignored (no batch norm, no dropout).
"""
from __future__ import annotations

import flax.linen as nn


class CNN3(nn.Module):
  num_classes: int = 10
  channels: tuple[int, ...] = (16, 32, 64)

  @nn.compact
  def __call__(self, x, train: bool = False):
    for c in self.channels:
      x = nn.relu(nn.Conv(c, (3, 3), strides=2)(x))
    return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))


class MLP(nn.Module):
  num_classes: int = 10
  hidden: int = 256

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)
