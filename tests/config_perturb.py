"""Configs that differ from a given one at exactly one path (shared by tests)."""
import ml_collections

from overinterp_jax import config_reads


def perturbed(value):
  """A value of the same kind that differs from ``value``."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 0.5 + 0.125
  if isinstance(value, str):
    return value + "_changed"
  if isinstance(value, (tuple, list)):
    return tuple(value)[:-1] if value else ("changed",)
  if isinstance(value, dict):
    return {**value, "__changed__": 1}
  raise TypeError(f"no perturbation for {value!r}")


def perturbed_config(config, path: str) -> ml_collections.ConfigDict:
  """A copy of ``config`` with the value at dotted ``path`` changed (a subtree: one of its
  leaves changed; ``""``: the whole config, one leaf changed)."""
  c = config_reads.plain(config).copy_and_resolve_references()
  parts = path.split(".") if path else []
  node = c
  for part in parts[:-1]:
    node = node[part]
  target = node[parts[-1]] if parts else c
  with c.unlocked():
    if isinstance(target, ml_collections.ConfigDict):
      leaf = next(k for k in sorted(target.keys())
                  if not isinstance(target[k], ml_collections.ConfigDict) and k != "runtime")
      target[leaf] = perturbed(target[leaf])
    else:
      node[parts[-1]] = perturbed(target)
  return c
