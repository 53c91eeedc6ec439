"""Orbax checkpoints of the training state: one per epoch, the last few kept, restored exactly — or, when the newest
is damaged, from the newest intact one.

A damaged checkpoint (files cut short by a disk fault or a copy that died, a file deleted) is never deleted: it is
moved aside to ``<run>/checkpoints_damaged/<epoch>[.k]`` with a warning naming it, and the next older one is tried.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import threading
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from arreg_jax.errors import DataError, OutputError

DAMAGED = 'checkpoints_damaged'


@contextlib.contextmanager
def _writer_errors_logged():
  """While a save runs, errors raised in orbax's and tensorstore's writer threads and callbacks (after a failed
  write: "Event loop is closed", …) are logged as one line each instead of printed as tracebacks; the failure
  itself reaches the caller as the save's exception (an OutputError, which ends the run)."""
  def hook(*args):
    exc = args[0].exc_value if len(args) == 1 else args[1]
    logging.warning('checkpoint writer: %s: %s', type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else '')
  saved = sys.excepthook, sys.unraisablehook, threading.excepthook
  sys.excepthook = sys.unraisablehook = threading.excepthook = hook
  yield  # after a failure the hooks stay: the writer threads' callbacks go on failing until the process ends
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
      with _writer_errors_logged():
        self._mngr.save(epoch, args=ocp.args.StandardSave(state))
        self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # tensorstore reports I/O errors as ValueError
      raise OutputError(f'could not write the checkpoint of epoch {epoch} in {self.directory}: {_first_line(e)}. The earlier '
                        'checkpoints are intact; free disk space and run the same command again: training resumes '
                        'from the last intact checkpoint') from e

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
