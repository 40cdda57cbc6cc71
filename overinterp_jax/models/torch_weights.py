"""PyTorch weights (torchvision/timm ``.safetensors``) for ``resnet50`` and ``inception_v3``.

The state dict is read with ``safetensors.numpy`` (no torch). Key layouts are
torchvision's, which timm's ``resnet50`` and ``inception_v3`` share:

  * resnet50: ``conv1``, ``bn1``, ``layer{1-4}.{block}.conv{1-3}`` / ``bn{1-3}``,
    ``layer{1-4}.0.downsample.0`` (conv) / ``.1`` (batch norm), ``fc``;
  * inception_v3: the Flax module path joined with dots, e.g.
    ``Mixed_5b.branch1x1.conv.weight``, ``Conv2d_1a_3x3.bn.running_mean``, ``fc.bias``;
    ``AuxLogits.*`` (the auxiliary head, which ``InceptionV3`` lacks) is ignored
    and logged.

Conversions: conv weight ``[O, I, kh, kw]`` -> kernel ``[kh, kw, I, O]``; linear
weight ``[out, in]`` -> kernel ``[in, out]``; batch norm ``weight`` -> ``scale``,
``bias`` -> ``bias``, ``running_mean`` / ``running_var`` -> ``batch_stats`` ``mean`` /
``var``; ``num_batches_tracked`` is ignored. float16 / bfloat16 / float64 are
cast to float32.

``transform_input`` (inception_v3): torchvision's Inception weights expect it (inputs
scaled to [−1, 1] inside the model); timm's ``InceptionV3`` has no such step and feeds
the model what its pretrained config's mean/std give: (0.5, 0.5, 0.5) for
``tv_in1k``/``tf_in1k``/``tf_adv_in1k`` (the same as ImageNet normalisation plus
``transform_input``), ImageNet's own mean/std for ``gluon_in1k`` (no
``transform_input``). ``transform_input_for`` reads that from the ``config.json``
timm writes beside its weights (``save_for_hf`` / the Hugging Face hub layout).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import traverse_util

from overinterp_jax.models import inception_v3, resnet_imagenet
from overinterp_jax.models.registry import create_model

SUPPORTED = ("resnet50", "inception_v3")
# Input side used to build the variable shapes (they do not depend on it).
_TEMPLATE_SIZE = {"resnet50": 224, "inception_v3": 299}
# Flax leaf name -> torch tensor name.
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIX = ".num_batches_tracked"
_LIST_AT_MOST = 10


def _check_name(model_name: str) -> None:
  if model_name not in SUPPORTED:
    raise ValueError(f"No torch weight layout for model {model_name!r}; supported: "
                     f"{list(SUPPORTED)}.")


def _resnet50_module(path: tuple[str, ...]) -> str:
  """Flax module path of ResNet50 -> torchvision module name."""
  top = {("Conv_0",): "conv1", ("BatchNorm_0",): "bn1", ("Dense_0",): "fc"}
  if path in top:
    return top[path]
  match = re.fullmatch(r"Bottleneck_(\d+)", path[0]) if len(path) == 2 else None
  layer = re.fullmatch(r"(Conv|BatchNorm)_([0-3])", path[1]) if match else None
  if layer is None:
    raise ValueError(f"variables_template does not look like resnet50: unexpected module "
                     f"path {'/'.join(path)}.")
  index = int(match.group(1))
  for stage, blocks in enumerate(resnet_imagenet.ResNet50.blocks_per_stage):
    if index < blocks:
      break
    index -= blocks
  else:
    raise ValueError(f"variables_template does not look like resnet50: {path[0]} is past "
                     f"the last block.")
  kind, j = layer.group(1), int(layer.group(2))
  if j == 3:  # the projection shortcut
    return f"layer{stage + 1}.{index}.downsample.{0 if kind == 'Conv' else 1}"
  return f"layer{stage + 1}.{index}.{'conv' if kind == 'Conv' else 'bn'}{j + 1}"


def _inception_v3_module(path: tuple[str, ...]) -> str:
  """Flax module path of InceptionV3 -> torchvision module name (the same names)."""
  return ".".join(path)


_MODULE_NAMES: dict[str, Callable[[tuple[str, ...]], str]] = {
    "resnet50": _resnet50_module, "inception_v3": _inception_v3_module}
_FC = {"resnet50": ("Dense_0",), "inception_v3": ("fc",)}


def _to_torch_array(a: np.ndarray) -> np.ndarray:
  """Flax layout -> torch layout: HWIO -> OIHW, [in, out] -> [out, in], vectors as they are."""
  if a.ndim == 4:
    return a.transpose(3, 2, 0, 1)
  return a.T if a.ndim == 2 else a


def _from_torch_array(a: np.ndarray) -> np.ndarray:
  """Torch layout -> Flax layout (inverse of ``_to_torch_array``)."""
  if a.ndim == 4:
    return a.transpose(2, 3, 1, 0)
  return a.T if a.ndim == 2 else a


def _torch_shape(s: tuple[int, ...]) -> tuple[int, ...]:
  """The torch shape of a Flax-layout shape (as ``_to_torch_array``)."""
  if len(s) == 4:
    return (s[3], s[2], s[0], s[1])
  return (s[1], s[0]) if len(s) == 2 else tuple(s)


def _layout(model_name: str, variables: Any) -> dict[str, tuple[str, tuple[str, ...], Any]]:
  """``{torch key: (collection, Flax path, Flax leaf)}`` for every leaf of ``variables``."""
  _check_name(model_name)
  module_name = _MODULE_NAMES[model_name]
  out = {}
  for collection in ("params", "batch_stats"):
    if collection not in variables:
      raise ValueError(f"{model_name} variables need a {collection!r} collection; got "
                       f"{sorted(variables)}.")
    for path, leaf in traverse_util.flatten_dict(dict(variables[collection])).items():
      if path[-1] not in _LEAF_TO_TORCH:
        raise ValueError(f"variables_template does not look like {model_name}: unexpected "
                         f"leaf {collection}/{'/'.join(path)}.")
      out[f"{module_name(path[:-1])}.{_LEAF_TO_TORCH[path[-1]]}"] = (collection, path, leaf)
  return out


def _listed(keys: list[str]) -> str:
  more = f" and {len(keys) - _LIST_AT_MOST} more" if len(keys) > _LIST_AT_MOST else ""
  return f"{len(keys)}: {keys[:_LIST_AT_MOST]}{more}"


def from_torch_state(state: dict[str, np.ndarray], model_name: str,
                     variables_template: Any) -> dict[str, Any]:
  """Flax ``{'params', 'batch_stats'}`` of ``model_name`` from a torch-layout state dict.

  Args:
    state: torch key -> array (``safetensors.numpy.load_file``'s output).
    model_name: ``"resnet50"`` or ``"inception_v3"``.
    variables_template: the model's variables, or their shapes (``jax.eval_shape``
      of ``model.init``); fixes the structure, the shapes and the class count.

  Returns:
    The variables in the template's structure, float32 jax arrays.

  Raises:
    ValueError: an unsupported model; ``fc`` with another number of classes than the
      template's; missing or unexpected keys (up to 10 of each listed); a shape
      that differs from the model's (key and both shapes, torch layout); a
      tensor that is not floating point.
  """
  layout = _layout(model_name, variables_template)
  fc_kernel = traverse_util.flatten_dict(dict(variables_template["params"]))[
      _FC[model_name] + ("kernel",)]
  num_classes = int(np.shape(fc_kernel)[1])
  if "fc.weight" in state and np.ndim(state["fc.weight"]) == 2 and (
      np.shape(state["fc.weight"])[0] != num_classes):
    raise ValueError(f"fc.weight of the checkpoint has {np.shape(state['fc.weight'])[0]} "
                     f"classes (shape {tuple(np.shape(state['fc.weight']))}), the "
                     f"{model_name} model has num_classes={num_classes}.")
  ignored = [k for k in state if k.endswith(_IGNORED_SUFFIX)
             or (model_name == "inception_v3" and k.startswith("AuxLogits."))]
  aux = [k for k in ignored if k.startswith("AuxLogits.")]
  if aux:
    logging.info("%s: ignoring the %d AuxLogits.* tensors (no auxiliary head).",
                 model_name, len(aux))
  missing = [k for k in layout if k not in state]
  unexpected = [k for k in state if k not in layout and k not in ignored]
  if missing or unexpected:
    parts = ([f"missing keys {_listed(missing)}"] if missing else []) + (
        [f"unexpected keys {_listed(unexpected)}"] if unexpected else [])
    raise ValueError(f"The {model_name} state dict does not match the model: "
                     f"{'; '.join(parts)}.")
  flat = {"params": {}, "batch_stats": {}}
  for key, (collection, path, leaf) in layout.items():
    a = np.asarray(state[key])
    if not jnp.issubdtype(a.dtype, jnp.floating):
      raise ValueError(f"{key}: dtype {a.dtype} is not floating point.")
    expected = _torch_shape(tuple(np.shape(leaf)))
    if a.shape != expected:
      raise ValueError(f"{key}: shape {a.shape} in the state dict, the {model_name} model "
                       f"expects {expected} (torch layout).")
    flat[collection][path] = jnp.asarray(
        np.ascontiguousarray(_from_torch_array(a.astype(np.float32, copy=False))))
  return {c: traverse_util.unflatten_dict(f) for c, f in flat.items()}


def to_torch_state(variables: Any, model_name: str) -> dict[str, np.ndarray]:
  """Torch-layout state dict of ``variables`` (inverse of ``from_torch_state``).

  Float32 numpy arrays, plus an int64 ``num_batches_tracked`` of 0 per batch
  norm, as ``torch.nn.Module.state_dict()`` holds.
  """
  state = {}
  for key, (_, _, leaf) in _layout(model_name, variables).items():
    state[key] = np.ascontiguousarray(_to_torch_array(np.asarray(leaf, np.float32)))
    if key.endswith(".running_var"):
      state[key[:-len(".running_var")] + _IGNORED_SUFFIX] = np.zeros((), np.int64)
  return state


def variables_template(model_name: str, num_classes: int) -> Any:
  """Shapes of ``model_name``'s variables (``ShapeDtypeStruct`` leaves; nothing computed)."""
  _check_name(model_name)
  model = create_model(model_name, num_classes=num_classes)
  size = _TEMPLATE_SIZE[model_name]
  return jax.eval_shape(lambda: model.init(jax.random.key(0),
                                           jnp.zeros((1, size, size, 3)), train=False))


