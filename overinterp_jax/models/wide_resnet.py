"""Wide ResNet (Zagoruyko & Komodakis 2016), CIFAR variant: WRN-28-10.

Pre-activation blocks (BN-ReLU-conv3×3-[dropout]-BN-ReLU-conv3×3), depth
``6n + 4`` with ``n`` blocks per stage and widths 16·k, 32·k, 64·k (k = 10:
160/320/640); a 1×1 conv shortcut (no bias) where the width changes; final
BN-ReLU, global average pooling, Dense. No conv biases. Init: conv kernels
N(0, 2 / (k²·C_out)), Dense bias 0.
WRN-28-10 has 36,479,194 parameters for 10 classes, as the reference count.

``Dropout(0.3)`` is active with ``train=True`` and then needs a ``'dropout'``
PRNG stream: ``model.apply(v, x, train=True, rngs={'dropout': key}, mutable=['batch_stats'])``.
Input ``[B, 32, 32, C]`` float32 (normalised), output logits ``[B, num_classes]``.
"""
from __future__ import annotations

import flax.linen as nn

from overinterp_jax.models.batch_norm import DEFAULT_MOMENTUM, batch_norm

CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class WideBlock(nn.Module):
  """Pre-activation wide basic block."""
  channels: int
  stride: int = 1
  dropout_rate: float = 0.3
  bn_momentum: float = DEFAULT_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda k, s: nn.Conv(self.channels, (k, k), s, padding=k // 2, use_bias=False,
                                kernel_init=CONV_INIT)
    pre = nn.relu(batch_norm(train, self.bn_momentum)(x))
    y = conv(3, self.stride)(pre)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = conv(3, 1)(nn.relu(batch_norm(train, self.bn_momentum)(y)))
    if self.stride != 1 or x.shape[-1] != self.channels:
      x = conv(1, self.stride)(pre)
    return x + y


class WideResNet(nn.Module):
  """WRN-``depth``-``widen_factor`` for 32×32 inputs."""
  depth: int = 28
  widen_factor: int = 10
  dropout_rate: float = 0.3
  num_classes: int = 10
  bn_momentum: float = DEFAULT_MOMENTUM  # of batch norm's running statistics

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 4) % 6:
      raise ValueError(f"WideResNet depth must be 6n + 4, got {self.depth}.")
    n = (self.depth - 4) // 6
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=CONV_INIT)(x)
    for stage, width in enumerate((16, 32, 64)):
      for block in range(n):
        x = WideBlock(width * self.widen_factor, 2 if stage > 0 and block == 0 else 1,
                      self.dropout_rate, self.bn_momentum)(x, train)
    x = nn.relu(batch_norm(train, self.bn_momentum)(x)).mean(axis=(1, 2))
    return nn.Dense(self.num_classes, bias_init=nn.initializers.zeros)(x)
