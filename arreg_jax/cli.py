"""What the two command-line entry points (``main``, ``analyze``) share: one-line errors and quiet logs."""

from __future__ import annotations

import os
import sys

from absl import logging


def fail(message: str) -> None:
  """Prints ``error: message`` on stderr and exits with status 2 (an error in the user's input, no traceback)."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.stdout.flush()
  # os._exit, not sys.exit: after a failed checkpoint write, orbax's background threads and coroutines would print
  # their own tracebacks during interpreter shutdown. Every file was written atomically: there is nothing to flush.
  os._exit(2)


def _orbax_filter(record) -> bool:
  if '/orbax/' not in record.pathname:
    return True
  record.exc_info = record.exc_text = None  # a failed save is reported by our own one line (checkpoint.py)
  return record.levelno >= logging.converter.STANDARD_WARNING


def quiet_orbax() -> None:
  """Orbax logs every step of every save at INFO, and the tracebacks of its writer threads: keep its warnings and
  errors, one line each."""
  logging.get_absl_handler().addFilter(_orbax_filter)
