"""Cost of the reference-compatible SIS API: first calls, repeat calls, backselect throughput.

Four parts (``--parts``), each printed as a table:
  * ``first``: the first call in a fresh Python process, one process per measurement:
    with an empty persistent compilation cache (cold), with the cache the cold process
    filled (warm), and with the cache off; the reference-structured loop's first call
    in the same fresh process beside it. Medians of ``--first_runs`` runs.
  * ``repeat``: ``sis_collection`` on a 10×10 linear score (3 SISes) and on a small CNN
    (``models/small.CNN3``, random weights) over one 16×16×3 image: ours on a repeat
    call against a reference-structured implementation (the reference library's
    Python loop per step: numpy masks, ``f`` called on each step's batch), same run.
  * ``backselect``: one image's exact ``sis.backselect`` (256 features, 32,896 masked
    evaluations) with two small CNNs, against plain batched inference of the same model
    in the same process, and where the time goes: the model alone at top level on
    backselect's own calls (padding and batch sizes), the program's bookkeeping alone
    (a trivial score), and backselect with its steps in one compiled loop (the code
    before issue 28; still the path on accelerators) and driven from the host
    (``exact.stepped_backselect``, the path on a multi-core CPU).
  * ``threads``: on which threads XLA ran the model (its ``ynn_fusion`` thunks, from a
    ``jax.profiler`` trace) for plain inference and both backselect paths: the share of
    that time per thread, largest first.
Contenders alternate round after round; medians, so load from other processes hits all.

Usage: python benchmarks/sis_api.py [--parts first,repeat,backselect,threads] [--repeats 5]
                                    [--first_runs 3] [--out results.json]
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from overinterp_jax import compile_cache, sis
from overinterp_jax.models import create_model
from overinterp_jax.selection import exact


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
  """Median wall time of each function over ``repeats`` rounds that call each once in
  turn (after one warm-up call each), so that load from elsewhere hits all alike."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      fn()
      times[i].append(time.perf_counter() - start)
  return [statistics.median(t) for t in times]


def linear_case(features: int = 100):
  """A linear score on ``features`` inputs (a 10×10 image for 100), 3 SISes."""
  rng = np.random.default_rng(0)
  shape = (10, features // 10) if features > 10 and features % 10 == 0 else (features,)
  w = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
  x = np.ones(shape, np.float32)
  f = lambda b: (b * w).reshape(b.shape[0], -1).sum(-1)
  return f, float(w.sum()) / 3.5, x, np.zeros_like(x)


class SmallCNN(nn.Module):
  """Issue 28's model: Conv 32 → max-pool → Conv 64 → max-pool → Dense 10 (ReLUs)."""

  @nn.compact
  def __call__(self, x):
    x = nn.max_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), (2, 2))
    x = nn.max_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), (2, 2))
    return nn.Dense(10)(x.reshape(x.shape[0], -1))


def cnn_case(name: str = "cnn3"):
  """``(f, tau, image, fully_masked, (apply, variables))`` for one 16×16×3 image."""
  model = SmallCNN() if name == "small_cnn" else create_model(name, num_classes=10)
  variables = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  apply = jax.jit(model.apply)
  image = np.asarray(jax.random.normal(jax.random.key(1), (16, 16, 3)), np.float32)
  target = int(jnp.argmax(apply(variables, image[None])[0]))
  f = lambda b: jax.nn.softmax(model.apply(variables, b))[:, target]
  tau = 0.98 * float(f(image[None])[0])
  return f, tau, image, np.zeros_like(image), (model.apply, variables)


# --------------------------------------------------------------------------- first calls

FIRST_CASES = ("linear_10", "linear_10x10", "cnn3_16x16")


