"""Test accuracy of a trained base model, plain and averaged with its horizontal flip.

Averaging the softmax of each test image and of its mirror image (flip
test-time augmentation, as in the DAWNBench CIFAR-10 entries) is a
2-view ensemble of the same network. The pipeline never uses it: SIS and
every stage analyse the plain model. Run with the config and work
directory of a finished ``train`` stage (nothing is retrained):

  python benchmarks/flip_average_accuracy.py --config=configs/cifar10_cpu.py \\
      --workdir=workdirs/cifar10_cpu
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from overinterp_jax import data as data_lib
from overinterp_jax.pipeline import trained
from overinterp_jax.pipeline.context import Context

config_flags.DEFINE_config_file("config", None, "Config file of the trained run.")
flags.DEFINE_string("workdir", None, "Work directory holding its finished base_model/.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  config = FLAGS.config
  if int(config.runtime.host_devices) > 0:
    jax.config.update("jax_num_cpu_devices", int(config.runtime.host_devices))
  if not os.path.exists(os.path.join(FLAGS.workdir, "base_model", "summary.json")):
    # Without this check ctx.base would train one; a model of another config raises there.
    raise SystemExit(f"{FLAGS.workdir}/base_model has no finished model to evaluate.")
  ctx = Context(config, FLAGS.workdir, data_lib.load_for_config(
      config.data, FLAGS.workdir, view=data_lib.view_for_config(config)))
  feed, labels = ctx.feed("test"), ctx.labels("test")
  batch_size = int(config.eval_batch_size)
  plan = [np.arange(i, min(i + batch_size, len(feed))) for i in range(0, len(feed), batch_size)]

  def probabilities(mirror):
    """Softmax ``[N, K]`` of the test images, ``mirror [N]`` bool of them flipped."""
    return trained.softmax(np.concatenate([
        trained.predict_logits(ctx.base.apply, ctx.base.variables, x, batch_size=batch_size,
                               mesh=ctx.mesh) for x, _ in feed.batches(plan, mirror=mirror)]))

  plain = probabilities(None)
  mirrored = probabilities(np.ones(len(feed), bool))
  out = {"workdir": FLAGS.workdir, "count": int(len(labels)),
         "plain_accuracy": float((plain.argmax(-1) == labels).mean()),
         "flip_averaged_accuracy": float(((plain + mirrored).argmax(-1) == labels).mean())}
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
