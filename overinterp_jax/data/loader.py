"""Batches of model inputs from any source: the input pipeline of training and evaluation.

A ``Feed`` is one split as model inputs: a random-access source
(``data.sources``), its analysis view, the normalisation, optionally a pixel
mask per image (pixel-subsets, applied on the fly) and the host-side training
crop. ``feed.batches(plan, epoch)`` yields ``(x [b, H, W, C] float32, y [b]
int32)`` for each entry of ``plan``, a list of example-index arrays: this
process's rows of each global batch (``train_plan``, ``eval_plan``), which
callers turn into global arrays with ``sharding.global_batch``
(``jax.make_array_from_process_local_data`` across processes).

What a batch holds is a function of the plan, the epoch and the seed only —
never of the worker that built it or of where a run was resumed — so a run
resumed at ``(epoch, batch)`` sees exactly the batches it would have seen.

Two paths, same batches:
  * in-memory arrays without host crops (CIFAR): one gather per batch in this
    process (``ArraySource.gather``), the fastest path for small images;
  * everything else (image files, TFDS ArrayRecord, host crops): a grain
    pipeline over the plan (``grain.MapDataset``), each batch decoded and
    cropped by ``workers`` worker processes (0 = threads of this process),
    prefetched ahead of the training step.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
from absl import logging

from overinterp_jax import sharding
from overinterp_jax.data import image_folder, steps, transforms
from overinterp_jax.data.sources import ArraySource


def epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
  """The example order of one training epoch: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(n)


