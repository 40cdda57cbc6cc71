"""Trained models shipped with the package, loaded by name: ``pretrained("resnet20_cifar10")``.

Each model is two files in ``models/weights/``:
  * ``<name>.msgpack``: its Flax variables ``{'params', 'batch_stats'}``, float32
    (``flax.serialization``);
  * ``<name>.json``: what it is — the registry model and its classes, the input
    normalisation it expects, the command and config fingerprint that trained it,
    its measured test accuracy, and the sha256 of the ``.msgpack`` file, checked on
    every load.
``python -m overinterp_jax.export_pretrained`` writes both from a finished training run.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from overinterp_jax.models.registry import create_model

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def available(directory: str = WEIGHTS_DIR) -> list[str]:
  """Names of the models in ``directory`` (each with its ``.json`` and ``.msgpack``)."""
  if not os.path.isdir(directory):
    return []
  names = {f[:-len(".json")] for f in os.listdir(directory) if f.endswith(".json")}
  return sorted(n for n in names if os.path.exists(os.path.join(directory, f"{n}.msgpack")))


def info(name: str, directory: str = WEIGHTS_DIR) -> dict:
  """The ``.json`` record of shipped model ``name``; ValueError naming the known ones."""
  path = os.path.join(directory, f"{name}.json")
  if not os.path.exists(path):
    raise ValueError(f"No shipped model {name!r}; available: {available(directory)}.")
  with open(path) as fh:
    return json.load(fh)


def build(record: dict) -> nn.Module:
  """The Linen module described by an ``info`` record."""
  kwargs = {} if record.get("bn_momentum") is None else {"bn_momentum": record["bn_momentum"]}
  return create_model(record["model"], num_classes=int(record["num_classes"]), **kwargs)


def _sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def pretrained(name: str, directory: str = WEIGHTS_DIR) -> tuple[nn.Module, Any]:
  """``(model, variables)`` of shipped model ``name``.

  ``model.apply(variables, images [B, H, W, 3] float32, train=False) -> logits [B, K]``,
  images normalised with ``info(name)["normalization"]`` (mean/std in [0, 1] units, as
  ``data.Normalization``).

  Raises:
    ValueError: unknown name; the weights' sha256 differs from the record's; or their
      shapes are not those of the recorded model.
  """
  record = info(name, directory)
  with open(os.path.join(directory, f"{name}.msgpack"), "rb") as fh:
    data = fh.read()
  if _sha256(data) != record["sha256"]:
    raise ValueError(f"Shipped model {name!r}: weights sha256 {_sha256(data)} differs from "
                     f"the recorded {record['sha256']}; the file is damaged or replaced.")
  variables = serialization.msgpack_restore(data)
  model = build(record)
  expected = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *record["image_shape"]), jnp.float32), train=False))
  shapes = jax.tree.map(lambda a: tuple(np.shape(a)), variables)
  if shapes != jax.tree.map(lambda a: tuple(a.shape), dict(expected)):
    raise ValueError(f"Shipped model {name!r}: weight shapes do not match a "
                     f"{record['model']} with {record['num_classes']} classes.")
  return model, jax.tree.map(jnp.asarray, variables)


def save(name: str, variables: Any, record: dict, directory: str = WEIGHTS_DIR) -> dict:
  """Writes ``<name>.msgpack`` (``variables`` as float32) and ``<name>.json`` (``record``
  plus ``name`` and the weights' ``sha256``) to ``directory``; returns the written record."""
  host = jax.tree.map(lambda a: np.asarray(a, np.float32), jax.device_get(variables))
  data = serialization.msgpack_serialize(host)
  record = {"name": name, **record, "sha256": _sha256(data)}
  os.makedirs(directory, exist_ok=True)
  for suffix, payload in ((".msgpack", data), (".json", (json.dumps(record, indent=1) + "\n")
                                                        .encode())):
    tmp = os.path.join(directory, f"{name}{suffix}.tmp")
    with open(tmp, "wb") as fh:
      fh.write(payload)
    os.replace(tmp, os.path.join(directory, f"{name}{suffix}"))
  return record