def first_call_child(case: str) -> dict:
  """In a fresh process: the first and second call of ours, then the reference-structured
  loop's first call (numpy ``f`` for the linear scores, a jitted one for the CNN)."""
  if case.startswith("linear"):
    f, tau, x, fm = linear_case(10 if case == "linear_10" else 100)
    mask, ref_f, pad = np.ones(x.shape, bool), f, None
  else:
    f, tau, x, fm, _ = cnn_case("cnn3")
    mask, ref_f, pad = np.ones((16, 16, 1), bool), jax.jit(f), 256
  out = {"cache_dir": compile_cache.use_persistent_cache()}
  start = time.perf_counter()
  ours = sis.sis_collection(f, tau, x, fm, initial_mask=mask)
  out["first_s"] = time.perf_counter() - start
  start = time.perf_counter()
  sis.sis_collection(f, tau, x, fm, initial_mask=mask)
  out["second_s"] = time.perf_counter() - start
  start = time.perf_counter()
  ref = reference_sis_collection(ref_f, tau, x, fm, mask, pad)
  out["reference_first_s"] = time.perf_counter() - start
  out["same_sises"] = [len(r) for r in ours] == [len(r) for r in ref]
  return out


def run_child(case: str, cache: str) -> dict:
  env = dict(os.environ, **{compile_cache.ENV: cache})
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", case], env=env,
                        capture_output=True, text=True, check=True)
  return json.loads(proc.stdout.strip().splitlines()[-1])


def first_calls(runs: int, cases=FIRST_CASES) -> dict:
  """Per case: medians over ``runs`` of cold (empty cache), warm (the cache the cold run
  filled) and cache-off first calls, each in a fresh process."""
  rows = {}
  for case in cases:
    got = collections.defaultdict(list)
    for _ in range(runs):
      with tempfile.TemporaryDirectory() as directory:
        for mode, cache in (("cold", directory), ("warm", directory), ("off", "0")):
          r = run_child(case, cache)
          assert r["same_sises"], (case, mode, r)
          got[mode].append(r["first_s"])
          got["reference"].append(r["reference_first_s"])
          got["second"].append(r["second_s"])
    rows[case] = {k: statistics.median(v) for k, v in got.items()}
  return rows


# --------------------------------------------------------------------------- repeat calls

