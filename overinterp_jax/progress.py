"""Progress bars: shown on a terminal, never written into a redirected log."""
from __future__ import annotations

from typing import Iterable, Optional

from tqdm import tqdm


def progress_bar(iterable: Optional[Iterable] = None, *, show: bool = True, **kwargs) -> tqdm:
  """``tqdm(iterable, **kwargs)``, drawn only when ``show`` (``config.runtime.progress``)
  and its output (``file``, default stderr) is a terminal: a log redirected to a file or
  a pipe gets no bars (tqdm's ``disable=None``)."""
  return tqdm(iterable, disable=None if show else True, **kwargs)
