"""Training throughput vs plain inference of the same model, in one run.

Prints images/s of the compiled training step (forward, backward, SGD update,
on-device crop+flip augmentation) and of plain inference at the same batch,
and the ratio ``train / (inference / 3)`` (a training step costs about three
forward passes, so 1.0 means no overhead beyond that).

  python benchmarks/train.py --model resnet20 --batch 128
"""
from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from overinterp_jax import sharding, train
from overinterp_jax.config_schema import base_config
from overinterp_jax.data import augment
from overinterp_jax.models import create_model
from timing import rate


def main():
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--model", default="resnet20")
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--host_devices", type=int, default=0,
                      help="CPU devices to split the host into (0 = JAX's default); both "
                           "training and inference shard the batch over all devices.")
  parser.add_argument("--size", type=int, default=32,
                      help="image side in pixels (progressive resizing trains early epochs "
                           "at 16 and 24)")
  args = parser.parse_args()
  if args.host_devices:
    jax.config.update("jax_num_cpu_devices", args.host_devices)
  config = base_config()
  config.train.update(dict(lr=0.1, schedule="onecycle", num_epochs=1, warmup_fraction=0.2))
  model = create_model(args.model, num_classes=10)
  tx = train.make_optimizer(config, steps_per_epoch=100)
  mesh = sharding.data_mesh()
  state = train.create_train_state(model, tx, (args.size, args.size, 3), jax.random.key(0))
  state = jax.device_put(state, sharding.replicated(mesh))
  steps = train.compile_steps(mesh, augment.augment_images)
  x = np.asarray(jax.random.normal(jax.random.key(1), (args.batch, args.size, args.size, 3)))
  y = np.arange(args.batch, dtype=np.int32) % 10
  key = jax.random.key(2)
  holder = [state]

  def step():
    holder[0], m = steps.train(holder[0], x, y, key)
    m["loss"].block_until_ready()

  infer = jax.jit(lambda v, xb: model.apply(v, xb, train=False),
                  in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)))
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  plain = rate(lambda: infer(variables, x).block_until_ready(), args.batch)
  training = rate(step, args.batch)
  out = {"model": args.model, "batch": args.batch, "size": args.size,
         "devices": len(jax.devices()),
         "plain_inference_img_per_s": plain, "train_img_per_s": training,
         "train_vs_inference_over_3": training / (plain / 3)}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