def train_plan(seed: int, epoch: int, n: int, batch_size: int) -> list[np.ndarray]:
  """This process's example indices of each full global batch of ``batch_size`` in
  ``epoch`` (shuffled; the last partial batch is dropped)."""
  order = epoch_permutation(seed, epoch, n)
  mine = sharding.process_slice(batch_size)
  return [order[i * batch_size:(i + 1) * batch_size][mine] for i in range(n // batch_size)]


def eval_plan(n: int, batch_size: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Every example once in order, in global batches of ``batch_size`` (the last one padded
  by repeating its first example): this process's ``(indices, valid)`` of each batch."""
  mine = sharding.process_slice(batch_size)
  plans, valid = [], []
  for start in range(0, n, batch_size):
    idx = np.arange(start, min(start + batch_size, n))
    ok = np.ones(batch_size, bool)
    ok[len(idx):] = False
    idx = np.concatenate([idx, np.full(batch_size - len(idx), start)])
    plans.append(idx[mine])
    valid.append(ok[mine])
  return plans, valid


class PackedMasks:
  """Pixel masks ``[N, H, W]`` bool stored bit-packed (``[N, H, ceil(W/8)]`` uint8), in
  memory or memory-mapped from a ``.npy`` file (read on demand, never loaded whole).
  ``masks[indices] -> [b, H, W]`` bool. Pickles as its path (grain workers reopen it)."""

  def __init__(self, packed, width: int):
    self.digest = None  # sha256 of the packed file, when its owner knows it
    self.width = int(width)
    self.path = packed if isinstance(packed, str) else None
    self._packed = None if self.path else np.asarray(packed, np.uint8)

  @classmethod
  def from_masks(cls, masks: np.ndarray) -> "PackedMasks":
    return cls(np.packbits(np.asarray(masks, bool), axis=-1), masks.shape[-1])

  @property
  def packed(self) -> np.ndarray:
    if self._packed is None:
      self._packed = np.load(self.path, mmap_mode="r")
    return self._packed

  def __getstate__(self):
    return {**self.__dict__, "_packed": None} if self.path else self.__dict__

  def __len__(self) -> int:
    return len(self.packed)

  def __getitem__(self, indices) -> np.ndarray:
    return np.unpackbits(np.asarray(self.packed[indices]), axis=-1, count=self.width
                         ).astype(bool)


class ConstantMask:
  """The same pixel mask ``[H, W]`` bool for each of ``count`` examples (e.g. a border
  frame): the interface of ``PackedMasks`` without a per-example copy."""

  def __init__(self, mask: np.ndarray, count: int):
    self.mask = np.asarray(mask, bool)
    if self.mask.ndim != 2:
      raise ValueError(f"ConstantMask takes one [H, W] mask, got shape {self.mask.shape}.")
    self.count = int(count)
    self.width = self.mask.shape[1]
    self.digest = hashlib.sha256(np.packbits(self.mask).tobytes()
                                 + str(self.mask.shape).encode()).hexdigest()

  def __len__(self) -> int:
    return self.count

  def __getitem__(self, indices) -> np.ndarray:
    if np.ndim(indices) == 0:
      return self.mask
    return np.broadcast_to(self.mask, (len(np.asarray(indices)),) + self.mask.shape)


@dataclasses.dataclass(eq=False)
class Feed:
  """One split as model inputs.

  Attributes:
    source: random-access labelled images (``data.sources``).
    prepare: ``[b, H, W, C]`` uint8 -> normalised float32 (0 = the mean colour).
    view: the analysis view of each image (``transforms.ViewSpec``; size 0 = as stored).
    train_crop: host-side Inception-style random crop + flip of the view to
      ``view.size`` (ImageNet training); CIFAR crops on the device instead.
    masks: optional ``[N, H, W]`` bool per example (``PackedMasks``): masked
      pixels show ``fill`` (default 0 = the mean colour).
    mask_only: kept pixels become 1.0 in every channel (positions only).
    fill: optional ``indices -> [b, H, W, C]`` float32 masked values (this process only).
    workers: grain worker processes decoding batches (0 = threads of this process).
    seed: of the host-side random crops (with the epoch and the example index).
  """
  source: object
  prepare: Callable[[np.ndarray], np.ndarray]
  view: transforms.ViewSpec = transforms.ViewSpec()
  train_crop: bool = False
  masks: Optional[PackedMasks] = None
  mask_only: bool = False
  fill: Optional[Callable[[np.ndarray], np.ndarray]] = None
  workers: int = 0
  seed: int = 0

  def __len__(self) -> int:
    return len(self.source)

  @property
  def labels(self) -> np.ndarray:
    return self.source.labels

  @property
  def image_shape(self) -> tuple[int, int, int]:
    shape = self.view.shape(getattr(self.source, "image_shape", None))
    if shape is None:
      raise ValueError("The images vary in size: set config.data.view_size.")
    return tuple(shape)

  def with_masks(self, masks: Optional[PackedMasks], mask_only: bool = False,
                 fill=None) -> "Feed":
    return dataclasses.replace(self, masks=masks, mask_only=mask_only, fill=fill)

  @property
  def in_memory(self) -> bool:
    return (getattr(self.source, "in_memory", False) and not self.train_crop
            and not self.view.size)

  def subset(self, indices) -> "Feed":
    """This feed restricted to examples ``indices`` (renumbered ``0 .. len - 1``)."""
    return dataclasses.replace(self, source=Subset(self.source, indices), masks=None, fill=None)

  def images(self, indices) -> np.ndarray:
    """The analysis views ``[b, H, W, C]`` uint8 of examples ``indices`` (no masks,
    crops or normalisation): what figures show."""
    indices = np.asarray(indices, np.int64)
    if getattr(self.source, "in_memory", False) and not self.view.size:
      return self.source.gather(indices)[0]
    plain = dataclasses.replace(self, train_crop=False, masks=None)
    return plain._decode(indices, 0)[0] if len(indices) else np.zeros(
        (0,) + self.image_shape, np.uint8)

  def batch(self, indices: np.ndarray, epoch: int = 0,
            mirror: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """``(x [b, H, W, C] float32, y [b] int32)`` of examples ``indices`` in ``epoch``;
    ``mirror [N]`` bool: examples to mirror left-right (the alternating flip)."""
    indices = np.asarray(indices)
    if self.in_memory:
      images, labels = self.source.gather(indices)
      masks = None if self.masks is None else self.masks[indices]
    else:
      images, masks, labels = self._decode(indices, epoch)
    flips = None if mirror is None else np.asarray(mirror[indices], bool)
    if flips is not None:  # on the uint8 images (and masks): 4x less memory than floats
      images = steps.mirror(flips, images)
      masks = None if masks is None else steps.mirror(flips, masks)
    x = self.prepare(images)
    if masks is not None and self.mask_only:
      x = steps.positions(masks, x.shape)
    elif masks is not None:
      fill = np.float32(0) if self.fill is None else self.fill(indices)
      if flips is not None and self.fill is not None:
        fill = steps.mirror(flips, fill)
      x = steps.mask(x, masks, fill)
    return x, np.asarray(labels, np.int32)

  def _decode(self, indices: np.ndarray, epoch: int):
    images, masks, labels = [], [], []
    for i in indices:
      image, label = self.source[int(i)]
      image = transforms.view(image, self.view)
      mask = None if self.masks is None else self.masks[int(i)]
      if mask is not None and mask.shape != image.shape[:2]:
        raise ValueError(f"Mask {mask.shape} of example {int(i)} does not match its view "
                         f"{image.shape[:2]}.")
      if self.train_crop:
        rng = np.random.default_rng([self.seed, epoch, int(i)])
        image, mask = transforms.random_resized_crop(rng, image, self.view.size or
                                                     image.shape[0], mask)
      images.append(image)
      masks.append(mask)
      labels.append(label)
    shapes = {im.shape for im in images}
    if len(shapes) > 1:
      raise ValueError(f"Images of one batch differ in size {sorted(shapes)}: set "
                       "config.data.view_size for data whose images vary in size.")
    return (np.stack(images), None if self.masks is None else np.stack(masks),
            np.asarray(labels))

  def batches(self, plan: Sequence[np.ndarray], epoch: int = 0,
              mirror: Optional[np.ndarray] = None, prefetch: int = 2
              ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``feed.batch(indices, epoch, mirror)`` for each ``indices`` of ``plan``, in order."""
    if self.in_memory or not len(plan):
      return (self.batch(idx, epoch, mirror) for idx in plan)
    return _grain_batches(self, plan, epoch, mirror, prefetch)


class Subset:
  """Examples ``indices`` of ``source`` as a source of their own."""

  def __init__(self, source, indices):
    self.base, self.indices = source, np.asarray(indices, np.int64)
    self.class_names = source.class_names
    self.image_shape = getattr(source, "image_shape", None)
    self.labels = np.asarray(source.labels)[self.indices]
    self.in_memory = getattr(source, "in_memory", False)

  def __len__(self) -> int:
    return len(self.indices)

  def __getitem__(self, i: int):
    return self.base[int(self.indices[i])]

  def gather(self, indices):
    return self.base.gather(self.indices[np.asarray(indices, np.int64)])

  def example_id(self, i: int) -> str:
    return self.base.example_id(int(self.indices[i]))


# config.runtime.bad_files: what streamed data does about unreadable image files (``screened``).
BAD_FILES = ("check", "skip", "off")
MAX_LISTED = 1000  # bad files named in one error


def _listing(bad: Sequence[tuple[str, str]]) -> str:
  listed = [f"{path}: {why}" for path, why in bad[:MAX_LISTED]]
  more = len(bad) - len(listed)
  return "\n  " + "\n  ".join(listed) + (f"\n  ... and {more} more." if more else "")


def screened(source, split: str, policy: str, max_bad: int = 0, progress: bool = True):
  """One split of streamed data (``source``) as ``config.runtime.bad_files = policy`` asks,
  before any work:

    * ``"check"``: every image file is checked (``image_folder.find_bad_files``: sizes and
      headers, read by a pool of threads, no decoding for a sound file); any bad file
      stops the run with one ValueError naming every one;
    * ``"skip"``: the same check; the bad files are left out, each named in a warning,
      and an image that still fails to decode in a batch is replaced
      (``SkipUndecodable``); more than ``max_bad`` (``config.runtime.max_bad_files``) in all
      stop the run naming them;
    * ``"off"``: no check; a bad file stops the run when a batch decodes it.

  Sources without files (TFDS records, written by TFDS's builder) are not checked ahead.
  What is left out depends on the files only, so every run on them sees the same examples.
  """
  if policy not in BAD_FILES:
    raise ValueError(f"config.runtime.bad_files must be one of {list(BAD_FILES)}, got {policy!r}.")
  paths = getattr(source, "paths", None)
  if policy == "off":
    return source
  bad = [] if paths is None else image_folder.find_bad_files(
      paths, progress, desc=f"checking the {split} images")
  if policy == "check":
    if bad:
      raise ValueError(
          f"{len(bad)} of the {len(paths)} images of the {split} split cannot be read:"
          f"{_listing(bad)}\nFix or remove them, or set config.runtime.bad_files='skip' to leave "
          f"them out (at most config.runtime.max_bad_files={max_bad}).")
    return source
  if len(bad) > max_bad:
    raise ValueError(
        f"{len(bad)} of the {len(paths)} images of the {split} split cannot be read, more "
        f"than config.runtime.max_bad_files={max_bad} allows:{_listing(bad)}")
  for path, why in bad:
    logging.warning("Leaving out %s of the %s split (config.runtime.bad_files='skip'): %s.",
                    path, split, why)
  if bad:
    dropped = {path for path, _ in bad}
    source = Subset(source, [i for i, p in enumerate(paths) if p not in dropped])
  return SkipUndecodable(source, max_bad - len(bad), split)


class SkipUndecodable:
  """``source`` whose images that fail to decode are replaced by a uniform grey one (128,
  the mean colour after normalisation, near enough) with their own label, each named in a
  warning (``config.runtime.bad_files = "skip"``). More than ``allowed`` such files stop the
  run, naming them; each process (grain worker) counts those it decodes."""
  in_memory = False

  def __init__(self, source, allowed: int, split: str):
    self.base, self.allowed, self.split = source, int(allowed), split
    self.class_names = source.class_names
    self.image_shape = getattr(source, "image_shape", None)
    self.failed: dict[str, str] = {}  # example id -> error, this process's

  @property
  def labels(self) -> np.ndarray:
    return self.base.labels

  def __len__(self) -> int:
    return len(self.base)

  def example_id(self, i: int) -> str:
    return self.base.example_id(i)

  def __getitem__(self, i: int) -> tuple[np.ndarray, int]:
    try:
      return self.base[i]
    except (ValueError, OSError) as e:
      where = self.example_id(i)
      if where not in self.failed:
        self.failed[where] = str(e)
        logging.warning("Replacing image %s of the %s split by a grey one "
                        "(config.runtime.bad_files='skip'): %s", where, self.split, e)
      if len(self.failed) > self.allowed:
        raise ValueError(
            f"{len(self.failed)} images of the {self.split} split failed to decode, more "
            f"than the {self.allowed} config.runtime.max_bad_files leaves after the check:"
            f"{_listing(sorted(self.failed.items()))}") from e
      return (np.full(self.image_shape or (8, 8, 3), 128, np.uint8),
              int(np.asarray(self.labels)[i]))


class _BuildBatch:
  """A picklable ``plan index -> batch`` for grain workers."""

  def __init__(self, feed: Feed, plan, epoch: int, mirror):
    self.feed, self.plan, self.epoch, self.mirror = feed, list(plan), epoch, mirror

  def __call__(self, b: int):
    return self.feed.batch(self.plan[b], self.epoch, self.mirror)


def _grain_batches(feed: Feed, plan, epoch: int, mirror, prefetch: int):
  import grain  # pylint: disable=import-outside-toplevel
  if feed.fill is not None and feed.workers:
    feed = dataclasses.replace(feed, workers=0)  # fill functions stay in this process
  build = _BuildBatch(dataclasses.replace(feed, workers=0), plan, epoch, mirror)
  ds = grain.MapDataset.range(len(plan)).map(build)
  if feed.workers <= 0:  # threads of this process (PIL decodes without the GIL)
    threads = max(1, min(4, os.cpu_count() or 1))
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads,
                                                     prefetch_buffer_size=max(1, prefetch))))
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():  # grain's workers read absl flags (library use, tests)
    flags.FLAGS.mark_as_parsed()
  # One thread per worker process: the processes are the parallelism.
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
  it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(feed.workers),
                                                   per_worker_buffer_size=max(1, prefetch)))
  return _closing(iter(it))


def _closing(it) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The batches of grain iterator ``it`` (over worker processes), each with its shared
  memory unlinked on arrival, and ``it`` closed (its workers stopped) when done.

  Grain's workers hand batches over in shared memory that the receiving array unlinks only
  when it is garbage collected, and then on a background thread; the last batch stays
  referenced from the StopIteration's traceback. Batches alive at exit were never
  unlinked: ``resource_tracker: There appear to be N leaked shared_memory objects``.
  Unlinking at once removes the name only; the memory stays mapped while the arrays live.
  """
  try:
    for batch in it:
      for leaf in batch:
        _unlink_now(leaf)
      yield batch
  finally:
    it.close()


def _unlink_now(array) -> None:
  """Unlinks the shared memory behind a grain ``SharedMemoryArray`` this process owns."""
  if getattr(array, "_unlink_on_del", False):  # grain's flag: unlink when deleted
    array.shm.unlink()
    array._unlink_on_del = False  # pylint: disable=protected-access  # not twice


def array_feed(images: np.ndarray, labels: np.ndarray, prepare: Callable = lambda x: x,
               class_names: Sequence[str] = (), split: str = "data") -> Feed:
  """A ``Feed`` over in-memory arrays (``prepare`` maps a batch of ``images`` to inputs)."""
  names = tuple(class_names) or tuple(str(i) for i in range(int(np.max(labels, initial=0)) + 1))
  return Feed(ArraySource(images, labels, names, split), prepare)
