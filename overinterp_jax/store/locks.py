"""One run at a time per work directory, and a clear stop where it cannot be written."""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Iterator

from absl import logging

from overinterp_jax.store import atomic


class WorkdirInUse(RuntimeError):
  """Another run holds the work directory (``workdir_lock``)."""


_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def workdir_lock(workdir: str) -> Iterator[bool]:
  """Holds ``workdir/.lock`` (an exclusive ``flock``) on the writing process while a run
  uses ``workdir``: a second run started on the same directory stops at once with the
  first one's pid instead of writing beside it. The operating system releases the lock
  when the holder exits, however it ends (``kill -9`` included), so a killed run never
  blocks its own resumption. Where the file system has no locks, a warning and no lock.

  Yields whether the run may write ``workdir``: False for an existing directory that
  cannot be written (read-only storage), where no lock is taken: a finished run's
  results can be read, and ``require_writable`` stops work that must write."""
  if not atomic.is_writer():
    yield True
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, ".lock")
  try:
    f = open(path, "a+")
  except OSError as e:
    if e.errno not in _NOT_WRITABLE:
      raise
    logging.warning("%s is not writable (%s): reading its results without a lock; a stage "
                    "that must run stops.", workdir, e.strerror)
    f = None
  if f is None:
    yield False
    return
  with f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EAGAIN, errno.EACCES):
        f.seek(0)
        raise WorkdirInUse(f"{workdir} is in use by another run (pid "
                           f"{f.read().strip() or 'unknown'}, holding {path}); wait for it "
                           "to end or stop it.") from None
      logging.warning("No lock on %s (%s): make sure no other run uses this directory.",
                      workdir, e)
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
      yield True
    finally:
      f.seek(0)
      f.truncate()


def require_writable(workdir: str, why: str) -> None:
  """PermissionError naming ``workdir`` when the writing process cannot write there
  (read-only storage), before work whose results it would have to write (``why``)."""
  if atomic.is_writer() and os.path.isdir(workdir) and not os.access(workdir, os.W_OK):
    raise PermissionError(f"{workdir} is not writable, but {why}: give a writable "
                          "--workdir (a copy of this one keeps its results).")