def load_safetensors(path: str | os.PathLike, model_name: str, num_classes: int = 1000):
  """Flax variables of ``model_name`` from a torchvision/timm ``.safetensors`` file.

  Use with ``create_model(model_name, num_classes)``; images ``[B, H, W, 3]``
  normalised with the ImageNet mean/std. Raises FileNotFoundError for a
  missing file and ValueError as ``from_torch_state``.
  """
  from safetensors.numpy import load_file  # only this loader needs it
  _check_name(model_name)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"No safetensors file at {os.fspath(path)!r}.")
  return from_torch_state(load_file(os.fspath(path)), model_name,
                          variables_template(model_name, num_classes))


TRANSFORM_INPUT = ("auto", "true", "false")  # config.model.transform_input
_INCEPTION_NORM = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's IMAGENET_INCEPTION_MEAN/STD


def timm_config_path(weights: str | os.PathLike) -> pathlib.Path:
  """The ``config.json`` that timm writes beside ``weights`` (it may not exist)."""
  return pathlib.Path(weights).resolve().parent / "config.json"


def timm_transform_input(weights: str | os.PathLike) -> tuple[bool, str] | None:
  """``(transform_input, why)`` that the timm ``config.json`` beside ``weights`` implies
  for an Inception v3 file, or None when there is no such file (or it describes
  another architecture).

  Raises:
    ValueError: an unreadable ``config.json``, or a mean/std that neither setting gives.
  """
  path = timm_config_path(weights)
  if not path.is_file():
    return None
  try:
    record = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"{path} (beside config.model.weights) is not readable JSON: {e}") from e
  record = record if isinstance(record, dict) else {}
  cfg = record.get("pretrained_cfg")
  if not str(record.get("architecture", "")).startswith("inception_v3") or not isinstance(
      cfg, dict) or "mean" not in cfg or "std" not in cfg:
    return None
  norm = (tuple(cfg["mean"]), tuple(cfg["std"]))
  why = f"{path}: pretrained_cfg mean {list(norm[0])}, std {list(norm[1])}"
  for value, (mean, std) in ((True, _INCEPTION_NORM),
                             (False, (inception_v3.IMAGENET_MEAN, inception_v3.IMAGENET_STD))):
    if np.allclose(norm[0], mean, atol=1e-4) and np.allclose(norm[1], std, atol=1e-4):
      return value, why
  raise ValueError(f"{why}: neither transform_input setting gives that input (ImageNet "
                   "normalisation with transform_input=true gives mean/std 0.5, without it "
                   "ImageNet's own).")


def transform_input_for(setting: str, weights: str = "") -> bool:
  """Inception v3's ``transform_input`` for ``config.model.transform_input = setting``
  (one of ``TRANSFORM_INPUT``) and ``config.model.weights = weights``: ``"auto"`` takes
  the timm ``config.json`` beside the weights when there is one, else true (torchvision's
  pretrained setting); an explicit setting that contradicts that file is a ValueError."""
  if setting not in TRANSFORM_INPUT:
    raise ValueError(f"config.model.transform_input must be one of {list(TRANSFORM_INPUT)}, "
                     f"got {setting!r}.")
  implied = timm_transform_input(weights) if weights and os.path.isfile(weights) else None
  if setting == "auto":
    return True if implied is None else implied[0]
  value = setting == "true"
  if implied is not None and implied[0] != value:
    raise ValueError(f"config.model.transform_input={setting!r} contradicts {implied[1]}, "
                     f"which needs transform_input={str(implied[0]).lower()!r} (or 'auto').")
  return value
