"""Restoring a trained run for analysis without compiling anything.

Same result as :func:`arreg_jax.experiment.load_run` — ``(config, module, variables, dataset)`` of a run directory —
but the checkpoint's target structure comes from ``jax.eval_shape`` (shapes only) instead of a real model
initialization: ``load_run`` calls ``models.create``, which jits and compiles ``module.init`` afresh on every call
(≈ 2.6 s for the small MNIST CNN on a 2-core CPU, longer than analysing the model). Datasets are cached per data
config, so the members of a sweep share one copy.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from arreg_jax import checkpoint, configuration, experiment, models, train
from arreg_jax.data import get_dataset
from arreg_jax.errors import ConfigError

_DATASETS: dict[str, Any] = {}


def _has_key(config: ml_collections.ConfigDict, dotted: str) -> bool:
  node = config
  for part in dotted.split('.'):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      return False
    node = node[part]
  return True


def run_config(run_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The run's ``config.json`` as a ConfigDict on top of today's defaults, and the raw dict (with ``strength``)."""
  raw = experiment.read_json(os.path.join(run_dir, 'config.json'))
  cfg_dict = dict(raw)
  strength = cfg_dict.pop('strength', None)
  config = configuration.base_config()
  flat = experiment._flatten(cfg_dict)  # pylint: disable=protected-access
  unknown = [k for k in flat if not _has_key(config, k)]
  if unknown:  # written by another version of the package: analyse with what is still meaningful
    logging.warning('%s: ignoring config keys unknown to this version: %s', run_dir, ', '.join(unknown))
  config.update_from_flattened_dict({k: v for k, v in flat.items() if k not in unknown})
  if strength is not None:
    config.sweep = (strength,)
  return config, raw


def dataset_for(config: ml_collections.ConfigDict):
  """``get_dataset(config.data)``, loaded once per distinct data config."""
  key = json.dumps(json.loads(config.data.to_json_best_effort()), sort_keys=True)
  if key not in _DATASETS:
    _DATASETS.clear()  # keep one dataset in memory at a time
    _DATASETS[key] = get_dataset(config.data)
  return _DATASETS[key]


def restore_run(run_dir: str, *, epoch: int | None = None):
  """Returns ``(config, module, variables, dataset, epoch)`` of the run's checkpoint ``epoch`` (default: latest)."""
  config, _ = run_config(run_dir)
  ds = dataset_for(config)
  dtype = experiment.compute_dtype(config) if hasattr(experiment, 'compute_dtype') else None
  module = models.get_module(config.model.name, num_classes=ds.num_classes, dtype=dtype)
  x = jax.ShapeDtypeStruct((1, *ds.image_shape), jnp.float32)
  abstract_vars = jax.eval_shape(lambda z: dict(module.init(jax.random.key(0), z, train=False)), x)
  tx = train.make_optimizer(config.train, max(ds.num_train // config.train.batch_size, 1))
  abstract_state = jax.eval_shape(lambda v: train.init_state(v, tx), abstract_vars)
  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, 'checkpoints'), keep=config.checkpoint.keep)
  try:
    epoch = epoch or ckpt.latest_epoch()
    if not epoch:
      raise ConfigError(f'{run_dir} has no checkpoint to analyse; train it first')
    state = ckpt.restore(epoch, abstract_state)
  finally:
    ckpt.close()
  return config, module, state.variables(), ds, int(epoch)
