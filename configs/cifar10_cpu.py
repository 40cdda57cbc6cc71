"""CIFAR-10 on a 2-core CPU: the paper's pipeline sized for ≤ 60 minutes of training.

Same model (ResNet-20), optimiser and augmentation as configs/cifar10.py, on the
shared real CIFAR-10 archive (../shared/data/cifar10_jpeg.tar.gz, JPEG q75),
with a one-cycle schedule over few epochs instead of 200 epochs of steps.

  python -m overinterp_jax.main --config=configs/cifar10_cpu.py --workdir=workdirs/cifar10_cpu
Expected on 2 cores: see README.md "Measured" for the time and accuracy we got.
Re-running with the same --workdir resumes from the last epoch's checkpoint.
"""
from configs import cifar10


def get_config():
  c = cifar10.get_config()
  c.data.source = "image_folder"
  c.num_epochs = 13
  c.schedule = "onecycle"
  c.lr = 0.2
  c.warmup_fraction = 0.2
  c.batch_size = 128
  return c
