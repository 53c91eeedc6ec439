"""Checkpoints of a run, saved and restored: orbax checkpoints of the training state (one per epoch, the last few
kept, restored exactly — or, when the newest is damaged, from the newest intact one), and a trained run back from
its directory (:func:`restore_run`, the one restore path of the analysis, the tests and users' scripts).

A damaged checkpoint (files cut short by a disk fault or a copy that died, a file deleted) is never deleted: it is
moved aside to ``<run>/checkpoints_damaged/<epoch>[.k]`` with a warning naming it, and the next older one is tried.

:func:`restore_run` builds the checkpoint's target structure with ``jax.eval_shape`` (shapes only), not with a real
model initialization: ``models.create`` compiles ``module.init`` (≈ 2.6 s for the small MNIST CNN on a 2-core CPU,
longer than analyzing the model). Datasets are cached per data config, so the members of a sweep share one copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import threading
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp

from arreg_jax import config_json, configuration, models, rundir
from arreg_jax.data import get_dataset
from arreg_jax.errors import ConfigError, DataError, OutputError
from arreg_jax.training.state import Optimizer, init_state

DAMAGED = 'checkpoints_damaged'


@contextlib.contextmanager
def writer_errors_logged():
  """While active, errors raised in orbax's and tensorstore's writer threads and callbacks (after a failed write:
  "Event loop is closed", …) are logged as one line each instead of printed as tracebacks; the failure itself
  reaches the caller as the save's exception. The interpreter's hooks are restored on leaving, however it is left.
  """
  def hook(*args):
    exc = args[0].exc_value if len(args) == 1 else args[1]
    logging.warning('checkpoint writer: %s: %s', type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else '')
  saved = sys.excepthook, sys.unraisablehook, threading.excepthook
  sys.excepthook = sys.unraisablehook = threading.excepthook = hook
  try:
    yield
  finally:
    sys.excepthook, sys.unraisablehook, threading.excepthook = saved


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


class Checkpointer:
  """Saves and restores a pytree of arrays under ``directory/<epoch>``.

  Saves are synchronous (the state is tiny next to an epoch of training), so a checkpoint that is listed is
  complete: orbax writes into a temporary directory and renames it only when the write has finished.
  """

  def __init__(self, directory: str, keep: int = 3):
    self.directory = os.path.abspath(directory)
    self._keep = keep
    self._mngr = self._manager()

  def _manager(self) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self._keep, create=True, enable_async_checkpointing=False))

  def latest_epoch(self) -> int | None:
    return self._mngr.latest_step()

  def epochs(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def save(self, epoch: int, state: Any) -> None:
    try:
      with writer_errors_logged():
        self._mngr.save(epoch, args=ocp.args.StandardSave(state))
        self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # tensorstore reports I/O errors as ValueError
      raise OutputError(f'could not write the checkpoint of epoch {epoch} in {self.directory}: {_first_line(e)}. '
                        'The earlier checkpoints are intact; free disk space and run the same command again: '
                        'training resumes from the last intact checkpoint') from e

  def restore(self, epoch: int, like: Any) -> Any:
    """Restores epoch ``epoch`` into arrays with the shapes, dtypes and shardings of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._mngr.restore(epoch, args=ocp.args.StandardRestore(abstract))

  def restore_latest_intact(self, like: Any) -> tuple[int, Any]:
    """``(epoch, state)`` of the newest checkpoint that restores; damaged newer ones are moved aside (warning).

    Raises DataError naming the directory when checkpoints exist but none is intact.
    """
    tried = []
    for epoch in reversed(self.epochs()):
      try:
        return epoch, self.restore(epoch, like)
      except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types for bad files
        tried.append(epoch)
        moved = self._move_aside(epoch)
        logging.warning('checkpoint %d in %s is damaged (%s: %s); moved it to %s and trying the one before',
                        epoch, self.directory, type(e).__name__, str(e)[:200], moved)
        print(f'warning: the checkpoint of epoch {epoch} in {self.directory} is damaged; moved it to {moved}',
              flush=True)
    if tried:
      raise DataError(f'no intact checkpoint in {self.directory} (epochs {", ".join(map(str, tried))} are damaged '
                      f'and were moved to {os.path.join(os.path.dirname(self.directory), DAMAGED)}); delete the run '
                      'directory to train it from the start')
    return 0, like

  def _move_aside(self, epoch: int) -> str:
    target_dir = os.path.join(os.path.dirname(self.directory), DAMAGED)
    os.makedirs(target_dir, exist_ok=True)
    target, k = os.path.join(target_dir, str(epoch)), 1
    while os.path.exists(target):
      target, k = os.path.join(target_dir, f'{epoch}.{k}'), k + 1
    shutil.move(os.path.join(self.directory, str(epoch)), target)
    self._mngr.close()
    self._mngr = self._manager()  # forget the moved step
    return target

  def close(self) -> None:
    self._mngr.close()


def run_config(run_dir: str) -> tuple[ml_collections.ConfigDict, dict]:
  """The run's ``config.json`` as a ConfigDict on today's defaults (``config_json.from_saved``), and the raw
  dict (with ``strength``)."""
  raw = rundir.read_json(os.path.join(run_dir, rundir.CONFIG))
  config, unknown = config_json.from_saved(raw, configuration.base_config())
  if unknown:  # written by another version of the package: analyze with what is still meaningful
    logging.warning('%s: ignoring config keys unknown to this version: %s', run_dir, ', '.join(unknown))
  return config, raw


_DATASETS: dict[str, Any] = {}


def dataset_for(config: ml_collections.ConfigDict):
  """``get_dataset(config.data)``, loaded once per distinct data config (the last one is kept)."""
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
  optimizer = Optimizer.from_config(config.train, max(ds.num_train // config.train.batch_size, 1))
  abstract_state = jax.eval_shape(lambda v: init_state(v, optimizer), abstract_vars)
  ckpt = Checkpointer(os.path.join(run_dir, rundir.CHECKPOINTS), keep=config.checkpoint.keep)
  try:
    epoch = epoch or ckpt.latest_epoch()
    if not epoch:
      raise ConfigError(f'{run_dir} has no checkpoint to analyze; train it first')
    try:
      state = ckpt.restore(epoch, abstract_state)
    except Exception as e:  # pylint: disable=broad-except  # orbax/tensorstore raise many types for bad files
      raise DataError(f'the checkpoint of epoch {epoch} in {ckpt.directory} cannot be read ({type(e).__name__}); '
                      f'it is damaged: delete {os.path.join(run_dir, rundir.FINAL)} and run the training command '
                      'again (it falls back to the newest intact checkpoint and retrains from there)') from e
  finally:
    ckpt.close()
  return config, module, state.variables(), ds, int(epoch)
