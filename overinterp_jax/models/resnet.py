"""ResNet-18, CIFAR variant (kuangliu/pytorch-cifar, as in the paper's code).

3×3 stem with 64 channels at stride 1 and no max-pool; four stages of two
BasicBlocks with 64/128/256/512 channels (stride 2 at the start of stages
2–4); a 1×1 conv + batch-norm shortcut where the shape changes; no conv
biases; global average pooling (``avg_pool2d(4)`` on the 4×4 map of a 32×32
input) and one Dense layer. 11,173,962 parameters for 10 classes.
Initialisation follows PyTorch's defaults (kernels ~ U(±sqrt(1/fan_in)));
Dense bias starts at zero.

Input ``[B, H, W, C]`` float32 (normalised), output logits ``[B, num_classes]``.
"""
from __future__ import annotations

import flax.linen as nn

from overinterp_jax.models.batch_norm import DEFAULT_MOMENTUM, batch_norm

# PyTorch's default conv/linear init: kaiming_uniform(a=sqrt(5)) = U(±sqrt(1/fan_in)).
TORCH_DEFAULT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class BasicBlock(nn.Module):
  """Two 3×3 convs with batch norm; 1×1 conv + BN shortcut on a shape change."""
  channels: int
  stride: int = 1
  bn_momentum: float = DEFAULT_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda c, k, s: nn.Conv(c, (k, k), s, padding=k // 2, use_bias=False,
                                   kernel_init=TORCH_DEFAULT)
    y = nn.relu(batch_norm(train, self.bn_momentum)(conv(self.channels, 3, self.stride)(x)))
    y = batch_norm(train, self.bn_momentum)(conv(self.channels, 3, 1)(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != self.channels:
      shortcut = batch_norm(train, self.bn_momentum)(conv(self.channels, 1, self.stride)(x))
    return nn.relu(y + shortcut)


class ResNet18(nn.Module):
  """ResNet-18 for 32×32 inputs (``[B, 32, 32, C]`` -> logits ``[B, num_classes]``)."""
  num_classes: int = 10
  stage_channels: tuple[int, ...] = (64, 128, 256, 512)
  blocks_per_stage: tuple[int, ...] = (2, 2, 2, 2)
  bn_momentum: float = DEFAULT_MOMENTUM  # of batch norm's running statistics

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Conv(self.stage_channels[0], (3, 3), 1, padding=1, use_bias=False,
                kernel_init=TORCH_DEFAULT)(x)
    x = nn.relu(batch_norm(train, self.bn_momentum)(x))
    for stage, (channels, blocks) in enumerate(zip(self.stage_channels, self.blocks_per_stage)):
      for block in range(blocks):
        x = BasicBlock(channels, 2 if stage > 0 and block == 0 else 1,
                       self.bn_momentum)(x, train)
    x = x.mean(axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=TORCH_DEFAULT)(x)
