"""What the two command-line entry points (``main``, ``analyze``) share: one-line errors and quiet logs."""

from __future__ import annotations

import sys

from absl import logging


def fail(message: str) -> None:
  """Prints ``error: message`` on stderr and exits with status 2 (an error in the user's input, no traceback)."""
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def quiet_orbax() -> None:
  """Orbax logs every step of every save at INFO; keep its warnings and errors only."""
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or '/orbax/' not in r.pathname)
