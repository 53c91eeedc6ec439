"""The run directory: its layout, and the only code that writes or reads its files (the bottom layer).

Layout of a sweep directory (``--workdir``)::

  WORKDIR/
    config.json             the sweep's config
    summary.json            one row of final metrics per member (rewritten after every member)
    report.md claims.json   the report (arreg_jax.report), figures/*.png
    <run>/                  one run per sweep member (names: arreg_jax.sweep.run_name)
      config.json           the member's config, with its ``strength``
      metrics.jsonl         one JSON line per epoch
      tensorboard/          the same scalars as TensorBoard events (when tensorboardX is installed)
      margins/epoch<k>.npz  per-example margins at chosen epochs (config.margins, poster 004)
      checkpoints/<epoch>/  orbax checkpoints of the TrainState (the last config.checkpoint.keep)
      final.json            final metrics; its presence marks the run finished
      analysis.json per_example.npz   the analysis of the run

Every write is atomic (a temporary file in the same directory, flushed to disk, then ``os.replace``): a reader, a
crash or a full disk never leaves a half-written file under a final name, and a write that fails leaves the
previous version intact and raises :class:`arreg_jax.errors.OutputError` naming the file; a file that cannot be read
back raises :class:`arreg_jax.errors.DataError` naming it and what to do. Files other than
checkpoints come from process 0 only (``distributed.is_main_process``). This module imports nothing of the package
but :mod:`arreg_jax.errors` and :mod:`arreg_jax.distributed`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Callable, IO

from absl import logging
import numpy as np

from arreg_jax import distributed
from arreg_jax.errors import DataError, OutputError

CONFIG = 'config.json'
SUMMARY = 'summary.json'
METRICS = 'metrics.jsonl'
FINAL = 'final.json'
ANALYSIS = 'analysis.json'
PER_EXAMPLE = 'per_example.npz'
CHECKPOINTS = 'checkpoints'
MARGINS = 'margins'
TENSORBOARD = 'tensorboard'
REPORT = 'report.md'
CLAIMS = 'claims.json'
FIGURES = 'figures'


def atomic_write(path: str, write: Callable[[IO], None], *, binary: bool = False) -> None:
  """Calls ``write(f)`` on a temporary file beside ``path``, flushes it to disk and renames it to ``path``.

  On any failure (a full disk, a file-size limit, an exception in ``write``) the temporary file is removed, the
  previous ``path`` is left as it was, and an OSError surfaces as :class:`OutputError`.
  """
  d = os.path.dirname(path) or '.'
  tmp = None
  try:
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp_' + os.path.basename(path) + '.')
    with os.fdopen(fd, 'wb' if binary else 'w') as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
    tmp = None
  except OSError as e:
    raise OutputError(f'could not write {path}: {e.strerror or e}. The previous version of the file (if any) is '
                      'intact; free disk space (or raise the file-size limit) and run the same command again'
                      ) from e
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)


def json_safe(obj: Any) -> Any:
  """Plain Python values, non-finite floats as strings ('inf', '-inf', 'nan'): the file stays strict JSON."""
  if isinstance(obj, dict):
    return {k: json_safe(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_safe(v) for v in obj]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (float, np.floating)):
    f = float(obj)
    return f if math.isfinite(f) else str(f)
  if isinstance(obj, np.integer):
    return int(obj)
  return obj


def write_json(path: str, obj: Any, *, safe: bool = False) -> None:
  """Writes ``obj`` as JSON atomically from process 0 (``safe``: through :func:`json_safe` first)."""
  if not distributed.is_main_process():
    return
  obj = json_safe(obj) if safe else obj

  def write(f):
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')

  atomic_write(path, write)


def write_text(path: str, text: str) -> None:
  """Writes ``text`` atomically from process 0."""
  if distributed.is_main_process():
    atomic_write(path, lambda f: f.write(text))


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes a compressed ``.npz`` atomically from process 0."""
  if distributed.is_main_process():
    atomic_write(path, lambda f: np.savez_compressed(f, **arrays), binary=True)


# What to do when a file of the run directory cannot be read (by its name): the fix in its one-line error.
_REPAIRS = {
    CONFIG: 'delete it and run the same command again (it is written again from --config; the runs keep their '
            'checkpoints), or choose another --workdir',
    SUMMARY: "delete it and run the training command again (it is rebuilt from every run's final.json)",
    FINAL: 'delete it and run the training command again (the run is evaluated again from its last checkpoint)',
    ANALYSIS: 'delete it and run python -m arreg_jax.analyze --workdir DIR on the sweep again',
    METRICS: 'delete its damaged lines (one JSON object a line) or the file, and run the same command again',
}


def _damaged(path: str, e: Exception) -> DataError:
  repair = _REPAIRS.get(os.path.basename(path), 'restore it from a copy or delete it')
  reason = e.msg if isinstance(e, json.JSONDecodeError) else type(e).__name__
  return DataError(f'{path} is damaged (not valid JSON: {reason}); {repair}')


def read_json(path: str) -> Any:
  """The JSON value in ``path``; a damaged file raises :class:`DataError` naming it and the fix."""
  with open(path, encoding='utf-8') as f:
    try:
      return json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
      raise _damaged(path, e) from None


def read_jsonl(path: str) -> list[dict]:
  """The rows of a JSON-lines file ([] if it does not exist); a damaged line raises :class:`DataError`."""
  if not os.path.exists(path):
    return []
  with open(path, encoding='utf-8') as f:
    try:
      return [json.loads(line) for line in f if line.strip()]
    except (ValueError, UnicodeDecodeError) as e:
      raise _damaged(path, e) from None


def _write_jsonl(path: str, rows: list[dict]) -> None:
  atomic_write(path, lambda f: f.writelines(json.dumps(r) + '\n' for r in rows))


def append_jsonl(path: str, row: dict) -> None:
  """Appends one row, atomically: the file is rewritten whole, so a failed write never leaves a partial line
  (metrics files hold one line per epoch: rewriting costs nothing next to an epoch)."""
  if distributed.is_main_process():
    _write_jsonl(path, read_jsonl(path) + [row])


def truncate_jsonl(path: str, keep_through_epoch: int) -> None:
  """Drops the rows of epochs after ``keep_through_epoch`` (a resumed run recomputes them)."""
  if distributed.is_main_process() and os.path.exists(path):
    _write_jsonl(path, [r for r in read_jsonl(path) if r['epoch'] <= keep_through_epoch])


def is_finished(run_dir: str) -> bool:
  return os.path.isfile(os.path.join(run_dir, FINAL))


def run_dirs(workdir: str) -> list[tuple[str, dict]]:
  """``(path, config dict)`` of every run directly under ``workdir``, in name order.

  A run directory is recognized by its ``config.json`` carrying a ``strength`` key, never by its name.
  """
  out = []
  if not os.path.isdir(workdir):
    return out
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name)
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
      continue
    try:
      cfg = read_json(cfg_path)
    except OSError as e:  # a damaged config.json (DataError) or an unreadable one: not a run we can use
      logging.warning('%s: not a run (%s)', path, e)
      continue
    if isinstance(cfg, dict) and 'strength' in cfg:
      out.append((path, cfg))
  return out
