"""The paper's ImageNet experiment (Carter et al. 2021, §4.2; docs/method.md, docs/imagenet.md).

  python -m overinterp_jax.main --config=configs/imagenet.py --workdir=workdirs/imagenet \
      --config.data.data_dir=/data/tfds \
      --config.model.weights=/weights/inception_v3.safetensors

Variants (``--config=configs/imagenet.py:<variant>``):
  * default: Inception v3 at 299×299 (ImageNet mean/std), TFDS ``imagenet2012``
    prepared as ArrayRecord in ``data.data_dir`` (never downloaded; docs/imagenet.md
    says how to prepare it), streamed. The base model is ``model.weights``
    (torchvision's or timm's pretrained weights as ``.safetensors``; without it the base
    model is trained from scratch with the retraining recipe below). The view
    (``data.view = "auto"``): torchvision's evaluation transform of the weights
    (shorter side 342, centre crop 299, bit for bit) with weights, the paper's (shorter
    side 299, centre crop 299) without; ``--config.data.view=paper`` for the paper's
    with weights.
  * ``resnet50``: ResNet-50 at 224×224 (shorter side 256, centre crop 224: torchvision's
    and the paper's).
  * ``folder``: the same from an ILSVRC folder ``<path>/train/<wnid>/*.JPEG`` +
    ``<path>/val/<wnid>/*.JPEG`` (``--config.data.path=/data/ILSVRC2012``).
  * ``smoke``: every stage on the 1,000 real ImageNet JPEGs of
    ``../shared/data/imagenet_samples.tar.gz`` (one per class) in ~2 minutes on a
    2-core CPU: a small MLP trained on those images at 64×64 (train and test are the same
    1,000 images, so the model has confident right answers to analyse), k = 64.
    Its numbers mean nothing; the full-size models have their own tests.

Stages (the paper's public code, with docs/method.md's decisions):
  * backselect: Batched Gradient SIS of every train and val image, k = 100 pixels
    (all 3 channels) removed per step, no noise, target = the class predicted on the
    full image, removed pixels = the mean colour (0 after normalisation); records of
    ~180 KB per 299×299 image (removal step as uint16, one float16 confidence per step);
  * subsets: 10% (9,001 of 89,401 pixels at 299: whole removal steps) BS, random
    (same count), border frame (same count, 8 px deep) and BS mask-only; where BS
    pixels lie (border analysis);
  * retrain: Inception v3 from scratch (no aux head) on each kind of 10% subset: SGD
    lr 0.1, momentum 0.9, weight decay 1e-4, batch 256, 90 epochs, lr × 0.1 every 30
    epochs, random-resized crop + flip applied to image and mask together; the last
    epoch is reported (the paper: 71.4% top-1 on BS subsets, best epoch on val);
  * sis: SISes at τ = 0.9 from the backselect records of 1,000 val images the model
    classifies correctly with confidence ≥ 0.9 (seeded sample); controls on them.

Cost (benchmarks/imagenet_bgsis.py, docs/benchmarks.md#imagenet-batched-gradient-sis):
Batched Gradient SIS costs 895 forward+backward passes per 299×299 image with Inception
v3, 22.1 GFLOP each (XLA's count; no weight gradients): ~20 TFLOP per image. Measured on
this project's 2-core CPU: 226 s per image (3,142 h for the 50,000 val images), so the
default variant is for accelerators: train + val (1.33M images, 2.6e19 FLOP) is ~18 h
on one H100/H200 at 40% of its bf16 peak, plus retraining (4 × 90 epochs of Inception
v3). ``resnet50``: 502 passes of 16.1 GFLOP per 224×224 image, 99 s per image on the CPU,
0.28 h for val on one H100/H200 at 40%. ``smoke``: 2 min 12 s on a 2-core x86 CPU
(docs/results/imagenet_smoke.md, with kill -9 and resume).
"""
import os

from overinterp_jax.config_schema import base_config

