"""Input pipeline throughput and memory: real ImageNet JPEGs at 299×299, and CIFAR batches.

  python benchmarks/input_pipeline.py --archive=../shared/data/imagenet_samples.tar.gz \
      [--out=benchmarks/results/input_pipeline_cpu.json]

1. ImageNet (the 1,000 real JPEGs of the archive, one per class, any size and mode):
   images per second decoded and brought to the 299×299 analysis view (shorter side
   342, centre crop; Inception v3's evaluation view) by
     * a plain single-process PIL loop over the same files (the reference),
     * ``data.loader.Feed.batches`` with 0 worker processes (threads of this process)
       and with 1 and 2 grain worker processes, batches of 32;
   contenders alternate, best of ``--repeats`` passes each.
2. Peak RSS of one pass over 1,000 and over 10,000 images (the folder listed ten
   times) with 2 workers, each pass in a fresh process (``ru_maxrss`` of the process
   and of its largest worker): streaming must not grow with the number of images.
3. CIFAR-10-shaped data (50,000 × 32×32×3 uint8 in memory, batches of 16, the CPU
   config's training batch): batches per second of the in-memory fast path (one
   gather per batch) against the same arrays read example by example through grain —
   whether the fast path earns its place.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from overinterp_jax.data import image_folder, loader, sources, transforms  # noqa: E402

VIEW = transforms.ViewSpec(299, 342)
BATCH = 32


def imagenet_source(archive: str, cache: str, repeat: int = 1) -> sources.FileSource:
  src = sources.folder_source(archive, "val", cache, progress=False)
  return sources.FileSource(src.root, src.paths * repeat, list(src.labels) * repeat,
                            src.class_names)


def plain_loop(paths) -> int:
  """The reference: decode, convert to RGB, resize + centre crop, one file at a time."""
  for path in paths:
    with Image.open(path) as img:
      transforms.view(image_folder.to_rgb(img), VIEW)
  return len(paths)


def feed_pass(src, workers: int) -> int:
  feed = loader.Feed(src, lambda x: x, view=VIEW, workers=workers)
  plan = [np.arange(i, min(i + BATCH, len(src))) for i in range(0, len(src), BATCH)]
  return sum(len(x) for x, _ in feed.batches(plan))


def rss_pass(archive: str, cache: str, repeat: int, workers: int) -> dict:
  """One pass in a fresh process; its peak RSS and its largest worker's (MiB)."""
  code = (f"import sys, resource; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
          f"import input_pipeline as b; "
          f"n = b.feed_pass(b.imagenet_source({archive!r}, {cache!r}, {repeat}), {workers}); "
          f"print(n, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
          f"resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
  t0 = time.perf_counter()
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  n, self_kb, child_kb = map(int, out.stdout.split()[-3:])
  return {"images": n, "seconds": round(time.perf_counter() - t0, 1),
          "peak_rss_mib": round(self_kb / 1024, 1),
          "peak_worker_rss_mib": round(child_kb / 1024, 1)}


class _ExampleByExample:
  """An in-memory source without its batch gather: the per-example grain path."""

  def __init__(self, src: sources.ArraySource):
    self.src, self.labels, self.class_names = src, src.labels, src.class_names
    self.image_shape = src.image_shape

  def __len__(self):
    return len(self.src)

  def __getitem__(self, i):
    return self.src[i]


def cifar_rates(steps: int, repeats: int) -> dict:
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (50000, 32, 32, 3), dtype=np.uint8)
  src = sources.ArraySource(images, rng.integers(0, 10, 50000), [str(i) for i in range(10)])
  prepare = lambda x: x.astype(np.float32) / 255
  plan = loader.train_plan(0, 0, len(src), 16)[:steps]
  feeds = {"in_memory_gather": loader.Feed(src, prepare),
           "grain_per_example_0_workers": loader.Feed(_ExampleByExample(src), prepare),
           "grain_per_example_2_workers": loader.Feed(_ExampleByExample(src), prepare,
                                                      workers=2)}
  best = {k: float("inf") for k in feeds}
  for _ in range(repeats):
    for name, feed in feeds.items():
      t0 = time.perf_counter()
      for _ in feed.batches(plan):
        pass
      best[name] = min(best[name], time.perf_counter() - t0)
  return {name: {"batches_per_second": round(steps / t, 1)} for name, t in best.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--archive", default=os.path.join(
      os.path.dirname(__file__), "..", "..", "shared", "data", "imagenet_samples.tar.gz"))
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--cifar_steps", type=int, default=1000)
  parser.add_argument("--out", default="")
  args = parser.parse_args()
  cache = tempfile.mkdtemp(prefix="input_pipeline_")
  src = imagenet_source(args.archive, cache)
  contenders = {"plain_pil_loop": lambda: plain_loop(src.paths),
                "feed_0_workers": lambda: feed_pass(src, 0),
                "feed_1_worker": lambda: feed_pass(src, 1),
                "feed_2_workers": lambda: feed_pass(src, 2)}
  best = {k: float("inf") for k in contenders}
  for _ in range(args.repeats):
    for name, run in contenders.items():
      t0 = time.perf_counter()
      n = run()
      best[name] = min(best[name], time.perf_counter() - t0)
      assert n == len(src), (name, n)
  rates = {k: round(len(src) / t, 1) for k, t in best.items()}
  result = {
      "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
      "load_average_at_start": os.getloadavg(),
      "imagenet_299": {"images": len(src), "view": "shorter side 342, centre crop 299",
                       "images_per_second": rates,
                       "vs_plain_loop": {k: round(v / rates["plain_pil_loop"], 2)
                                         for k, v in rates.items()}},
      "peak_rss_one_pass_2_workers": {
          "1000_images": rss_pass(args.archive, cache, 1, 2),
          "10000_images": rss_pass(args.archive, cache, 10, 2)},
      "cifar_batches_of_16": cifar_rates(args.cifar_steps, args.repeats),
  }
  print(json.dumps(result, indent=1))
  if args.out:
    with open(args.out, "w") as fh:
      json.dump(result, fh, indent=1)


if __name__ == "__main__":
  main()
