"""The ImageNet path: configs/imagenet.py, border subsets and analysis, class names, the
compact records at 299×299, SIS from the backselect records, and base-model weights
from a .safetensors file."""
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from configs import imagenet
from overinterp_jax import config_checks, main
from overinterp_jax.data import class_names, loader, view_for_config
from overinterp_jax.pipeline import record_shards, subsets_stage
from overinterp_jax.store import atomic, npz

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLES = os.path.join(REPO, "..", "shared", "data", "imagenet_samples.tar.gz")


@pytest.mark.parametrize("variant", ["", "resnet50", "folder", "smoke"])
def test_imagenet_config_variants_validate(variant, tmp_path):
  c = imagenet.get_config(variant)
  if variant == "folder" or (variant == "smoke" and not os.path.exists(c.data.path)):
    c.data.path = str(tmp_path)  # the folder variant's path is the user's to give
  config_checks.validate_config(c, num_devices=1)
  assert c.model.num_classes == 1000 and c.subsets.frac_kept == 0.1
  assert c.sis.threshold == 0.9 and c.sis.selection == "backselect"
  if variant != "smoke":
    assert c.backselect.method == "gradient" and c.backselect.remove_per_step == 100
    assert c.backselect.noise_std == 0.0 and not c.data.in_memory
    assert c.retrain.kinds == ("bs", "random", "border", "mask_only")
  sizes = {"": (299, 299), "resnet50": (224, 256), "folder": (299, 299), "smoke": (64, 64)}
  view = view_for_config(c)  # without weights: the paper's view (the smoke: its own sizes)
  assert (view.size, view.resize) == sizes[variant]


def test_imagenet_config_unknown_variant_names_the_known_ones():
  with pytest.raises(ValueError, match="Unknown variant 'tiny'.*resnet50.*folder.*smoke"):
    imagenet.get_config("tiny")


@pytest.mark.parametrize("key,value,match", [
    ("sis.selection", "approximate", "sis.selection"),
    ("data.folder_splits", ("train",), "data.folder_splits"),
    ("model.weights", "/nonexistent/w.safetensors", "model.weights"),
])
def test_imagenet_config_errors_name_the_key(key, value, match, tmp_path):
  c = imagenet.get_config("smoke")
  c.data.path = str(tmp_path)
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    config_checks.validate_config(c, num_devices=1)


def test_backselect_selection_needs_pixel_features(tmp_path):
  c = imagenet.get_config("smoke")
  c.data.path = str(tmp_path)
  c.sis.patch_size = 2
  with pytest.raises(ValueError, match=r"config\.sis\.patch_size=2"):
    config_checks.validate_config(c, num_devices=1)


@pytest.mark.parametrize("h,w,kept", [(299, 299, 8941), (224, 224, 5018), (32, 32, 52),
                                      (5, 3, 15), (6, 7, 0), (10, 4, 33)])
def test_border_mask_is_a_frame_of_exactly_the_kept_count(h, w, kept):
  mask = subsets_stage.border_mask(h, w, kept)
  assert mask.shape == (h, w) and mask.sum() == kept
  if kept:
    ring = subsets_stage.edge_distance(h, w)
    band = subsets_stage.border_width(h, w, kept)
    assert mask[ring < band - 1].all()      # every ring but the last is whole
    assert not mask[ring >= band].any()     # nothing inside the frame


def test_border_frame_at_299_is_8_pixels_deep():
  assert subsets_stage.border_width(299, 299, 9001) == 8


def test_border_mask_rejects_more_pixels_than_the_image():
  with pytest.raises(ValueError, match="do not fit a 4x4 image"):
    subsets_stage.border_mask(4, 4, 17)


def test_border_analysis_against_uniform():
  freq = np.zeros((10, 10), np.int64)
  freq[0, :] = 3  # every kept pixel in the top row: all inside a 1-px band
  out = subsets_stage.border_analysis(freq, 3, band=1)
  assert out["fraction_kept_in_band"] == 1.0
  assert out["band_share_of_image"] == pytest.approx(36 / 100)
  assert out["ratio_to_uniform"] == pytest.approx(100 / 36)
  assert out["max_position_frequency"] == 1.0
  freq = np.ones((10, 10), np.int64)  # uniform: the ratio is 1
  assert subsets_stage.border_analysis(freq, 1, band=2)["ratio_to_uniform"] == pytest.approx(1)


