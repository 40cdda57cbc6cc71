"""Models by name: an explicit registry that readers and IDEs can follow.

Every entry builds a Flax Linen module called as
``model.apply(variables, images [B, H, W, C] float32, train=...) -> logits [B, K]``
with ``variables = {'params', 'batch_stats'}`` (``batch_stats`` absent for the
small models). Parameter counts for 10 classes: resnet20 269,722;
resnet56 853,018; resnet18 11,173,962; vgg16 14,728,266; wrn28_10 36,479,194;
resnet50 25,557,032 and inception_v3 23,834,568 (no auxiliary head) for 1,000
classes.
"""
from __future__ import annotations

import functools

import flax.linen as nn

from overinterp_jax.models import (inception_v3, resnet, resnet_cifar, resnet_imagenet, small,
                                   vgg, wide_resnet)

MODELS = {
    "resnet20": functools.partial(resnet_cifar.CifarResNet, blocks_per_stage=3),
    "resnet56": functools.partial(resnet_cifar.CifarResNet, blocks_per_stage=9),
    "resnet18": resnet.ResNet18,
    "resnet50": resnet_imagenet.ResNet50,  # ImageNet, 224×224
    "inception_v3": inception_v3.InceptionV3,  # ImageNet, 299×299
    "vgg16": vgg.VGG16,
    "wrn28_10": functools.partial(wide_resnet.WideResNet, depth=28, widen_factor=10,
                                  dropout_rate=0.3),
    "cnn3": small.CNN3,
    "mlp": small.MLP,
}


def create_model(name: str, num_classes: int, **kwargs) -> nn.Module:
  """The Linen module registered as ``name``, with ``num_classes`` outputs.

  ``kwargs`` go to the module's constructor (e.g. ``dropout_rate`` for wrn28_10,
  ``bn_momentum`` for the models with batch norm).

  Raises:
    ValueError: unknown name (the message lists the known ones).
  """
  if name not in MODELS:
    raise ValueError(f"Unknown model {name!r}; known models: {sorted(MODELS)}.")
  return MODELS[name](num_classes=num_classes, **kwargs)
