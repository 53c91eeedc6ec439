"""Orbax checkpoints of the training state: one per epoch, the last few kept, restored exactly."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores a pytree of arrays under ``directory/<epoch>``.

  Saves are synchronous (the state is tiny next to an epoch of training), so a checkpoint that is listed is
  complete: orbax writes into a temporary directory and renames it only when the write has finished.
  """

  def __init__(self, directory: str, keep: int = 3):
    self._mngr = ocp.CheckpointManager(
        os.path.abspath(directory),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False))

  def latest_epoch(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, epoch: int, state: Any) -> None:
    self._mngr.save(epoch, args=ocp.args.StandardSave(state))
    self._mngr.wait_until_finished()

  def restore(self, epoch: int, like: Any) -> Any:
    """Restores epoch ``epoch`` into arrays with the shapes, dtypes and shardings of ``like``."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    return self._mngr.restore(epoch, args=ocp.args.StandardRestore(abstract))

  def close(self) -> None:
    self._mngr.close()
