"""Turn a Linen model and its variables into a pure ``predict(x) -> logits``.

SIS code (``overinterp_jax.sis``) takes any such function, so single models,
ensembles (``ensemble.py``) and input-dropout models (``input_dropout.py``)
plug in the same way.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax

PredictFn = Callable[[jax.Array], jax.Array]


def predict_fn_from(model: nn.Module, variables: Any, **apply_kwargs) -> PredictFn:
  """``predict(images [B, H, W, C] float32) -> logits [B, K]`` in eval mode.

  Calls ``model.apply(variables, images, train=False, **apply_kwargs)``:
  batch norm uses its running statistics and nothing is mutated, so the
  function is pure and can be jitted or vmapped. ``apply_kwargs`` is for
  extras such as ``rngs`` (see ``input_dropout.input_dropout_predict_fn``
  for input-dropout models, which need a fixed key to be deterministic).
  """
  def predict(images: jax.Array) -> jax.Array:
    return model.apply(variables, images, train=False, **apply_kwargs)
  return predict
