"""CIFAR ResNets of He et al. (2016, §4.2): ResNet-20/32/44/56/110.

Three stages of ``n`` BasicBlocks with 16/32/64 channels (depth = 6n + 2),
"option A" shortcuts (stride-2 subsampling plus zero-padded channels, no
parameters), Kaiming-normal initialisation, global average pooling and one
Dense layer. ResNet-20 has 269,722 parameters for 10 classes.
Input ``[B, H, W, 3]`` float32 (normalised), output logits ``[B, num_classes]``.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from overinterp_jax.models.batch_norm import DEFAULT_MOMENTUM, batch_norm

KAIMING = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class BasicBlockA(nn.Module):
  """Two 3×3 convs with batch norm; parameter-free "option A" shortcut."""
  channels: int
  stride: int = 1
  bn_momentum: float = DEFAULT_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool):
    y = nn.Conv(self.channels, (3, 3), self.stride, padding=1, use_bias=False,
                kernel_init=KAIMING)(x)
    y = nn.relu(batch_norm(train, self.bn_momentum)(y))
    y = nn.Conv(self.channels, (3, 3), 1, padding=1, use_bias=False, kernel_init=KAIMING)(y)
    y = batch_norm(train, self.bn_momentum)(y)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.channels:
      shortcut = x[:, ::self.stride, ::self.stride, :]
      pad = self.channels - x.shape[-1]
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
    return nn.relu(y + shortcut)


class CifarResNet(nn.Module):
  """ResNet of depth ``6·blocks_per_stage + 2`` for 32×32 inputs."""
  blocks_per_stage: int
  num_classes: int = 10
  bn_momentum: float = DEFAULT_MOMENTUM  # of batch norm's running statistics

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(16, (3, 3), padding=1, use_bias=False, kernel_init=KAIMING)(x)
    x = nn.relu(batch_norm(train, self.bn_momentum)(x))
    for stage, channels in enumerate((16, 32, 64)):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlockA(channels, stride, self.bn_momentum)(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=KAIMING)(x)
