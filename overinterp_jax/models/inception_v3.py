"""Inception v3 for ImageNet: torchvision's ``inception_v3`` with ``aux_logits=False``.

Stem: ``Conv2d_1a_3x3`` (32, stride 2), ``Conv2d_2a_3x3`` (32), ``Conv2d_2b_3x3``
(64, padding 1), 3×3/2 max-pool, ``Conv2d_3b_1x1`` (80), ``Conv2d_4a_3x3`` (192),
3×3/2 max-pool; then ``Mixed_5b/5c/5d`` (InceptionA, pool features 32/64/64),
``Mixed_6a`` (InceptionB), ``Mixed_6b..6e`` (InceptionC, 7×7 channels
128/160/160/192), ``Mixed_7a`` (InceptionD), ``Mixed_7b/7c`` (InceptionE);
global average pooling, dropout 0.5, ``fc``. Every conv is a ``BasicConv2d``:
conv without bias, batch norm (eps 1e-3), ReLU. Convolutions and pools
without a stated padding are unpadded ('VALID'), as in torchvision; the
branch average pools are 3×3, stride 1, padding 1, counting the padding
(PyTorch's ``count_include_pad=True``). Submodule names are torchvision's, so
``params['Mixed_5b']['branch1x1']['conv']['kernel']`` is
``Mixed_5b.branch1x1.conv.weight`` (``torch_weights.py`` maps the rest).
23,834,568 parameters for 1,000 classes: torchvision's 27,161,264 less the
auxiliary head (3,326,696). Kernels start as PyTorch's default init
(``TORCH_DEFAULT``), not torchvision's truncated normal.

Input ``[B, H, W, 3]`` float32 normalised with the ImageNet mean/std (299×299
for the pretrained weights; at least 75×75), output logits ``[B, num_classes]``.
With ``transform_input=True`` (torchvision's pretrained setting) the model maps
each channel back to ``(x·std + mean − 0.5) / 0.5``, the [−1, 1] scaling the
original Inception weights expect; a masked pixel (0 after ImageNet
normalisation) is then still the ImageNet mean colour.

Dropout is active with ``train=True`` only and then needs a ``'dropout'`` PRNG
stream, as ``train.train_step`` passes: ``model.apply(v, x, train=True,
rngs={'dropout': key}, mutable=['batch_stats'])``.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from overinterp_jax.models.batch_norm import DEFAULT_MOMENTUM
from overinterp_jax.models.resnet import TORCH_DEFAULT

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MIN_SIZE = 75  # smallest input side whose feature maps stay non-empty


def _pair(v) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> batch norm (eps 1e-3) -> ReLU; torchvision's ``BasicConv2d``.

  ``kernel``, ``stride``, ``padding``: an int or ``(rows, cols)``; ``padding`` is
  symmetric, in pixels, as PyTorch's ``Conv2d(padding=...)``.
  """
  features: int
  kernel: int | tuple[int, int]
  stride: int = 1
  padding: int | tuple[int, int] = 0
  bn_momentum: float = DEFAULT_MOMENTUM

  @nn.compact
  def __call__(self, x, train: bool):
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel), self.stride, padding=((ph, ph), (pw, pw)),
                use_bias=False, kernel_init=TORCH_DEFAULT, name="conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-3,
                     name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3(x):
  """3×3, stride 1, padding 1, the padding counted (PyTorch's default)."""
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=True)


def _max_pool_3x3_s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class _Block(nn.Module):
  """Shared by the Inception blocks: ``self.conv(name, c, k, ...)`` builds a named
  ``BasicConv2d``."""
  bn_momentum: float = DEFAULT_MOMENTUM

  def conv(self, name: str, features: int, kernel, stride: int = 1, padding=0):
    return BasicConv2d(features, kernel, stride, padding, self.bn_momentum, name=name)


