"""Human-readable class names: ImageNet WordNet ids (``n01440764``) -> ``tench``.

``imagenet_classes.tsv`` (beside this module) lists the 1,000 ILSVRC-2012 WordNet ids
in sorted order (= label order of TFDS ``imagenet2012`` and of an ILSVRC folder) with
their WordNet lemmas, taken from the synset lists that timm ships
(``timm/data/_info/imagenet_synsets.txt`` and ``imagenet_synset_to_lemma.txt``).
"""
from __future__ import annotations

import functools
import os
from typing import Sequence

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.tsv")


@functools.lru_cache(maxsize=1)
def imagenet_lemmas() -> dict[str, str]:
  """``{wnid: "tench, Tinca tinca"}`` for the 1,000 ILSVRC-2012 classes."""
  with open(TABLE, encoding="utf-8") as f:
    return dict(line.rstrip("\n").split("\t", 1) for line in f if line.strip())


def display_name(name: str) -> str:
  """The first lemma of an ImageNet WordNet id (``n01440764`` -> ``tench``); any other
  class name unchanged."""
  lemma = imagenet_lemmas().get(name)
  return name if lemma is None else lemma.split(",")[0]


def display_names(names: Sequence[str]) -> tuple[str, ...]:
  return tuple(display_name(n) for n in names)
