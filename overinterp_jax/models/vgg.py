"""VGG-16 with batch norm, CIFAR variant (config D), as in the paper's code.

Thirteen 3×3 convs (padding 1, **with** bias) each followed by batch norm and
ReLU, in the pattern 64,64,M,128,128,M,256×3,M,512×3,M,512×3,M (M = 2×2 max-pool,
five in all), so a 32×32 input ends as a 1×1×512 map; then a single
Dense(512 -> num_classes). 14,728,266 parameters for 10 classes.
Init as the reference: conv kernels N(0, 2 / (k²·C_out)), biases 0; Dense
kernel N(0, 0.01²), bias 0; batch-norm scale 1, bias 0.

Input ``[B, 32, 32, C]`` float32 (normalised), output logits ``[B, num_classes]``.
"""
from __future__ import annotations

import flax.linen as nn

from overinterp_jax.models.batch_norm import DEFAULT_MOMENTUM, batch_norm

CONFIG_D = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
            512, 512, 512, "M")
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class VGG(nn.Module):
  """VGG with batch norm; ``config`` lists conv widths and ``"M"`` for max-pools."""
  num_classes: int = 10
  config: tuple = CONFIG_D
  bn_momentum: float = DEFAULT_MOMENTUM  # of batch norm's running statistics

  @nn.compact
  def __call__(self, x, train: bool = False):
    for layer in self.config:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      else:
        x = nn.Conv(layer, (3, 3), padding=1, kernel_init=CONV_INIT)(x)
        x = batch_norm(train, self.bn_momentum)(x)
        x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01))(x)


def VGG16(num_classes: int = 10,  # pylint: disable=invalid-name
          bn_momentum: float = DEFAULT_MOMENTUM) -> VGG:
  """VGG-16 (config D) with batch norm."""
  return VGG(num_classes=num_classes, config=CONFIG_D, bn_momentum=bn_momentum)
