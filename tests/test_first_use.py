"""What a newcomer meets first: the quick start's checks of the shipped model, and a numpy
model given to the batched SIS API."""
import numpy as np
import pytest

from configs import cifar10, cifar10_cpu
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
  # The record's settings use old paths: the model's name under ``model``, ``seed``, ``lr``,
  # ``augment.flip``... (config_schema.MOVED_KEYS).
  assert shipped_base.differing_settings(config, shipped_base.shipped.info(
      config.model.pretrained)) == []
  shipped_base.check_compatible(config, dataset)
  assert said == []
  config.train.lr = 0.1
  config.train.augment.padding = 4
  shipped_base.check_compatible(config, dataset)
  assert len(said) == 1 and "with other train.augment.padding, train.lr than" in said[0]
  shipped_base.check_compatible(config, dataset, warn=False)  # shipped_base.load's check
  assert len(said) == 1


def test_record_settings_of_every_age_are_read_at_todays_paths():
  old = {"model": "resnet20", "seed": 0, "train_seed": 0, "input_dropout_keep_prob": 1.0,
         "lr": 0.1, "num_epochs": 200, "num_classes": 10, "augment.flip": "random",
         "bn_momentum": 0.9, "precision": "float32"}
  new = {"model.name": "resnet20", "train.seed": 0, "model.input_keep_prob": 1.0,
         "train.lr": 0.1, "train.num_epochs": 200, "model.num_classes": 10,
         "train.augment.flip": "random", "model.bn_momentum": 0.9, "model.precision": "float32"}
  assert {shipped_base.setting_path(p) for p in old} == set(new)
  assert all(shipped_base.setting_path(p) == p for p in new)
  config = cifar10.get_config()  # the schema's defaults: the values above
  for settings in (old, new):
    assert shipped_base.differing_settings(config, {"train_settings": settings}) == []
  config.train.lr = 0.05
  assert shipped_base.differing_settings(config, {"train_settings": old}) == ["train.lr"]


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
