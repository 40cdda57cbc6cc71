"""The pipeline's stages in order: the one list that the runner, the report and the config
checks read.

A stage is a unit (``Stage``): its ``name`` (what ``config.stages`` lists), the config
``section`` it owns (``config.<section>``; None when it owns none), ``run(ctx) ->
summary`` (a JSON-able dict, stored in the stage's marker ``stages/<name>.json``) and
``report(ctx, summaries) -> lines``, its section of ``report.md`` drawn from ``summaries``
(``{stage: summary}`` of the stages that ran; its own may be missing), and optionally
``figures(ctx, summaries) -> {name: path}``, the figures it draws for the report (none
when a stage has no ``figures``; the report lists them in ``figure_order``).

The built-in stages are named here with the module that defines each one's ``STAGE``;
a module is imported only when its stage is needed, so reading the names (the config
checks do) loads no stage. Adding a stage: a module with ``STAGE = Unit(...)`` and one
line in ``_BUILTIN``; or, without a module of the package, ``register(stage)`` (tests).
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib
from typing import Any, Callable, Iterator, Optional, Protocol


class Stage(Protocol):
  """One stage of the pipeline."""
  name: str
  section: Optional[str]

  def run(self, ctx) -> dict:
    """Does the stage's work with the context ``ctx`` (``context.Context``); returns its
    summary."""

  def report(self, ctx, summaries: dict) -> list[str]:
    """The stage's lines of ``report.md`` (none: ``[]``)."""

  # Optional: ``figures(ctx, summaries) -> {name: path}``, the figures the stage writes for
  # the report from ``summaries`` and its stored results (those whose inputs exist; ``{}``
  # when none), each path under ``ctx.workdir``. A stage without it draws none.


def _no_report(ctx, summaries: dict) -> list[str]:
  del ctx, summaries
  return []


def _no_figures(ctx, summaries: dict) -> dict[str, str]:
  del ctx, summaries
  return {}


@dataclasses.dataclass(frozen=True)
class Unit:
  """A ``Stage`` made of functions: it runs, and reports and draws nothing unless given
  ``report`` and ``figures``."""
  name: str
  section: Optional[str]
  run: Callable[[Any], dict]
  report: Callable[[Any, dict], list[str]] = _no_report
  figures: Callable[[Any, dict], dict[str, str]] = _no_figures


# (stage, module of overinterp_jax.pipeline defining its STAGE), in pipeline order.
_BUILTIN = (("train", "train_stage"), ("backselect", "backselect_stage"),
            ("subsets", "subsets_stage"), ("retrain", "retrain_stage"), ("sis", "sis_stage"),
            ("controls", "controls"), ("report", "report"))
_MODULES = dict(_BUILTIN)
_ORDER = [name for name, _ in _BUILTIN]
_ADDED: dict[str, Stage] = {}
# Stages whose figures the report lists first (the paper's SIS figures); the others'
# follow in pipeline order.
_FIGURES_FIRST = ("sis",)


def names() -> tuple[str, ...]:
  """Every stage, in the order the runner runs them."""
  return tuple(_ORDER)


def earlier(name: str) -> tuple[str, ...]:
  """The stages before ``name``."""
  return tuple(_ORDER[:_ORDER.index(name)])


def figure_order() -> tuple[str, ...]:
  """Every stage, in the order the report lists their figures."""
  first = tuple(name for name in _FIGURES_FIRST if name in _ORDER)
  return first + tuple(name for name in _ORDER if name not in first)


def figures(stage: Stage, ctx, summaries: dict) -> dict[str, str]:
  """``stage``'s figures (``Stage``; none when it has no ``figures``)."""
  return getattr(stage, "figures", _no_figures)(ctx, summaries)


def get(name: str) -> Stage:
  """Stage ``name`` (its module imported on first use)."""
  if name in _ADDED:
    return _ADDED[name]
  if name not in _MODULES:
    raise KeyError(f"No stage {name!r}; stages: {list(_ORDER)}.")
  stage = importlib.import_module(f"overinterp_jax.pipeline.{_MODULES[name]}").STAGE
  assert stage.name == name, (stage.name, name)
  return stage


def register(stage: Stage, *, before: str = "report") -> Stage:
  """Adds ``stage`` to the pipeline, just before stage ``before``."""
  if stage.name in _ORDER:
    raise ValueError(f"A stage {stage.name!r} is already registered.")
  _ORDER.insert(_ORDER.index(before), stage.name)
  _ADDED[stage.name] = stage
  return stage


def unregister(name: str) -> None:
  """Removes a stage added by ``register``."""
  if name not in _ADDED:
    raise ValueError(f"Stage {name!r} was not added by register().")
  del _ADDED[name]
  _ORDER.remove(name)


@contextlib.contextmanager
def registered(stage: Stage, *, before: str = "report") -> Iterator[Stage]:
  """``stage`` registered while the block runs."""
  register(stage, before=before)
  try:
    yield stage
  finally:
    unregister(stage.name)
