"""Per-call overhead of the reference-compatible SIS API, as ratios measured in one run.

Prints, as one table:
  * ``sis_collection`` on a 10×10 linear score (3 SISes) and on a small CNN
    (``models/small.CNN3``, random weights) over one 16×16×3 image: ours on
    the first call (compiles) and on a repeat call, against a
    reference-structured implementation (the reference library's Python loop
    per step: numpy masks, ``f`` called on each step's batch) in the same run;
  * one image's ``sis.backselect`` with the same CNN (256 features):
    masked evaluations per second against plain batched inference of the same
    model at the batch backselect uses, measured in the same run.

Usage: python benchmarks/sis_api.py [--repeats 5] [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from overinterp_jax import sis
from overinterp_jax.models import create_model


def reference_backselect(f, x, mask, fm, pad_to=None):
  """The reference library's backward selection: a Python loop, one batch per step.

  ``pad_to`` pads each step's batch to a fixed size, so a jitted ``f`` compiles
  once (the paper's code calls its model on fixed batches).
  """
  mask = mask.copy()
  stack = []
  while mask.any():
    idxs = np.argwhere(mask)
    masks = np.repeat(mask[None], len(idxs), 0)
    masks[(np.arange(len(idxs)),) + tuple(idxs.T)] = False
    batch = np.where(masks, x[None], fm[None])
    if pad_to:
      batch = np.concatenate([batch, np.repeat(batch[:1], pad_to - len(batch), 0)])
    values = np.asarray(f(batch))[:len(idxs)]
    best = int(np.argmax(values))
    mask[tuple(idxs[best])] = False
    stack.append((idxs[best], values[best]))
  return stack


def reference_sis_collection(f, tau, x, fm, mask, pad_to=None):
  """The reference library's ``sis_collection`` structure (FindSIS from the stack)."""
  mask = mask.copy()
  collection = []
  while mask.any() and float(np.asarray(f(np.where(mask, x, fm)[None]))[0]) >= tau:
    stack = reference_backselect(f, x, mask, fm, pad_to)
    sis_idx = []
    for idx, value in reversed(stack):
      if value >= tau:
        break
      sis_idx.append(idx)
    if not sis_idx:
      break
    collection.append(sis_idx)
    for idx in sis_idx:
      mask[tuple(idx)] = False
    x = np.where(mask, x, fm)
  return collection


def interleaved_seconds(fns, repeats: int) -> list[float]:
  """Best wall time of each function over ``repeats`` rounds that call each once in
  turn, so that load from elsewhere hits every contender alike."""
  best = [float("inf")] * len(fns)
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      fn()
      best[i] = min(best[i], time.perf_counter() - start)
  return best


def linear_case():
  rng = np.random.default_rng(0)
  w = rng.uniform(0.5, 1.5, size=(10, 10)).astype(np.float32)
  x = np.ones((10, 10), np.float32)
  f = lambda b: (b * w).reshape(b.shape[0], -1).sum(-1)
  return f, float(w.sum()) / 3.5, x, np.zeros_like(x)


def cnn_case():
  model = create_model("cnn3", num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  image = np.asarray(jax.random.normal(jax.random.key(1), (16, 16, 3)), np.float32)
  target = int(jnp.argmax(model.apply(variables, image[None])[0]))
  f = lambda b: jax.nn.softmax(model.apply(variables, b))[:, target]
  tau = 0.98 * float(f(image[None])[0])
  return f, tau, image, np.zeros_like(image), (model, variables)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  rows = {}

  f, tau, x, fm = linear_case()
  start = time.perf_counter()
  ours = sis.sis_collection(f, tau, x, fm)
  first = time.perf_counter() - start
  lin_mask = np.ones(x.shape, bool)
  ref = reference_sis_collection(f, tau, x, fm, lin_mask)
  assert [len(r) for r in ours] == [len(r) for r in ref], (len(ours), len(ref))
  ours_s, ref_s = interleaved_seconds(
      [lambda: sis.sis_collection(f, tau, x, fm),
       lambda: reference_sis_collection(f, tau, x, fm, lin_mask)], args.repeats)
  rows["linear_10x10"] = dict(sises=len(ours), ours_first_s=first, ours_repeat_s=ours_s,
                              reference_s=ref_s)

  f, tau, x, fm, (model, variables) = cnn_case()
  mask = np.ones((16, 16, 1), bool)
  start = time.perf_counter()
  ours = sis.sis_collection(f, tau, x, fm, initial_mask=mask)
  first = time.perf_counter() - start
  f_ref = jax.jit(f)
  ref = reference_sis_collection(f_ref, tau, x, fm, mask, pad_to=256)
  assert [len(r) for r in ours] == [len(r) for r in ref], (len(ours), len(ref))
  ours_s, ref_s = interleaved_seconds(
      [lambda: sis.sis_collection(f, tau, x, fm, initial_mask=mask),
       lambda: reference_sis_collection(f_ref, tau, x, fm, mask, 256)], 2)
  rows["cnn3_16x16"] = dict(sises=len(ours), ours_first_s=first, ours_repeat_s=ours_s,
                            reference_s=ref_s)

  # One image's backselect vs plain inference of the same model, same run.
  d = 256
  evals = d * (d + 1) // 2
  batch = min(d, sis.MAX_EVAL_BATCH)
  plain = jax.jit(lambda b: jax.nn.softmax(model.apply(variables, b)))
  images = jnp.broadcast_to(jnp.asarray(x), (batch, 16, 16, 3)) + 0.0
  plain(images).block_until_ready()
  sis.backselect(f, x, mask, fm)
  calls = 64
  backselect_s, plain_s = interleaved_seconds(
      [lambda: sis.backselect(f, x, mask, fm),
       lambda: [plain(images).block_until_ready() for _ in range(calls)]], args.repeats)
  plain_s /= calls
  rows["backselect_cnn3_16x16"] = dict(
      evals_per_s=evals / backselect_s, seconds_per_image=backselect_s,
      plain_inference_img_per_s=batch / plain_s, plain_batch=batch,
      ratio=(evals / backselect_s) / (batch / plain_s))

  print(f"{'case':<24}{'SISes':>6}{'ours 1st s':>12}{'ours again s':>14}{'reference s':>13}"
        f"{'ref/ours':>10}")
  for name in ("linear_10x10", "cnn3_16x16"):
    r = rows[name]
    print(f"{name:<24}{r['sises']:>6}{r['ours_first_s']:>12.3f}{r['ours_repeat_s']:>14.4f}"
          f"{r['reference_s']:>13.4f}{r['reference_s'] / r['ours_repeat_s']:>10.2f}")
  r = rows["backselect_cnn3_16x16"]
  print(f"backselect, 1 image, CNN3 16x16 (256 features): {r['evals_per_s']:,.0f} masked evals/s, "
        f"{r['seconds_per_image']:.3f} s; plain inference {r['plain_inference_img_per_s']:,.0f} "
        f"img/s at batch {r['plain_batch']}; ratio {r['ratio']:.2f}")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(dict(rows=rows, devices=str(jax.devices()), date=time.strftime("%Y-%m-%d")),
                fh, indent=1)


if __name__ == "__main__":
  main()
