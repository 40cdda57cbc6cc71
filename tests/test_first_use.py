"""What a newcomer meets first: the quick start's checks of the shipped model, and a numpy
model given to the batched SIS API."""
import numpy as np
import pytest

from configs import cifar10_cpu
from overinterp_jax import data as data_lib
from overinterp_jax import sis
from overinterp_jax.pipeline import shipped_base


def _warnings(monkeypatch):
  said = []
  monkeypatch.setattr(shipped_base.logging, "warning", lambda msg, *a: said.append(msg % a))
  return said


def test_the_quick_start_config_gets_no_warning_and_a_changed_setting_gets_one(monkeypatch):
  dataset = data_lib.load_dataset("image_folder", path="")
  said = _warnings(monkeypatch)
  config = cifar10_cpu.get_config("analyze")
  # The record's settings include the model's name under its old key ``model``.
  assert shipped_base.differing_settings(config, shipped_base.shipped.info(
      config.model.pretrained)) == []
  shipped_base.check_compatible(config, dataset)
  assert said == []
  config.train.lr = 0.1
  config.train.augment.padding = 4
  shipped_base.check_compatible(config, dataset)
  assert len(said) == 1 and "with other augment.padding, lr than this config's" in said[0]
  shipped_base.check_compatible(config, dataset, warn=False)  # shipped_base.load's check
  assert len(said) == 1


@pytest.mark.parametrize("select", [sis.batched_backselect, sis.gradient_backselect])
def test_a_numpy_model_in_the_batched_api_raises_a_value_error_naming_it(select):
  weights = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
  images = np.random.default_rng(1).random((2, 2, 2, 3), np.float32)

  def numpy_apply(params, x):  # [B, 2, 2, 3] -> logits [B, 3], with numpy: not traceable
    return np.asarray(x).reshape(len(x), -1) @ params

  with pytest.raises(ValueError, match=r"predict_fn must be JAX-traceable.*"
                                       r"TracerArrayConversionError.*sis\.backselect"):
    select(numpy_apply, images, params=weights)

  def branching_apply(x):  # Python control flow on the values
    return x.reshape(len(x), -1)[:, :3] * (1.0 if x.sum() > 0 else -1.0)

  with pytest.raises(ValueError, match="TracerBoolConversionError"):
    select(branching_apply, images)
