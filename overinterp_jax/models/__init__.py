"""Flax Linen image classifiers, selected by name through ``registry.MODELS``.

All models take ``images [B, H, W, C]`` float32 (normalised, NHWC) and return
logits ``[B, num_classes]``; ``model.apply(variables, x, train=...)`` with
``variables = {'params', 'batch_stats'}``. ``pretrained(name)`` loads a model shipped
in the package (``shipped.py``, ``weights/``).
"""
from overinterp_jax.models.ensemble import make_ensemble_apply, mean_ensemble
from overinterp_jax.models.input_dropout import (InputDropout, apply_keep_masks, drop_pixels,
                                                 input_dropout_predict_fn, sample_keep_masks)
from overinterp_jax.models.predict import predict_fn_from
from overinterp_jax.models.registry import MODELS, create_model
from overinterp_jax.models.resnet import ResNet18
from overinterp_jax.models.resnet_cifar import CifarResNet
from overinterp_jax.models.shipped import pretrained
from overinterp_jax.models.small import CNN3, MLP
from overinterp_jax.models.vgg import VGG, VGG16
from overinterp_jax.models.wide_resnet import WideResNet

__all__ = [
    "MODELS", "create_model", "predict_fn_from", "pretrained",
    "make_ensemble_apply", "mean_ensemble",
    "InputDropout", "input_dropout_predict_fn", "drop_pixels", "sample_keep_masks",
    "apply_keep_masks",
    "CifarResNet", "ResNet18", "VGG", "VGG16", "WideResNet", "CNN3", "MLP",
]
