"""Restoring a trained run from its directory — the one restore path (analysis, tests, users' scripts).

``restore_run(run_dir)`` returns ``(config, module, variables, dataset, epoch)``. The checkpoint's target structure
comes from ``jax.eval_shape`` (shapes only), not from a real model initialization: ``models.create`` jits and
compiles ``module.init`` afresh on every call (≈ 2.6 s for the small MNIST CNN on a 2-core CPU, longer than
analysing the model). Datasets are cached per data config, so the members of a sweep share one copy.
"""

from __future__ import annotations

import json
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections

from arreg_jax import checkpoint, config_json, configuration, models, rundir, train
from arreg_jax.data import get_dataset
from arreg_jax.errors import ConfigError, DataError

_DATASETS: dict[str, Any] = {}


def run_config(run_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The run's ``config.json`` as a ConfigDict on today's defaults (``config_json.from_saved``), and the raw
  dict (with ``strength``)."""
  raw = rundir.read_json(os.path.join(run_dir, rundir.CONFIG))
  config, unknown = config_json.from_saved(raw, configuration.base_config())
  if unknown:  # written by another version of the package: analyse with what is still meaningful
    logging.warning('%s: ignoring config keys unknown to this version: %s', run_dir, ', '.join(unknown))
  return config, raw


def dataset_for(config: ml_collections.ConfigDict):
  """``get_dataset(config.data)``, loaded once per distinct data config."""
  key = json.dumps(json.loads(config.data.to_json_best_effort()), sort_keys=True)
  if key not in _DATASETS:
    _DATASETS.clear()  # keep one dataset in memory at a time
    _DATASETS[key] = get_dataset(config.data)
  return _DATASETS[key]


def restore_run(run_dir: str, *, epoch: int | None = None):
  """Returns ``(config, module, variables, dataset, epoch)`` of the run's checkpoint ``epoch`` (default: latest).

  ``config`` is the run's config (``sweep = (strength,)``), ``module`` the Flax module, ``variables`` the Flax
  variables (``params`` and, for BatchNorm and SN models, ``batch_stats``), ``dataset`` the
  :class:`arreg_jax.data.Dataset` the run was trained on.
  """
  config, _ = run_config(run_dir)
  ds = dataset_for(config)
  module = models.get_module(config.model.name, num_classes=ds.num_classes,
                             dtype=models.compute_dtype(config.precision))
  x = jax.ShapeDtypeStruct((1, *ds.image_shape), jnp.float32)
  abstract_vars = jax.eval_shape(lambda z: dict(module.init(jax.random.key(0), z, train=False)), x)
  tx = train.make_optimizer(config.train, max(ds.num_train // config.train.batch_size, 1))
  abstract_state = jax.eval_shape(lambda v: train.init_state(v, tx), abstract_vars)
  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, rundir.CHECKPOINTS), keep=config.checkpoint.keep)
  try:
    epoch = epoch or ckpt.latest_epoch()
    if not epoch:
      raise ConfigError(f'{run_dir} has no checkpoint to analyse; train it first')
    try:
      state = ckpt.restore(epoch, abstract_state)
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types for bad files
      raise DataError(f'the checkpoint of epoch {epoch} in {ckpt.directory} cannot be read ({type(e).__name__}); '
                      f'it is damaged: delete {os.path.join(run_dir, rundir.FINAL)} and run the training command '
                      'again (it falls back to the newest intact checkpoint and retrains from there)') from e
  finally:
    ckpt.close()
  return config, module, state.variables(), ds, int(epoch)