class InceptionA(_Block):
  """35×35 block: 1×1 | 1×1-5×5 | 1×1-3×3-3×3 | avg-pool-1×1 (``pool_features``).
  Output channels ``224 + pool_features``."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x, train: bool):
    b1 = self.conv("branch1x1", 64, 1)(x, train)
    b5 = self.conv("branch5x5_1", 48, 1)(x, train)
    b5 = self.conv("branch5x5_2", 64, 5, padding=2)(b5, train)
    b3 = self.conv("branch3x3dbl_1", 64, 1)(x, train)
    b3 = self.conv("branch3x3dbl_2", 96, 3, padding=1)(b3, train)
    b3 = self.conv("branch3x3dbl_3", 96, 3, padding=1)(b3, train)
    bp = self.conv("branch_pool", self.pool_features, 1)(_avg_pool_3x3(x), train)
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Grid reduction 35 -> 17: 3×3/2 | 1×1-3×3-3×3/2 | max-pool 3×3/2. Output ``480 + C_in``."""

  @nn.compact
  def __call__(self, x, train: bool):
    b3 = self.conv("branch3x3", 384, 3, stride=2)(x, train)
    bd = self.conv("branch3x3dbl_1", 64, 1)(x, train)
    bd = self.conv("branch3x3dbl_2", 96, 3, padding=1)(bd, train)
    bd = self.conv("branch3x3dbl_3", 96, 3, stride=2)(bd, train)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(_Block):
  """17×17 block with factorised 7×7 convs (``channels_7x7`` inside). Output 768."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x, train: bool):
    c7 = self.channels_7x7
    b1 = self.conv("branch1x1", 192, 1)(x, train)
    b7 = self.conv("branch7x7_1", c7, 1)(x, train)
    b7 = self.conv("branch7x7_2", c7, (1, 7), padding=(0, 3))(b7, train)
    b7 = self.conv("branch7x7_3", 192, (7, 1), padding=(3, 0))(b7, train)
    bd = self.conv("branch7x7dbl_1", c7, 1)(x, train)
    bd = self.conv("branch7x7dbl_2", c7, (7, 1), padding=(3, 0))(bd, train)
    bd = self.conv("branch7x7dbl_3", c7, (1, 7), padding=(0, 3))(bd, train)
    bd = self.conv("branch7x7dbl_4", c7, (7, 1), padding=(3, 0))(bd, train)
    bd = self.conv("branch7x7dbl_5", 192, (1, 7), padding=(0, 3))(bd, train)
    bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x), train)
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Grid reduction 17 -> 8: 1×1-3×3/2 | 1×1-1×7-7×1-3×3/2 | max-pool 3×3/2.
  Output ``512 + C_in``."""

  @nn.compact
  def __call__(self, x, train: bool):
    b3 = self.conv("branch3x3_1", 192, 1)(x, train)
    b3 = self.conv("branch3x3_2", 320, 3, stride=2)(b3, train)
    b7 = self.conv("branch7x7x3_1", 192, 1)(x, train)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7, train)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7, train)
    b7 = self.conv("branch7x7x3_4", 192, 3, stride=2)(b7, train)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(_Block):
  """8×8 block with split 1×3 / 3×1 branches. Output 2048."""

  @nn.compact
  def __call__(self, x, train: bool):
    b1 = self.conv("branch1x1", 320, 1)(x, train)
    b3 = self.conv("branch3x3_1", 384, 1)(x, train)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3, train),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3, train)],
                         axis=-1)
    bd = self.conv("branch3x3dbl_1", 448, 1)(x, train)
    bd = self.conv("branch3x3dbl_2", 384, 3, padding=1)(bd, train)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd, train),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd, train)],
                         axis=-1)
    bp = self.conv("branch_pool", 192, 1)(_avg_pool_3x3(x), train)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


def transform_input(x):
  """torchvision's ``transform_input``: ImageNet-normalised ``x [..., 3]`` ->
  ``(x·std + mean − 0.5) / 0.5`` per channel (pixels in [0, 1] -> [−1, 1])."""
  std = np.asarray(IMAGENET_STD, np.float32)
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  return x * (std / 0.5).astype(x.dtype) + ((mean - 0.5) / 0.5).astype(x.dtype)


class InceptionV3(nn.Module):
  """Inception v3 without the auxiliary head (``[B, H, W, 3]`` -> logits ``[B, num_classes]``).

  ``transform_input``: see the module docstring. ``dropout_rate`` (0.5) applies
  before ``fc`` with ``train=True`` only.
  """
  num_classes: int = 1000
  bn_momentum: float = DEFAULT_MOMENTUM
  transform_input: bool = True
  dropout_rate: float = 0.5

  @nn.compact
  def __call__(self, x, train: bool = False):
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"InceptionV3 takes images [B, H, W, 3], got shape {x.shape}.")
    if min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f"InceptionV3 needs images of at least {MIN_SIZE}×{MIN_SIZE} pixels, "
                       f"got {x.shape[1]}×{x.shape[2]}.")
    if self.transform_input:
      x = transform_input(x)
    conv = lambda name, c, k, **kw: BasicConv2d(c, k, bn_momentum=self.bn_momentum,
                                                name=name, **kw)
    m = self.bn_momentum
    x = conv("Conv2d_1a_3x3", 32, 3, stride=2)(x, train)
    x = conv("Conv2d_2a_3x3", 32, 3)(x, train)
    x = conv("Conv2d_2b_3x3", 64, 3, padding=1)(x, train)
    x = _max_pool_3x3_s2(x)
    x = conv("Conv2d_3b_1x1", 80, 1)(x, train)
    x = conv("Conv2d_4a_3x3", 192, 3)(x, train)
    x = _max_pool_3x3_s2(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(m, pool_features, name=name)(x, train)
    x = InceptionB(m, name="Mixed_6a")(x, train)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = InceptionC(m, c7, name=name)(x, train)
    x = InceptionD(m, name="Mixed_7a")(x, train)
    x = InceptionE(m, name="Mixed_7b")(x, train)
    x = InceptionE(m, name="Mixed_7c")(x, train)
    x = x.mean(axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=TORCH_DEFAULT, name="fc")(x)