def test_constant_mask_is_the_same_mask_for_every_example_in_a_feed():
  mask = subsets_stage.border_mask(6, 6, 20)
  cm = loader.ConstantMask(mask, 5)
  assert len(cm) == 5 and cm[3].shape == (6, 6) and cm[np.arange(4)].shape == (4, 6, 6)
  assert cm.digest != loader.ConstantMask(subsets_stage.border_mask(6, 6, 21), 5).digest
  images = np.full((5, 6, 6, 3), 200, np.uint8)
  feed = loader.array_feed(images, np.zeros(5, np.int32), lambda x: x.astype(np.float32))
  x, _ = feed.with_masks(cm).batch(np.arange(5))
  np.testing.assert_array_equal(x[..., 0] == 200, np.broadcast_to(mask, (5, 6, 6)))
  with pytest.raises(ValueError, match=r"one \[H, W\] mask"):
    loader.ConstantMask(np.zeros((2, 6, 6), bool), 2)


def test_imagenet_class_names():
  lemmas = class_names.imagenet_lemmas()
  assert len(lemmas) == 1000 and list(lemmas) == sorted(lemmas)
  assert class_names.display_name("n01440764") == "tench"
  assert class_names.display_name("n04592741") == "wing"
  assert class_names.display_names(("cat", "n01443537")) == ("cat", "goldfish")


