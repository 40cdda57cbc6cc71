"""Stage dependencies are the config values a stage read: recorded, never listed by hand."""
import json
import types

import pytest

from config_perturb import perturbed_config
from configs import smoke
from overinterp_jax import config_reads
from overinterp_jax import data as data_lib
from overinterp_jax.config_schema import base_config
from overinterp_jax.pipeline import registry, runner
from overinterp_jax.pipeline.context import Context


def test_reads_are_recorded_by_path_and_runtime_never():
  config = config_reads.RecordingConfig(base_config())
  with config_reads.recording() as reads:
    assert config.sis.threshold == 0.99 and config.train["seed"] == 0
    assert "frac_kept" in config.subsets
    assert dict(config.controls.items())["dilation"] == 3
    assert config.report.to_dict() == {"num_figure_images": 8}
    assert config.runtime.progress and config.runtime.host_devices == 0
    copy = config.copy_and_resolve_references()
    with copy.unlocked():
      copy.train.num_epochs = 3
    assert copy.train.num_epochs == 3 and config.train.num_epochs == 200
  assert reads.paths == {"sis.threshold", "train.seed", "subsets.frac_kept", "controls", "report",
                         "train.num_epochs"}
  with config_reads.recording() as outer, config_reads.recording() as inner:
    config.backselect.method  # pylint: disable=pointless-statement
  assert outer.paths == inner.paths == {"backselect.method"}
  with pytest.raises(AttributeError, match="config.sis.nope does not exist"):
    config.sis.nope  # pylint: disable=pointless-statement
  with pytest.raises(AttributeError):
    config.train.get("seed", 0)  # no defaults outside the schema


def test_runtime_keys_never_change_a_fingerprint():
  config = base_config()
  changed = base_config()
  changed.runtime.progress, changed.runtime.host_devices = False, 4
  changed.runtime.distributed = True
  for paths in ([""], ["runtime"], ["runtime.progress", "train.seed"],
                ["sis", "runtime.host_devices"]):
    assert (config_reads.values_fingerprint(config, paths)
            == config_reads.values_fingerprint(changed, paths)), paths
  assert (config_reads.values_fingerprint(config, [""])
          != config_reads.values_fingerprint(perturbed_config(config, "train.seed"), [""]))


def test_a_missing_key_is_a_value_of_its_own():
  config = base_config()
  assert config_reads.value_at(config, "sis.threshold") == 0.99
  assert config_reads.value_at(config, "sis.nope") == "<missing>"
  assert (config_reads.values_fingerprint(config, ["sis.nope"])
          != config_reads.values_fingerprint(config, ["sis.threshold"]))


def test_a_key_newer_than_a_result_counts_only_away_from_its_default():
  config = base_config()
  known = [p for p in config_reads.leaf_paths(config) if p != "controls.dilation"]
  assert "runtime.progress" not in config_reads.leaf_paths(config)
  assert config_reads.changed_new_keys(config, known) == []
  config.controls.dilation = 5
  assert config_reads.changed_new_keys(config, known) == ["controls.dilation"]
  key = config_reads.Key("base", config, config_reads.Reads())
  fp, stored = key.stamp()
  assert key.expected(stored) == fp
  assert key.expected(dict(stored, known=known)) != fp


def _markers(workdir):
  return {stage: json.loads((workdir / "stages" / f"{stage}.json").read_text())
          for stage in registry.names()}


def _ctx(config, workdir, data_fp):
  return types.SimpleNamespace(config=config, workdir=str(workdir), data_fp=data_fp,
                               stage_summary_path=lambda s: str(workdir / "stages" / f"{s}.json"))


def test_changing_any_value_a_stage_read_makes_it_run_again(finished):
  """For every stage of a finished smoke run and every config path it read, a config
  that differs at that path alone fails the stage's done-check; the unchanged config,
  or one changed only where the stage never read, passes it."""
  config = smoke.get_config()
  data_fp = Context(config, str(finished), data_lib.load_for_config(
      config.data, str(finished))).data_fp
  markers = _markers(finished)
  reads = {stage: m["config_reads"] for stage, m in markers.items()}
  # What the old hand-kept fingerprints missed (controls) or every stage must see.
  assert "subsets.frac_kept" in reads["controls"] and "subsets.frac_kept" in reads["report"]
  assert ({"train.lr", "train.num_epochs", "train.augment.padding", "train.seed"}
          <= set(reads["train"]))
  assert "backselect.remove_per_step" in reads["backselect"]
  for stage, marker in markers.items():
    upstream = {s: markers[s]["fingerprint"] for s in registry.earlier(stage)}
    assert marker["upstream"] == upstream, stage
    assert runner._finished(_ctx(config, finished, data_fp), stage, upstream) is not None, stage
    assert not [p for p in reads[stage] if p.startswith("runtime")], stage
    for path in reads[stage]:
      changed = perturbed_config(config, path)
      assert runner._finished(_ctx(changed, finished, data_fp), stage, upstream) is None, \
          (stage, path)
    unread = sorted(set(perturbed_paths(config)) - set(reads[stage]))[0]
    assert runner._finished(_ctx(perturbed_config(config, unread), finished, data_fp), stage,
                            upstream) is not None, (stage, unread)
    other_upstream = dict(upstream, **{s: "other" for s in list(upstream)[-1:]})
    assert not upstream or runner._finished(_ctx(config, finished, data_fp), stage,
                                            other_upstream) is None, stage
    changed_runtime = smoke.get_config()
    changed_runtime.runtime.progress, changed_runtime.runtime.host_devices = True, 2
    assert runner._finished(_ctx(changed_runtime, finished, data_fp), stage,
                            upstream) is not None, stage


def perturbed_paths(config):
  """Every leaf path of ``config`` but the runtime ones."""
  return [p for p in _leaves(config) if not p.startswith("runtime")]


def _leaves(node, prefix=""):
  for key in node.keys():
    path = f"{prefix}.{key}" if prefix else key
    if hasattr(node[key], "keys"):
      yield from _leaves(node[key], path)
    else:
      yield path
