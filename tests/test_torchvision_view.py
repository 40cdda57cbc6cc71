"""The analysis view that torchvision/timm weights were measured with (issue 28, item 1).

``transforms.view`` with ``ViewSpec(..., torchvision=True)`` against a small PIL
re-implementation of torchvision's documented ``Resize(int)`` + ``CenterCrop(int)``
(``torchvision.transforms.functional``, PIL path; images opened as ``pil_loader`` does,
``.convert("RGB")``) on real ImageNet JPEGs: landscape, portrait, square, grey, and
shorter sides below the crop. No torch needed. Then which view a config gets, and
Inception v3's ``transform_input`` from a timm ``config.json``.
"""
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image, ImageOps

from configs import cifar10, imagenet
from overinterp_jax import config_checks, train
from overinterp_jax.data import image_folder, transforms, view_for_config
from overinterp_jax.models import torch_weights
from overinterp_jax.pipeline import shipped_base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "..", "shared", "data", "imagenet_samples.tar.gz")
# (file, why): sizes (W×H) and modes as stored in the sample archive.
MEMBERS = {
    "n01440764_tench": "427×320: int(256·427/320) = 341, rounding gives 342",
    "n01443537_goldfish": "376×263",
    "n01494475_hammerhead": "320×480, portrait",
    "n02692877_airship": "350×156 grey (mode L), shorter side below 224 and 299",
    "n01871265_tusker": "75×56, far below the crop",
    "n02817516_bearskin": "95×95, square",
    "n04238763_slide_rule": "411×120, long and thin",
}
# (resize, crop): ResNet-50's and Inception v3's torchvision evaluation, the paper's
# Inception view, and a crop larger than the resized image (torchvision pads with zeros).
SETTINGS = [(256, 224), (342, 299), (299, 299), (256, 299)]


@pytest.fixture(scope="module")
def jpegs() -> dict:
  """``{name: JPEG bytes}`` of ``MEMBERS``, read from the sample archive."""
  if not os.path.exists(SAMPLES):
    pytest.skip(f"the ImageNet sample archive is not here ({SAMPLES})")
  out = {}
  with tarfile.open(SAMPLES) as tar:
    for m in tar:
      name = os.path.basename(m.name).removesuffix(".JPEG")
      if name in MEMBERS:
        out[name] = tar.extractfile(m).read()
  assert sorted(out) == sorted(MEMBERS)
  return out