def test_a_299x299_record_takes_at_most_200_kb(tmp_path):
  """Batched Gradient SIS at 299×299 with k = 100: one image's record on disk."""
  d, k = 299 * 299, 100
  steps = -(-d // k)
  rng = np.random.default_rng(0)
  order = rng.permutation(d)[None].astype(np.int32)
  values = np.repeat(np.sort(rng.random(steps))[::-1], k)[:d][None].astype(np.float32)
  shard = record_shards.encode(order, values, np.array([7], np.int32),
                               np.array([0.95], np.float32), ["n01440764/x.JPEG"], k)
  path = tmp_path / "shard.npz"
  npz.save(str(path), shard, "fp")
  size = os.path.getsize(path)
  assert size <= 200_000, size
  back = record_shards.decode(npz.load(str(path), "fp"), k)
  # Each pixel's removal step survives; the confidence per step to float16 precision.
  np.testing.assert_array_equal(np.argsort(back["order"][0], kind="stable") // k,
                                np.argsort(order[0], kind="stable") // k)
  np.testing.assert_allclose(back["values"], values, rtol=1e-3)


def _sample_folder(tmp_path, count: int) -> str:
  """The first ``count`` classes of the real ImageNet sample as ``val/<wnid>/x.JPEG``."""
  if not os.path.exists(SAMPLES):
    pytest.skip(f"the ImageNet sample archive is not here ({SAMPLES})")
  root = tmp_path / "imagenet_slice"
  with tarfile.open(SAMPLES) as tar:
    members = sorted((m for m in tar if m.isfile() and m.name.endswith(".JPEG")),
                     key=lambda m: m.name)[:count]
    for m in members:
      parts = m.name.split("/")[-3:]
      out = root.joinpath(*parts)
      out.parent.mkdir(parents=True, exist_ok=True)
      out.write_bytes(tar.extractfile(m).read())
  return str(root)


def _slice_config(path: str, workdir_classes: int):
  c = imagenet.get_config("smoke")
  c.data.path = path
  c.data.expected_train = c.data.expected_test = workdir_classes
  c.model.num_classes = workdir_classes
  c.data.view_size = c.data.view_resize = 32
  c.backselect.remove_per_step = 32
  c.train.num_epochs, c.retrain.num_epochs, c.train.batch_size = 8, 1, 4
  c.sis.num_images = c.controls.smoothed_images = c.controls.masking_test_images = 6
  c.sis.min_confidence = 0.5
  c.runtime.progress = False
  return c


@pytest.mark.slow
def test_smoke_pipeline_on_real_imagenet_images(tmp_path):
  """Every stage of configs/imagenet.py:smoke on 12 real ImageNet JPEGs (any size,
  grey ones included in the full sample) streamed from a folder."""
  c = _slice_config(_sample_folder(tmp_path, 12), 12)
  workdir = str(tmp_path / "run")
  main.run(c, workdir)
  report = open(os.path.join(workdir, "report.md")).read()
  for text in ("10% border frame", "## Border analysis (10% BS subsets)", "outer 1-px band",
               "gradient backward selection", "Sampled from the", "| border |",
               "kept_positions"):
    assert text in report, text
  summary = atomic.load_json(os.path.join(workdir, "stages", "subsets.json"))
  assert summary["pixels_kept"] == 103 and summary["border_width"] == 1
  assert set(summary["border_analysis"]) == {"train", "test"}
  assert os.path.exists(os.path.join(workdir, "figures", "kept_positions.png"))
  sis = atomic.load_json(os.path.join(workdir, "stages", "sis.json"))
  assert sis["selection"] == "gradient" and sis["only_correct"]


def test_base_model_from_safetensors_weights(tmp_path):
  """config.model.weights: torch-layout weights become the base model (no training)."""
  from safetensors.numpy import save_file
  import jax
  from overinterp_jax import train
  from overinterp_jax.data import load_for_config
  from overinterp_jax.models import torch_weights
  c = _slice_config(_sample_folder(tmp_path, 4), 4)
  c.model.name = "resnet50"
  c.stages = ("train", "report")
  module = train.build_model(c)
  rng = np.random.default_rng(3)  # random values in the template's shapes (no init compile)
  variables = jax.tree.map(lambda s: rng.normal(0, 0.05, s.shape).astype(np.float32) + (
      1.0 if s.shape and len(s.shape) == 1 else 0.0),
      torch_weights.variables_template("resnet50", 4))
  variables["batch_stats"] = jax.tree.map(np.abs, variables["batch_stats"])  # var > 0
  path = str(tmp_path / "resnet50.safetensors")
  save_file(torch_weights.to_torch_state(variables, "resnet50"), path)
  c.model.weights = path
  workdir = str(tmp_path / "run")
  main.run(c, workdir)
  summary = atomic.load_json(os.path.join(workdir, "stages", "train.json"))
  assert not os.path.exists(os.path.join(workdir, "base_model"))  # loaded, not trained
  # Weights from a torchvision/timm file: torchvision's arithmetic (at the config's 32×32).
  ds = load_for_config(c.data, workdir, progress=False, view=view_for_config(c))
  assert ds.view.torchvision and ds.view.name == "torchvision" and ds.view.size == 32
  x, y = ds.feed("test").batch(np.arange(4))
  logits = module.apply(torch_weights.load_safetensors(path, "resnet50", 4), x, train=False)
  assert summary["test_accuracy"] == pytest.approx(float((np.argmax(logits, -1) == y).mean()))
  report = open(os.path.join(workdir, "report.md")).read()
  assert 'view "torchvision": Resize(32), CenterCrop(32) (torchvision\'s arithmetic)' in report


def test_base_model_from_a_training_work_directory(tmp_path):
  """config.model.weights = a training work directory of ours: its newest verified
  checkpoint is the base model, measured, not retrained."""
  from configs import smoke
  c = smoke.get_config()
  c.stages = ("train",)
  first = str(tmp_path / "first")
  main.run(c, first)
  trained_summary = atomic.load_json(os.path.join(first, "stages", "train.json"))
  c.model.weights = os.path.join(first, "base_model")
  second = str(tmp_path / "second")
  main.run(c, second)
  loaded = atomic.load_json(os.path.join(second, "stages", "train.json"))
  assert not os.path.exists(os.path.join(second, "base_model"))
  assert loaded["test_accuracy"] == trained_summary["test_accuracy"]
  assert loaded["test_loss"] == pytest.approx(trained_summary["test_loss"], rel=1e-5)
  from overinterp_jax.data import load_for_config
  from overinterp_jax.pipeline import shipped_base
  given = shipped_base.load_weights(c, load_for_config(c.data, second, progress=False))
  assert given.epochs == int(c.train.num_epochs)  # the SIS table's "trained (ep)" for the base
  c.model.weights = str(tmp_path)  # a directory without checkpoints
  with pytest.raises(ValueError, match="config.model.weights=.*checkpoints"):
    main.run(c, str(tmp_path / "third"))
  # The newest checkpoint fails its checksums: a clear error, no fallback to an older
  # one, and nothing in the given directory deleted.
  from overinterp_jax.store import checkpoints
  base = os.path.join(first, "base_model")
  step = max(int(n) for n in os.listdir(os.path.join(base, "checkpoints")) if n.isdigit())
  digest_path = checkpoints.files(base, step)[1]
  digests = atomic.load_json(digest_path)
  key = sorted(digests["sha256"])[0]
  digests["sha256"][key] = "0" * 64
  atomic.save_json(digest_path, digests)
  before = sorted(os.listdir(os.path.join(base, "checkpoints")))
  c.model.weights = base
  with pytest.raises(ValueError, match=f"checkpoint {step} fails its checksums"):
    main.run(c, str(tmp_path / "fourth"))
  assert sorted(os.listdir(os.path.join(base, "checkpoints"))) == before


def test_step_records_keep_whole_removal_steps():
  """Records above 65,536 pixels store each pixel's removal step only: subsets keep whole
  steps from the last one back (9,001 of 89,401 pixels at 299×299, k = 100)."""
  from overinterp_jax.selection import records
  assert records.whole_steps_to_keep(299 * 299, 8941, 100) == 9001
  assert records.whole_steps_to_keep(299 * 299, 1, 100) == 1      # the last step: 1 pixel
  assert records.whole_steps_to_keep(299 * 299, 2, 100) == 101
  assert records.whole_steps_to_keep(1024, 52, 1) == 52           # exact ranks: as asked
  assert records.whole_steps_to_keep(300, 300, 100) == 300
  d = 299 * 299
  assert record_shards.rank_unit(d, 100) == 100 and record_shards.rank_unit(256 * 256, 100) == 1
