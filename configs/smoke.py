"""Seconds-long run of the whole code path on synthetic data (used by the tests).

  python -m overinterp_jax.main --config=configs/smoke.py --workdir=/tmp/smoke
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
  c.model = "cnn3"
  c.num_epochs = 2
  c.batch_size = 32
  c.eval_batch_size = 64
  c.schedule = "onecycle"
  c.lr = 0.05
  c.progress = False
  return c