def torchvision_reference(jpeg: bytes, resize: int, crop: int) -> np.ndarray:
  """torchvision's ``CenterCrop(crop)(Resize(resize)(pil_loader(jpeg)))`` as documented,
  written out with PIL: ``[crop, crop, 3]`` uint8."""
  img = Image.open(io.BytesIO(jpeg)).convert("RGB")
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = resize, int(resize * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_h, new_w) != (h, w):
    img = img.resize((new_w, new_h), Image.BILINEAR)
  w, h = img.size
  if crop > w or crop > h:
    pad_w, pad_h = max(crop - w, 0), max(crop - h, 0)
    img = ImageOps.expand(img, border=(pad_w // 2, pad_h // 2, (pad_w + 1) // 2,
                                       (pad_h + 1) // 2), fill=0)
    w, h = img.size
  top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
  return np.asarray(img.crop((left, top, left + crop, top + crop)))


@pytest.mark.parametrize("resize,crop", SETTINGS)
def test_torchvision_view_is_bit_exact_on_real_jpegs(jpegs, resize, crop):
  """Our decoder + view equal torchvision's documented algorithm bit for bit; the old
  arithmetic (the "sizes" view) does not, on these images."""
  spec = transforms.ViewSpec(crop, resize, torchvision=True)
  old_differs = []
  for name, jpeg in jpegs.items():
    image = image_folder.decode_image(jpeg, name)  # grey JPEGs: PIL's convert("RGB")
    want = torchvision_reference(jpeg, resize, crop)
    got = transforms.view(image, spec)
    assert got.shape == want.shape == (crop, crop, 3), name
    np.testing.assert_array_equal(got, want, err_msg=f"{name} ({MEMBERS[name]})")
    if resize >= crop:
      old = transforms.view(image, transforms.ViewSpec(crop, resize))
      old_differs.append(not np.array_equal(old, want))
  assert not old_differs or any(old_differs)


def test_grey_jpeg_decodes_as_pil_convert_rgb(jpegs):
  jpeg = jpegs["n02692877_airship"]
  assert Image.open(io.BytesIO(jpeg)).mode == "L"
  np.testing.assert_array_equal(image_folder.decode_image(jpeg, "airship"),
                                np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB")))


def _weights_file(tmp_path, config_json=None) -> str:
  """A stand-in weights file (only its being a file matters to the view) and, when
  given, a timm ``config.json`` beside it."""
  path = tmp_path / "model.safetensors"
  path.write_bytes(b"")
  if config_json is not None:
    (tmp_path / "config.json").write_text(json.dumps(config_json))
  return str(path)


def _view(c):
  v = view_for_config(c)
  return v.name, v.resize, v.size, v.torchvision


def test_torchvision_view_is_the_default_with_torchvision_weights(tmp_path):
  weights = _weights_file(tmp_path)
  c = imagenet.get_config()
  assert _view(c) == ("paper", 299, 299, True)  # trained from scratch: the paper's view
  c.model.weights = weights
  assert _view(c) == ("torchvision", 342, 299, True)
  c.data.view = "paper"  # the paper's view, by name
  assert _view(c) == ("paper", 299, 299, True)
  r = imagenet.get_config("resnet50")
  r.model.weights = weights
  assert _view(r) == ("torchvision", 256, 224, True)
  r.model.weights = str(tmp_path)  # a training work directory of ours: not torchvision's
  assert _view(r) == ("paper", 256, 224, True)
  # Unchanged: the smoke's own sizes and arithmetic, CIFAR's images as stored.
  assert _view(imagenet.get_config("smoke")) == ("sizes", 64, 64, False)
  assert _view(cifar10.get_config()) == ("sizes", 0, 0, False)
  # Set sizes replace a named view's; the report names the view it used.
  c.data.view, c.data.view_size, c.data.view_resize = "torchvision", 288, 320
  assert _view(c) == ("torchvision", 320, 288, True)
  assert view_for_config(c).describe() == (
      'view "torchvision": Resize(320), CenterCrop(288) (torchvision\'s arithmetic)')


def test_view_errors_name_the_key():
  c = imagenet.get_config("smoke")
  c.data.view = "timm"
  with pytest.raises(ValueError, match="config.data.view must be one of"):
    config_checks.validate_config(c, num_devices=1)
  c.data.view, c.data.view_size = "torchvision", 0
  with pytest.raises(ValueError, match="config.data.view='torchvision'.*'mlp'.*view_size"):
    view_for_config(c)


TIMM_CONFIG = {  # as timm's save_for_hf writes it (inception_v3.gluon_in1k, trimmed)
    "architecture": "inception_v3", "num_classes": 1000, "num_features": 2048,
    "global_pool": "avg",
    "pretrained_cfg": {"tag": "gluon_in1k", "input_size": [3, 299, 299],
                       "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
                       "num_classes": 1000, "first_conv": "Conv2d_1a_3x3.conv",
                       "classifier": "fc"}}


def test_transform_input_follows_the_timm_config_beside_the_weights(tmp_path):
  c = imagenet.get_config()
  assert train.build_model(c).transform_input  # torchvision's setting by default
  gluon = tmp_path / "gluon"
  gluon.mkdir()
  c.model.weights = _weights_file(gluon, TIMM_CONFIG)
  assert not train.build_model(c).transform_input  # ImageNet mean/std: no transform_input
  c.model.transform_input = "true"
  with pytest.raises(ValueError, match="transform_input='true' contradicts .*config.json"):
    train.build_model(c)
  tv = tmp_path / "tv"
  tv.mkdir()
  cfg = json.loads(json.dumps(TIMM_CONFIG))
  cfg["pretrained_cfg"].update(tag="tv_in1k", mean=[0.5] * 3, std=[0.5] * 3)
  c.model.weights = _weights_file(tv, cfg)
  c.model.transform_input = "auto"
  assert train.build_model(c).transform_input
  c.model.transform_input = "false"
  with pytest.raises(ValueError, match="contradicts"):
    train.build_model(c)
  plain = tmp_path / "plain"  # a torchvision file (no config.json): the switch decides
  plain.mkdir()
  c.model.weights = _weights_file(plain)
  assert not train.build_model(c).transform_input
  cfg["pretrained_cfg"].update(mean=[0.4] * 3)
  c.model.weights = _weights_file(tv, cfg)
  with pytest.raises(ValueError, match="neither transform_input setting"):
    torch_weights.transform_input_for("auto", c.model.weights)
  r = imagenet.get_config("resnet50")
  r.model.transform_input = "false"
  with pytest.raises(ValueError, match="only inception_v3 has transform_input"):
    train.build_model(r)


def test_the_timm_config_beside_the_weights_keys_the_model(tmp_path):
  """``transform_input="auto"`` reads the ``config.json`` beside the weights, so results
  of a model loaded from them must not be reused once that file changes."""
  weights = _weights_file(tmp_path)
  alone = shipped_base.weights_fingerprint(weights, "data")
  (tmp_path / "config.json").write_text(json.dumps(TIMM_CONFIG))
  gluon = shipped_base.weights_fingerprint(weights, "data")
  cfg = json.loads(json.dumps(TIMM_CONFIG))
  cfg["pretrained_cfg"].update(mean=[0.5] * 3, std=[0.5] * 3)
  (tmp_path / "config.json").write_text(json.dumps(cfg))
  tv = shipped_base.weights_fingerprint(weights, "data")
  assert len({alone, gluon, tv}) == 3
  assert shipped_base.weights_fingerprint(weights, "data") == tv
