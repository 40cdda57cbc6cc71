"""ResNet-50 for ImageNet (torchvision's ``resnet50``, v1.5: stride on the 3×3 conv).

7×7/2 stem (64 channels, padding 3), batch norm, ReLU, 3×3/2 max-pool
(padding 1); four stages of 3/4/6/3 bottleneck blocks (1×1, 3×3, 1×1 convs,
widths 64/128/256/512, output 4× wider), the first block of stages 2–4 with
stride 2 on its 3×3 conv and a 1×1 conv + batch-norm projection shortcut;
global average pooling and one Dense layer. No conv biases; batch norm eps
1e-5 (PyTorch's). 25,557,032 parameters for 1,000 classes, as torchvision's.

Input ``[B, H, W, 3]`` float32 normalised with the ImageNet mean/std (224×224
for the pretrained weights), output logits ``[B, num_classes]``. A masked
pixel is 0 after normalisation: the ImageNet mean colour.
"""
from __future__ import annotations

import flax.linen as nn

from overinterp_jax.models.batch_norm import DEFAULT_MOMENTUM, batch_norm
from overinterp_jax.models.resnet import TORCH_DEFAULT


def _conv(channels: int, kernel: int, stride: int = 1) -> nn.Conv:
  pad = kernel // 2
  return nn.Conv(channels, (kernel, kernel), stride, padding=((pad, pad), (pad, pad)),
                 use_bias=False, kernel_init=TORCH_DEFAULT)


class Bottleneck(nn.Module):
  """1×1 -> 3×3 (stride here, v1.5) -> 1×1 ×4, with a projection shortcut on a shape change."""
  width: int
  stride: int = 1
  bn_momentum: float = DEFAULT_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda: batch_norm(train, self.bn_momentum)
    y = nn.relu(bn()(_conv(self.width, 1)(x)))
    y = nn.relu(bn()(_conv(self.width, 3, self.stride)(y)))
    y = bn()(_conv(4 * self.width, 1)(y))
    shortcut = x
    if self.stride != 1 or x.shape[-1] != 4 * self.width:
      shortcut = bn()(_conv(4 * self.width, 1, self.stride)(x))
    return nn.relu(y + shortcut)


class ResNet50(nn.Module):
  """ResNet-50 v1.5 (``[B, H, W, 3]`` -> logits ``[B, num_classes]``)."""
  num_classes: int = 1000
  blocks_per_stage: tuple[int, ...] = (3, 4, 6, 3)
  bn_momentum: float = DEFAULT_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(batch_norm(train, self.bn_momentum)(_conv(64, 7, 2)(x)))
    x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.blocks_per_stage):
      for block in range(blocks):
        x = Bottleneck(64 * 2 ** stage, 2 if stage > 0 and block == 0 else 1,
                       self.bn_momentum)(x, train)
    return nn.Dense(self.num_classes, kernel_init=TORCH_DEFAULT)(x.mean(axis=(1, 2)))
