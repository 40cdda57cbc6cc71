"""A stage is one unit in one registry: a toy stage registered from this file runs, resumes,
is invalidated by the config keys it reads (and by its changed files), and has its section
and its figure in the report."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from overinterp_jax import config_schema
from overinterp_jax import data as data_lib
from overinterp_jax.pipeline import figures, registry, runner
from overinterp_jax.store import atomic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Toy:
  """A stage owning section ``config.toy``: the mean test label times ``toy.scale``, kept in
  ``toy/value.json``; its figure draws the test labels."""
  name, section = "toy", "toy"

  def __init__(self):
    self.runs = 0

  def run(self, ctx) -> dict:
    self.runs += 1
    value = float(ctx.config.toy.scale) * float(np.mean(ctx.labels("test")))
    atomic.save_json(ctx.path("toy", "value.json"), {"value": value})
    return {"value": value}

  def report(self, ctx, summaries: dict) -> list[str]:
    del ctx
    if "toy" not in summaries:
      return []
    return ["## Toy", "", f"Scaled mean label: {summaries['toy']['value']:.4f}.", ""]

  def figures(self, ctx, summaries: dict) -> dict:
    if "toy" not in summaries:
      return {}
    labels = ctx.labels("test").astype(np.float64)
    return {"toy_labels": figures.confidence_curves(
        ctx.path("figures", "toy.png"), {"labels": labels[None] / labels.max()})}


def _config():
  c = config_schema.base_config()
  c.stages = ("toy", "report")
  c.data.source = "synthetic"
  c.data.num_train, c.data.num_test, c.data.image_size = 8, 16, 8
  c.runtime.progress = False
  c.toy = ml_collections.ConfigDict({"scale": 2.0})
  return c


@pytest.fixture()
def toy():
  with registry.registered(Toy()) as stage:
    yield stage
  assert "toy" not in registry.names()


def test_a_registered_stage_runs_resumes_reruns_and_is_reported(toy, tmp_path):
  config = _config()
  dataset = data_lib.load_for_config(config.data, str(tmp_path))
  assert registry.names()[-2:] == ("toy", "report")
  first = runner.run_pipeline(config, str(tmp_path), dataset)
  assert toy.runs == 1 and first["toy"]["value"] == 2.0 * dataset.labels("test").mean()
  assert first["toy"]["config_reads"] == ["toy.scale"]
  report = (tmp_path / "report.md").read_text()
  assert "Stages run: toy." in report
  assert f"## Toy\n\nScaled mean label: {first['toy']['value']:.4f}." in report
  assert "- toy_labels: ![toy_labels](figures/toy.png)" in report
  assert (tmp_path / "figures" / "toy.png").read_bytes()[:4] == b"\x89PNG"
  stored = json.loads((tmp_path / "report.json").read_text())
  assert stored["stages"]["toy"] == {"value": first["toy"]["value"]}
  assert stored["figures"] == {"toy_labels": "figures/toy.png"}

  again = runner.run_pipeline(config, str(tmp_path), dataset)  # resumes: nothing to do
  assert toy.runs == 1 and again == first

  config.sis.threshold = 0.5  # read by the report only
  runner.run_pipeline(config, str(tmp_path), dataset)
  assert toy.runs == 1

  config.toy.scale = 3.0  # read by the toy stage: it runs again, and so does the report
  third = runner.run_pipeline(config, str(tmp_path), dataset)
  assert toy.runs == 2 and third["toy"]["value"] == 3.0 * dataset.labels("test").mean()
  assert third["report"]["fingerprint"] != first["report"]["fingerprint"]
  assert f"Scaled mean label: {third['toy']['value']:.4f}." in (tmp_path / "report.md").read_text()

  atomic.save_json(str(tmp_path / "toy" / "value.json"), {"value": -1.0})  # a changed output
  runner.run_pipeline(config, str(tmp_path), dataset)
  assert toy.runs == 3


def test_the_builtin_stages_are_the_schemas_default_and_own_its_sections():
  schema = config_schema.base_config()
  assert tuple(schema.stages) == registry.names()
  for name in registry.names():
    stage = registry.get(name)
    assert stage.name == name
    assert stage.section is None or isinstance(schema[stage.section], ml_collections.ConfigDict)
  with pytest.raises(ValueError, match="already registered"):
    registry.register(registry.Unit("sis", None, lambda ctx: {}))


def test_a_unit_draws_no_figures_unless_given_them():
  unit = registry.Unit("plain", None, lambda ctx: {})
  assert registry.figures(unit, None, {"plain": {}}) == {}
  assert registry.figure_order()[0] == "sis"  # the paper's figures first, as before
  assert sorted(registry.figure_order()) == sorted(registry.names())


def test_importing_the_config_checks_loads_no_stage():
  code = ("import sys, overinterp_jax.config_checks; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('matplotlib', 'orbax') "
          "or m.startswith('overinterp_jax.pipeline.') "
          "and m != 'overinterp_jax.pipeline.registry'))")
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=True)
  assert out.stdout.strip() == "[]"
