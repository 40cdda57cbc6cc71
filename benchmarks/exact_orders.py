"""Exact per-pixel backward selection of a seeded sample of real CIFAR-10 test images,
one image at a time, each stored as it finishes (a re-run resumes).

The references that ``benchmarks/hybrid_cost.py`` compares cheaper methods against: on
the shipped ResNet-20 (``resnet20_cifar10``), images of the shipped test slice that the
model classifies with confidence ≥ τ = 0.99 (so each has an SIS), drawn with ``--seed``;
targets are the classes predicted on the full images. About 9 minutes per image on a quiet
2-core CPU (524,800 model evaluations).

  python benchmarks/exact_orders.py --images 8 --out benchmarks/results/exact_orders

Each image ``i`` of the sample is written to ``OUT/image_{i:03d}.npz`` (``index`` in the
slice, ``target``, ``original_score``, ``order [1024]``, ``values [1024]``, ``seconds``)
through a temporary file and a rename, so a killed run leaves no partial file.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from overinterp_jax import sis  # noqa: E402
from overinterp_jax.data import cifar10_slice  # noqa: E402
from overinterp_jax.data.normalize import Normalization  # noqa: E402
from overinterp_jax.models import shipped  # noqa: E402

MODEL = "resnet20_cifar10"
TAU = 0.99


def confident_sample(num_images: int, seed: int, tau: float = TAU):
  """``(indices [n], images [n, 32, 32, 3] normalised, targets [n], scores [n])``: a seeded
  draw of ``num_images`` slice test images whose predicted class has probability ≥ ``tau``,
  in the order drawn (the first ``m`` of a larger draw are the draw of ``m``)."""
  module, variables = shipped.pretrained(MODEL)
  test = cifar10_slice.load()["test"]
  norm = Normalization(**shipped.info(MODEL)["normalization"])
  images = norm.normalize(test.images)
  predict = jax.jit(lambda x: jax.nn.softmax(module.apply(variables, x, train=False)))
  probs = np.concatenate([np.asarray(predict(images[i:i + 250]))
                          for i in range(0, len(images), 250)])
  targets, scores = probs.argmax(-1), probs.max(-1)
  confident = np.flatnonzero(scores >= tau)
  if num_images > len(confident):
    raise ValueError(f"--images={num_images}: only {len(confident)} slice images reach {tau}.")
  idx = np.random.default_rng(seed).permutation(confident)[:num_images]
  return idx, images[idx], targets[idx], scores[idx]


def _save_atomic(path: str, **arrays) -> None:
  tmp = f"{path}.{os.getpid()}.tmp.npz"
  np.savez(tmp, **arrays)
  os.replace(tmp, path)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--images", type=int, default=6)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", required=True, help="folder of per-image .npz files")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  module, variables = shipped.pretrained(MODEL)
  apply = lambda v, x: module.apply(v, x, train=False)
  idx, images, targets, _ = confident_sample(args.images, args.seed)
  for i in range(args.images):
    path = os.path.join(args.out, f"image_{i:03d}.npz")
    if os.path.exists(path):
      continue
    t0 = time.perf_counter()
    res = sis.batched_backselect(apply, images[i:i + 1], params=variables,
                                 target_classes=targets[i:i + 1])
    seconds = time.perf_counter() - t0
    _save_atomic(path, index=idx[i], target=res.target_classes[0],
                 original_score=res.original_scores[0], order=res.order[0],
                 values=res.values[0], seconds=seconds)
    size = int(sis.sis_from_backselect(res, TAU).size[0])
    print(f"image {i} (slice #{idx[i]}): {seconds:.0f} s, SIS {size} px", flush=True)


if __name__ == "__main__":
  main()