VARIANTS = ("", "resnet50", "folder", "smoke")
SAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                       "shared", "data", "imagenet_samples.tar.gz")


def get_config(variant: str = ""):
  """The paper's ImageNet experiment; ``variant``: one of ``VARIANTS``."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown variant {variant!r} of configs/imagenet.py; known: "
                     f"{[v for v in VARIANTS if v]} (or none).")
  c = base_config()
  c.data.source = "tfds"
  c.data.name = "imagenet2012"
  c.data.in_memory = False          # streamed: 1.28M images never sit in memory
  c.data.expected_train = 1281167
  c.data.expected_test = 50000
  c.data.folder_splits = ("train", "val")
  # data.view "auto" (view_size/view_resize unset): torchvision's Resize(342)/CenterCrop(299)
  # with torchvision/timm weights, the paper's Resize(299)/CenterCrop(299) without.
  c.data.normalization = "imagenet"
  c.model.num_classes = 1000
  c.model.name = "inception_v3"
  c.runtime.data_workers = 8

  # Retraining recipe (and the base model's when no weights are given).
  c.train.num_epochs = 90
  c.train.batch_size = 256
  c.eval_batch_size = 250
  c.train.lr = 0.1
  c.train.schedule = "multistep"
  c.train.lr_milestones = (30, 60)
  c.train.lr_decay = 0.1
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.weight_decay = 1e-4
  c.train.augment.crop = "inception"      # random-resized crop + flip on the host, mask alongside
  c.runtime.checkpoint_every_steps = 1000

  c.backselect.method = "gradient"
  c.backselect.remove_per_step = 100
  c.backselect.noise_std = 0.0
  c.backselect.shard_size = 256     # ~46 MB of records per shard at 299×299

  c.subsets.frac_kept = 0.1
  c.retrain.kinds = ("bs", "random", "border", "mask_only")

  c.sis.selection = "backselect"    # SISes from the Batched Gradient SIS records
  c.sis.threshold = 0.9
  c.sis.only_correct = True
  c.sis.min_confidence = 0.9
  c.sis.num_images = 1000
  c.sis.models = ("single",)
  c.controls.smoothed_images = 1000
  c.controls.masking_test_images = 500

  if variant == "resnet50":
    c.model.name = "resnet50"       # view: torchvision's (and the paper's) 256, crop 224
  elif variant == "folder":
    c.data.source = "image_folder"  # --config.data.path=<ILSVRC folder with train/, val/>
  elif variant == "smoke":
    _smoke(c)
  return c


def _smoke(c) -> None:
  """Every stage on the 1,000 ImageNet sample JPEGs (one per class) in a few minutes on
  2 CPU cores."""
  c.data.source = "image_folder"
  c.data.path = os.path.normpath(SAMPLES)
  c.data.folder_splits = ("val", "val")  # the sample has val/<wnid>/ only: train = test
  c.data.expected_train = 1000
  c.data.expected_test = 1000
  c.data.view_size = 64
  c.data.view_resize = 64
  c.runtime.data_workers = 0
  c.runtime.checkpoint_every_steps = 0
  c.model.name = "mlp"
  c.train.num_epochs = 12
  c.train.batch_size = 50
  c.eval_batch_size = 250
  # 0.05 diverged (train loss 8 -> 94,832 by epoch 7, yet 85.7% on the memorised images);
  # at 0.01 the loss falls every epoch, 7.3 -> 0.02.
  c.train.lr = 0.01
  c.train.schedule = "onecycle"
  c.train.weight_decay = 0.0
  c.train.augment.enabled = False         # memorise the 1,000 images: confident answers to analyse
  c.backselect.remove_per_step = 64  # 64 steps of 64 pixels at 64×64
  c.backselect.shard_size = 250
  c.retrain.num_epochs = 6
  c.sis.num_images = 40
  c.controls.smoothed_images = 40
  c.controls.masking_test_images = 40
  c.report.num_figure_images = 4