def repeat_calls(repeats: int) -> dict:
  rows = {}
  f, tau, x, fm = linear_case()
  lin_mask = np.ones(x.shape, bool)
  ours = sis.sis_collection(f, tau, x, fm)
  ref = reference_sis_collection(f, tau, x, fm, lin_mask)
  assert [len(r) for r in ours] == [len(r) for r in ref], (len(ours), len(ref))
  ours_s, ref_s = interleaved_seconds(
      [lambda: sis.sis_collection(f, tau, x, fm),
       lambda: reference_sis_collection(f, tau, x, fm, lin_mask)], repeats)
  rows["linear_10x10"] = dict(sises=len(ours), ours_repeat_s=ours_s, reference_s=ref_s)

  f, tau, x, fm, _ = cnn_case("cnn3")
  mask = np.ones((16, 16, 1), bool)
  ours = sis.sis_collection(f, tau, x, fm, initial_mask=mask)
  f_ref = jax.jit(f)
  ref = reference_sis_collection(f_ref, tau, x, fm, mask, pad_to=256)
  assert [len(r) for r in ours] == [len(r) for r in ref], (len(ours), len(ref))
  ours_s, ref_s = interleaved_seconds(
      [lambda: sis.sis_collection(f, tau, x, fm, initial_mask=mask),
       lambda: reference_sis_collection(f_ref, tau, x, fm, mask, 256)], max(2, repeats // 3))
  rows["cnn3_16x16"] = dict(sises=len(ours), ours_repeat_s=ours_s, reference_s=ref_s)
  return rows


# ------------------------------------------------------------------ backselect throughput

def with_steps_on_host(on_host: bool, fn):
  """``fn`` run with ``sis.engines.steps_on_host`` fixed to ``on_host``."""
  def run():
    chosen = sis.engines.steps_on_host
    sis.engines.steps_on_host = lambda: on_host
    try:
      return fn()
    finally:
      sis.engines.steps_on_host = chosen
  return run


def backselect_breakdown(name: str, repeats: int) -> dict:
  """One image's backselect (256 features) against plain inference, and its parts."""
  f, _, x, fm, (apply, variables) = cnn_case(name)
  mask = np.ones((16, 16, 1), bool)
  d = 256
  evals = d * (d + 1) // 2
  eval_batch = min(d, sis.MAX_EVAL_BATCH)
  sizes = exact.chunk_sizes(eval_batch)
  calls = [c for t in range(d, 0, -1) for c in exact.call_schedule(t, sizes)]
  per_size = collections.Counter(calls)
  plain = jax.jit(lambda b: jax.nn.softmax(apply(variables, b)))
  batches = {b: jnp.broadcast_to(jnp.asarray(x), (b, 16, 16, 3)) + 0.0 for b in sizes}
  plain_calls = 64

  def plain_inference():
    for _ in range(plain_calls):
      plain(batches[eval_batch]).block_until_ready()

  def model_on_schedule():  # the same model calls at top level, dispatched back to back
    for b, k in per_size.items():
      for _ in range(k):
        out = plain(batches[b])
    out.block_until_ready()

  # Bookkeeping alone: both programs with a score that only reads the masked batch.
  trivial = lambda params, b, rows, targets: b.reshape(b.shape[0], -1).sum(-1)
  shape = dict(eval_batch=eval_batch, mask_shape=(16, 16, 1), use_feature_map=False,
               shared_fully_masked=True, sizes=sizes)
  book_args = (None, jnp.asarray(x)[None], jnp.asarray(fm)[None], jnp.ones((1, d), bool),
               jnp.zeros((1,), jnp.int32), None)
  loop_book = jax.jit(exact.exact_backselect_program(trivial, num_steps=d, **shape))
  host_book = exact.stepped_backselect(trivial, **shape)
  in_loop = with_steps_on_host(False, lambda: sis.backselect(f, x, mask, fm))
  on_host = with_steps_on_host(True, lambda: sis.backselect(f, x, mask, fm))
  a, b = in_loop(), on_host()
  assert all(np.array_equal(u, v) for u, v in zip(a, b)), "host-driven steps changed a result"
  seconds = interleaved_seconds(
      [plain_inference, model_on_schedule, lambda: jax.block_until_ready(loop_book(*book_args)),
       lambda: jax.block_until_ready(host_book(*book_args)), in_loop, on_host], repeats)
  plain_rate = eval_batch * plain_calls / seconds[0]
  row = dict(model=name, features=d, evals=evals, eval_batch=eval_batch,
             evaluated_rows=sum(calls), model_calls=len(calls),
             plain_img_per_s=plain_rate, model_on_schedule_s=seconds[1],
             loop_bookkeeping_s=seconds[2], host_bookkeeping_s=seconds[3],
             compiled_loop_s=seconds[4], host_steps_s=seconds[5])
  for key in ("model_on_schedule", "compiled_loop", "host_steps"):
    row[key + "_ratio"] = evals / row[key + "_s"] / plain_rate
  return row


def model_thread_shares(fn) -> list[float]:
  """Shares of the model's compiled time (XLA's ``ynn_fusion`` thunks) per thread while
  ``fn`` runs, largest first (after one untraced call)."""
  from jax.profiler import ProfileData
  fn()
  with tempfile.TemporaryDirectory() as directory:
    with jax.profiler.trace(directory):
      fn()
    paths = [os.path.join(root, name) for root, _, names in os.walk(directory)
             for name in names if name.endswith(".xplane.pb")]
    trace = ProfileData.from_file(paths[-1])
  per_thread = collections.Counter()
  for plane in trace.planes:
    for line in plane.lines:
      for event in line.events:
        if event.name.startswith("ynn_fusion"):
          per_thread[line.name] += event.duration_ns
  total = sum(per_thread.values())
  return [ns / total for _, ns in per_thread.most_common()]


def thread_shares(name: str) -> dict:
  f, _, x, fm, (apply, variables) = cnn_case(name)
  mask = np.ones((16, 16, 1), bool)
  plain = jax.jit(f)
  batch = jnp.broadcast_to(jnp.asarray(x), (256, 16, 16, 3)) + 0.0
  return {"plain inference": model_thread_shares(
              lambda: [plain(batch).block_until_ready() for _ in range(32)]),
          "compiled loop": model_thread_shares(
              with_steps_on_host(False, lambda: sis.backselect(f, x, mask, fm))),
          "host-driven steps": model_thread_shares(
              with_steps_on_host(True, lambda: sis.backselect(f, x, mask, fm)))}


def load_average() -> str:
  return " ".join(f"{v:.1f}" for v in os.getloadavg())


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--parts", default="first,repeat,backselect,threads")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--first_runs", type=int, default=3)
  parser.add_argument("--cases", default=",".join(FIRST_CASES), help="of the first calls")
  parser.add_argument("--models", default="small_cnn,cnn3")
  parser.add_argument("--out", default=None)
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    print(json.dumps(first_call_child(args.child)))
    return None
  parts = args.parts.split(",")
  result = dict(devices=str(jax.devices()), cores=os.cpu_count(), date=time.strftime("%F %T"),
                load_before=load_average())
  if "first" in parts:
    rows = result["first"] = first_calls(args.first_runs, args.cases.split(","))
    print(f"{'first call, fresh process':<26}{'cold s':>9}{'warm s':>9}{'off s':>9}"
          f"{'2nd call s':>12}{'reference 1st s':>17}")
    for case, r in rows.items():
      print(f"{case:<26}{r['cold']:>9.3f}{r['warm']:>9.3f}{r['off']:>9.3f}{r['second']:>12.4f}"
            f"{r['reference']:>17.4f}")
  if "repeat" in parts:
    rows = result["repeat"] = repeat_calls(args.repeats)
    print(f"{'repeat call':<26}{'SISes':>6}{'ours s':>10}{'reference s':>13}{'ref/ours':>10}")
    for case, r in rows.items():
      print(f"{case:<26}{r['sises']:>6}{r['ours_repeat_s']:>10.4f}{r['reference_s']:>13.4f}"
            f"{r['reference_s'] / r['ours_repeat_s']:>10.2f}")
  if "backselect" in parts:
    rows = result["backselect"] = [backselect_breakdown(m, args.repeats)
                                   for m in args.models.split(",")]
    for r in rows:
      print(f"backselect, 1 image, {r['model']} 16x16 ({r['features']} features, "
            f"{r['evals']:,} evaluations; plain inference {r['plain_img_per_s']:,.0f} img/s at "
            f"batch {r['eval_batch']}):")
      print(f"  model alone at top level on backselect's {r['model_calls']} calls "
            f"({r['evaluated_rows']:,} rows): {r['model_on_schedule_s']:.3f} s, ratio "
            f"{r['model_on_schedule_ratio']:.2f}")
      print(f"  bookkeeping alone (trivial score): compiled loop {r['loop_bookkeeping_s']:.3f} s, "
            f"host-driven steps {r['host_bookkeeping_s']:.3f} s")
      print(f"  backselect, steps in one compiled loop (before): {r['compiled_loop_s']:.3f} s, "
            f"ratio {r['compiled_loop_ratio']:.2f}")
      print(f"  backselect, steps driven from the host (after): {r['host_steps_s']:.3f} s, "
            f"ratio {r['host_steps_ratio']:.2f}")
  if "threads" in parts:
    shares = result["threads"] = thread_shares(args.models.split(",")[0])
    print(f"model time per thread ({args.models.split(',')[0]}), largest first:")
    for case, s in shares.items():
      print(f"  {case:<20}" + " / ".join(f"{v:.2f}" for v in s[:4]))
  result["load_after"] = load_average()
  print(f"load average before / after: {result['load_before']} / {result['load_after']}")
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(result, fh, indent=1)
  return result


if __name__ == "__main__":
  main()
