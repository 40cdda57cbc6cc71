"""The paper's CIFAR-10 recipe (Carter et al. 2021, §4.3 of docs/reference_details.md).

ResNet-20, SGD lr 0.1, Nesterov momentum 0.9, weight decay 5e-4, batch 128,
200 epochs, lr × 0.2 at epochs 60/120/160, random crop (4 px padding) + flip.
Expected: ~91–92% test accuracy on the original CIFAR-10 (a little less on the
JPEG copy). Cost: ~2 GPU-hours on one modern GPU, 200 epochs × 50k images.

  python -m overinterp_jax.main --config=configs/cifar10.py --workdir=workdirs/cifar10
  # other architectures: --config.model=resnet56 (see overinterp_jax/models/registry.py)
Data: TFDS `cifar10` prepared in --config.data.data_dir, or an image folder /
.tar.gz via --config.data.source=image_folder --config.data.path=...
"""
import os

import ml_collections

SHARED_ARCHIVE = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "data",
    "cifar10_jpeg.tar.gz"))


def get_config():
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = ("train",)

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"            # "tfds" | "image_folder" | "synthetic"
  c.data.name = "cifar10"           # TFDS name (cifar10, imagenet2012)
  c.data.data_dir = ""              # TFDS data_dir holding the prepared dataset
  c.data.path = SHARED_ARCHIVE      # image folder or .tar.gz (source=image_folder)
  c.data.cache_dir = ""             # decoded-array cache; default <workdir>/data_cache
  c.data.expected_train = 50000     # image counts verified on load (0 = unchecked)
  c.data.expected_test = 10000
  c.data.augment = True             # random crop (4 px zero padding) + horizontal flip

  c.model = "resnet20"
  c.num_classes = 10
  c.input_dropout_keep_prob = 1.0   # < 1 wraps the model in input dropout (paper: 0.8)
  c.num_epochs = 200
  c.batch_size = 128
  c.eval_batch_size = 500
  c.schedule = "multistep"          # "multistep" | "onecycle" | "cosine"
  c.lr = 0.1
  c.lr_milestones = (60, 120, 160)
  c.lr_decay = 0.2
  c.warmup_fraction = 0.15          # onecycle only
  c.momentum = 0.9
  c.nesterov = True
  c.weight_decay = 5e-4
  c.checkpoints_to_keep = 2
  c.progress = True
  c.distributed = False             # True on multi-host runs: jax.distributed.initialize()
  return c
