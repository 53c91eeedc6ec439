"""One writer for everything a run reports while it trains: ``metrics.jsonl``, the stdout lines, TensorBoard.

* ``metrics.jsonl`` (:mod:`arreg_jax.rundir`): one JSON line per epoch, written atomically; on resume the lines of
  epochs after the restored checkpoint are dropped (they are recomputed).
* stdout: one line per epoch (losses, accuracies, img/s, the sweep member's ETA) and, in epochs that run longer than
  ``config.logging.progress_every_s``, in-epoch progress lines (steps done / total, img/s, the epoch's ETA).
* TensorBoard: every numeric metric of the epoch row as a scalar under ``<run>/tensorboard/``, through tensorboardX
  (no TensorFlow needed) when it is installed (``pip install -e '.[tensorboard]'``) and ``config.logging.tensorboard``
  is on.

Only process 0 writes or prints (``distributed.is_main_process``).
"""

from __future__ import annotations

import os
import time

from absl import logging
import numpy as np

from arreg_jax import distributed, rundir

try:  # optional: pip install -e '.[tensorboard]'
  import tensorboardX  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - depends on the environment
  tensorboardX = None


def format_duration(seconds: float) -> str:
  """``h:mm:ss`` or ``m:ss``."""
  seconds = int(round(max(seconds, 0.0)))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


def tensorboard_available() -> bool:
  return tensorboardX is not None


class MetricsWriter:
  """Writes the metrics of one run (one sweep member) in ``run_dir``.

  Args:
    run_dir: the run directory.
    epochs: the run's total number of epochs (for the ETA).
    tensorboard: write TensorBoard scalars (ignored, with one log line, when tensorboardX is missing).
    progress_every_s: the least time between two in-epoch progress lines (0: none).
  """

  def __init__(self, run_dir: str, *, epochs: int, tensorboard: bool = True, progress_every_s: float = 30.0):
    self.tag = os.path.basename(os.path.normpath(run_dir))
    self.path = os.path.join(run_dir, rundir.METRICS)
    self.epochs = int(epochs)
    self.progress_every_s = float(progress_every_s)
    self._main = distributed.is_main_process()
    self._epoch_times: list[float] = []
    self._tb = None
    if tensorboard and self._main:
      if tensorboardX is None:
        logging.info('tensorboardX is not installed: no TensorBoard scalars (pip install -e ".[tensorboard]")')
      else:
        self._tb = tensorboardX.SummaryWriter(logdir=os.path.join(run_dir, rundir.TENSORBOARD))
    self._epoch_start = None
    self._last_progress = None
    self._microbatches_seen = 0

  def print(self, text: str) -> None:
    if self._main:
      print(f'[{self.tag}] {text}', flush=True)

  def resume(self, start_epoch: int) -> None:
    """Drops the lines of epochs after ``start_epoch`` (the checkpoint training resumes from)."""
    rundir.truncate_jsonl(self.path, start_epoch)
    if start_epoch:
      self.print(f'resuming after epoch {start_epoch}')

  def rollback(self, last_epoch: int) -> None:
    """Drops the recorded rows after ``last_epoch`` (the epoch whose checkpoint could not be written)."""
    rundir.truncate_jsonl(self.path, last_epoch)

  def start_epoch(self) -> None:
    self._epoch_start = self._last_progress = time.time()
    self._microbatches_seen = 0

  def progress_due(self) -> bool:
    """Whether an in-epoch progress line is due (checked at dispatch boundaries; costs no device sync)."""
    return bool(self.progress_every_s) and time.time() - self._last_progress >= self.progress_every_s

  def progress(self, epoch: int, steps_done: int, steps_total: int, images_done: int) -> None:
    """An in-epoch progress line: ``steps_done`` of ``steps_total`` steps have finished on the device."""
    now = time.time()
    self._last_progress = now
    elapsed = now - self._epoch_start
    rate = images_done / elapsed if elapsed > 0 else float('nan')
    eta = elapsed / max(steps_done, 1) * (steps_total - steps_done)
    self.print(f'epoch {epoch}/{self.epochs}  step {steps_done}/{steps_total}  {rate:.0f} img/s  '
               f'epoch ETA {format_duration(eta)}')

  def microbatch_progress(self, epoch: int, step: int, i: int, microbatches: int, steps_total: int,
                          batch: int) -> None:
    """An in-epoch progress line, when due, from inside a step: microbatch ``i`` (0-based) of the epoch's step
    ``step`` (0-based) has finished (the in-step callback of :class:`arreg_jax.training.step.StepSpec`; may come
    from a callback thread, once per device)."""
    done = step * microbatches + i + 1  # microbatches finished in this epoch
    if done <= self._microbatches_seen or not self.progress_due():
      return
    self._microbatches_seen = done
    now = time.time()
    self._last_progress = now
    elapsed = now - self._epoch_start
    rate = done * batch / microbatches / elapsed if elapsed > 0 else float('nan')
    eta = elapsed / done * (steps_total * microbatches - done)
    self.print(f'epoch {epoch}/{self.epochs}  step {step + 1}/{steps_total}, microbatch {i + 1}/{microbatches} done  '
               f'{rate:.1f} img/s  epoch ETA {format_duration(eta)}')

  def record_epoch(self, row: dict) -> None:
    """Records one epoch's row (``epoch``, ``epoch_time_s``, metrics) in metrics.jsonl and TensorBoard.

    The training loop records before it checkpoints the epoch and prints after: a run killed in between resumes
    from the previous checkpoint and drops the recorded row, and a printed epoch always has its checkpoint.
    """
    self._epoch_times.append(row['epoch_time_s'])
    if not self._main:
      return
    rundir.append_jsonl(self.path, row)
    if self._tb is not None:
      for k, v in row.items():
        if k not in ('epoch', 'step') and isinstance(v, (int, float)) and np.isfinite(v):
          self._tb.add_scalar(f'epoch/{k}', v, global_step=row['epoch'])
      self._tb.flush()

  def print_epoch(self, row: dict) -> None:
    """The epoch's stdout line (losses, accuracies, img/s, the member's ETA)."""
    if not self._main:
      return
    eta = float(np.mean(self._epoch_times)) * (self.epochs - row['epoch'])
    line = (f'epoch {row["epoch"]}/{self.epochs}  train loss {row["train_loss"]:.4f} '
            f'acc {100 * row["train_acc"]:.2f}%')
    if 'test_acc' in row:
      line += f'  test acc {100 * row["test_acc"]:.2f}%  PGD acc {100 * row["pgd_acc"]:.2f}%'
    line += f'  {row["images_per_s"]:.0f} img/s  ETA {format_duration(eta)}'
    self.print(line)

  def write_final(self, final_row: dict, epoch: int) -> None:
    """The final metrics' stdout line and TensorBoard scalars (``final/…``)."""
    r = final_row
    self.print(f'final: train acc {r["train_acc"]:.2f}%  test acc {r["test_acc"]:.2f}%  PGD acc {r["pgd_acc"]:.2f}%'
               f'  train loss {r["train_loss"]:.4f}  test loss {r["test_loss"]:.4f}')
    if self._tb is not None:
      for k, v in r.items():
        if isinstance(v, (int, float)) and v is not None and np.isfinite(v):
          self._tb.add_scalar(f'final/{k}', v, global_step=epoch)
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
