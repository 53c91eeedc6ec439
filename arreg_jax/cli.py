"""What the two command-line entry points (``main``, ``analyze``) share: one-line errors, quiet logs, and the
command-line parser of the config's int-or-'auto' field."""

from __future__ import annotations

import os
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags


class _IntOrAutoParser(flags.ArgumentParser):
  """``--config.train.microbatches=auto|N``: the one ``object``-typed field of the
  config schema (an int or 'auto'; ``arreg_jax.configuration``)."""

  def parse(self, argument):
    text = str(argument).strip().lower()
    if text == 'auto':
      return 'auto'
    try:
      return int(text)
    except ValueError:
      raise ValueError(f"expected 'auto' or an integer, got {argument!r}") from None


config_flags.register_flag_parser_for_type(object, _IntOrAutoParser())


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
