"""Every pipeline stage on tiny synthetic data: a check that the machinery runs.

  python -m overinterp_jax.main --config=configs/smoke.py --workdir=/tmp/smoke

A 2-epoch 3-layer CNN on 256 synthetic 16×16 images, every stage and control with
their smallest settings. Cost: about a minute on a 2-core CPU. Its numbers mean
nothing (the tests check structure, resumption and determinism with it; τ is 0.4 so
the weak model has SISes to find).
"""
from configs import cifar10


def get_config():
  c = cifar10.get_config()
  c.data.source = "synthetic"
  c.data.num_train = 256
  c.data.num_test = 64
  c.data.image_size = 16
  c.data.expected_train = 0
  c.data.expected_test = 0
  c.model.name = "cnn3"
  c.train.num_epochs = 2
  c.train.batch_size = 32
  c.eval_batch_size = 64
  c.train.schedule = "onecycle"
  c.train.lr = 0.05
  c.runtime.progress = False

  c.backselect.method = "gradient"
  c.backselect.remove_per_step = 16
  c.backselect.shard_size = 128     # 2 train shards, 1 test shard
  c.retrain.num_epochs = 2
  c.sis.num_images = 6
  c.retrain.kinds = ("bs", "random", "mask_only", "full")
  c.sis.patch_size = 2              # 64 features of 2×2 pixels
  c.sis.images_per_call = 2         # 3 resumable calls per record
  c.sis.threshold = 0.4             # the 2-epoch model is not confident; exercise real SISes
  c.sis.ensemble_size = 2
  c.sis.ensemble_epochs = 1
  c.sis.input_dropout_epochs = 1
  c.sis.input_dropout_samples = 2
  c.controls.masking_test_images = 32
  c.controls.gradient_vs_exact = False  # tests/test_pipeline_parts.py covers it
  c.report.num_figure_images = 4
  return c
