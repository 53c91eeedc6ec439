"""What the command-line entry points (:mod:`arreg_jax.main`, :mod:`arreg_jax.analyze`) share: every way a run ends
(exit statuses, one-line errors, Ctrl-C), quiet orbax logs, and reading ``--config`` (a config file, its overrides,
``--config.KEY=None``) into one clear line when it fails.

Only the entry points call these, from their ``cli()``: importing the package changes nothing process-wide.

Exit statuses: 0 when the run finished; :data:`EXIT_INPUT_ERROR` (2) for an error caused by the input (config, data,
work directory, divergence, a full disk), printed as one ``error:`` line without a traceback;
:data:`EXIT_INTERRUPTED` (130 = 128 + SIGINT, what shells report for Ctrl-C, so scripts can tell an interruption from
bad input) for Ctrl-C, with one line saying how to resume. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from arreg_jax import configuration
from arreg_jax.errors import ArregError, ConfigError

EXIT_INPUT_ERROR = 2
EXIT_INTERRUPTED = 130


class _IntOrAutoParser(flags.ArgumentParser):
  """``--config.train.microbatches=auto|N``: the one ``object``-typed field of the config schema (an int or 'auto';
  ``arreg_jax.configuration``)."""

  def parse(self, argument):
    text = str(argument).strip().lower()
    if text == 'auto':
      return 'auto'
    try:
      return int(text)
    except ValueError:
      raise ValueError(f"expected 'auto' or an integer, got {argument!r}") from None


def register_config_parsers() -> None:
  """Lets ``--config.KEY=VALUE`` set the config's int-or-'auto' field (before the flags are parsed)."""
  config_flags.register_flag_parser_for_type(object, _IntOrAutoParser())


_NONE_OVERRIDE = re.compile(r'^--config\.([\w.]+)=(None|none)$')
# What a config file or a config override can raise while it loads (reported as one line by config_error).
CONFIG_LOAD_ERRORS = (AttributeError, KeyError, TypeError, ValueError, OSError, ImportError, SyntaxError)


def parse_config_flags(argv: list[str]) -> tuple[list[str], list[str]]:
  """absl's flags parser for an entry point with ``--config``: ``(remaining argv, keys set to None)``.

  ``--config.KEY=None`` overrides are taken out here and applied after the config has loaded (:func:`load_config`):
  absl's typed parsers cannot read 'None'. A bad config file, config argument or override raises ConfigError.
  """
  kept, none_keys = [], []
  for arg in argv:
    m = _NONE_OVERRIDE.match(arg)
    if m:
      none_keys.append(m.group(1))
    else:
      kept.append(arg)
  try:
    return flags.FLAGS(kept), none_keys
  except flags.Error as e:
    raise ConfigError(f'{last_error_line(str(e))} (flag parsing). Run with --helpfull for the flags.') from None
  except ArregError:
    raise
  except CONFIG_LOAD_ERRORS as e:
    raise config_error(e) from None


def load_config(config, none_keys: list[str]):
  """The parsed ``--config`` with its ``--config.KEY=None`` overrides applied; ConfigError if it does not load."""
  try:
    config.keys()  # a config file that failed to load raises here, not at parse time
    for key in none_keys:
      configuration.set_to_none(config, key)
  except ArregError:
    raise
  except CONFIG_LOAD_ERRORS as e:
    raise config_error(e) from None
  return config


def last_error_line(text: str) -> str:
  """The message of the innermost exception in ``text`` (config_flags embeds whole tracebacks in its errors)."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not any(line.startswith('Traceback') for line in lines):
    return ' '.join(lines)
  errors = [line for line in lines if re.match(r'^[\w.]+(Error|Exception)\b', line)]
  line = errors[-1] if errors else lines[-1]
  return line.split(': ', 1)[1] if ': ' in line else line


def config_error(e: Exception) -> ConfigError:
  """One line for a config file that does not load or a value it cannot take."""
  text = str(e)
  if isinstance(e, SyntaxError):
    return ConfigError(f'the config file {e.filename} has a syntax error at line {e.lineno}: {e.msg}; fix the file')
  locked = re.search(r'Key "([^"]+)" does not exist and cannot be added since the config is locked', text)
  if locked:
    return ConfigError(f'unknown config key {locked.group(1)!r}. Check the spelling; the valid keys and their '
                       'defaults are in arreg_jax/configuration.py (base_config)')
  detail = last_error_line(text).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
  missing = re.search(r"No such file or directory: '([^']+)'", text)
  if missing:
    return ConfigError(f'config file {missing.group(1)} does not exist; pass one such as --config configs/mnist.py')
  if 'Failed loading config file' in text:
    return ConfigError(f'cannot load the config file given to --config: {detail}')
  return ConfigError(f'cannot apply the config: {detail}. Valid keys and their defaults are in '
                     'arreg_jax/configuration.py (base_config); the config file must define get_config(arg=None)')


def _orbax_filter(record) -> bool:
  if '/orbax/' not in record.pathname:
    return True
  record.exc_info = record.exc_text = None  # a failed save is reported by our own one line (training/checkpoints)
  return record.levelno >= logging.converter.STANDARD_WARNING


def quiet_orbax() -> None:
  """Orbax logs every step of every save at INFO, and the tracebacks of its writer threads: keep its warnings and
  errors, one line each."""
  logging.get_absl_handler().addFilter(_orbax_filter)


def _status(code: Any) -> int:
  """The exit status of ``SystemExit(code)`` (absl's app.run ends with one)."""
  if code is None or isinstance(code, bool):
    return int(bool(code))
  if isinstance(code, int):
    return code
  print(code, file=sys.stderr)
  return 1


def run(main: Callable, *, flags_parser: Callable | None = None, on_interrupt: str) -> None:
  """Runs ``absl.app.run(main)`` and ends the process with its exit status (module docstring).

  An :class:`~arreg_jax.errors.ArregError` is printed as ``error: <message>`` (status 2); Ctrl-C as
  ``interrupted: <on_interrupt>`` (status 130). A run that ends in either leaves the process with ``os._exit``:
  after a failed checkpoint write orbax's and tensorstore's writer threads and coroutines would print their own
  tracebacks during the interpreter's shutdown, or wait there for writes that will not finish; every file was
  written atomically, so there is nothing to flush but stdout and stderr.
  """
  kw = {} if flags_parser is None else {'flags_parser': flags_parser}
  try:
    app.run(main, **kw)
    status = 0
  except SystemExit as e:
    status = _status(e.code)
  except ArregError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    status = EXIT_INPUT_ERROR
  except KeyboardInterrupt:
    print(f'interrupted: {on_interrupt}', file=sys.stderr, flush=True)
    status = EXIT_INTERRUPTED
  sys.stdout.flush()
  sys.stderr.flush()
  if status in (EXIT_INPUT_ERROR, EXIT_INTERRUPTED):
    os._exit(status)
  sys.exit(status)
