"""A config as the JSON its run directory holds, and back (``config.json``; :mod:`arreg_jax.rundir`)."""

from __future__ import annotations

import json

import ml_collections


def to_dict(config: ml_collections.ConfigDict) -> dict:
  """A config as the plain dict its ``config.json`` holds."""
  return json.loads(config.to_json_best_effort())


def flatten(d: dict, prefix: str = '') -> dict:
  """``{'train.epochs': 8, …}`` of a nested dict (lists as tuples), for ``update_from_flattened_dict``."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
  return out


def has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def from_saved(saved: dict, defaults: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
  """A run's saved ``config.json`` applied to ``defaults`` (``configuration.base_config()``: today's defaults), and
  the saved keys this version does not know (written by another version of the package; ignored). A ``strength``
  key sets ``sweep = (strength,)``."""
  saved = dict(saved)
  strength = saved.pop('strength', None)
  config = defaults
  flat = flatten(saved)
  unknown = sorted(k for k in flat if not has_key(config, k))
  config.update_from_flattened_dict({k: v for k, v in flat.items() if k not in unknown})
  if strength is not None:
    config.sweep = (strength,)
  return config, unknown
