"""Command-line entry point: ``python -m arreg_jax.main --config configs/<name>.py --workdir DIR``.

Config values can be overridden on the command line (``--config.train.epochs=5``); ``--config
configs/<name>.py:smoke`` runs a tiny version of any config. Errors caused by the input (config, data, divergence)
are printed as one line, without a traceback, and exit with status 2.

``--cpu_devices=auto`` (the default) splits a CPU-only host into one XLA:CPU device per core, over which the batch is
sharded (:mod:`arreg_jax.host_devices`); ``--cpu_devices=N`` asks for N devices, ``--cpu_devices=1`` keeps XLA's
single device. It changes nothing on GPU/TPU hosts or when ``XLA_FLAGS`` already sets
``--xla_force_host_platform_device_count``.
"""

from __future__ import annotations

import os

# jaxlib's CPU LAPACK kernels (the batched SVDs of arreg_jax.spectral) run on scipy's OpenBLAS, whose own threads
# oversubscribe the cores XLA already uses (3-30x slower, erratic); must be set before numpy is imported.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from arreg_jax import distributed, experiment, host_devices
from arreg_jax.errors import ArregError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/<name>.py[:smoke]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the report.')
flags.DEFINE_string('cpu_devices', 'auto', "XLA:CPU devices on a CPU-only host: 'auto' (one per core) or N.")
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Orbax logs every step of every save at INFO; keep its warnings and errors only.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or '/orbax/' not in r.pathname)
  cpu_devices = FLAGS.cpu_devices.strip().lower()
  if cpu_devices != 'auto' and not (cpu_devices.isdigit() and int(cpu_devices) >= 1):
    _fail(f"--cpu_devices must be 'auto' or an integer >= 1, got {FLAGS.cpu_devices!r}")
  host_devices.use_every_cpu_core('auto' if cpu_devices == 'auto' else int(cpu_devices))  # before any computation
  try:
    config = FLAGS.config
    config.keys()  # a config file that failed to load raises here, not at parse time
  except ArregError as e:
    _fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError, OSError, ImportError, SyntaxError) as e:
    _config_failure(e)
  try:
    distributed.initialize(config.distributed)  # several hosts: before any computation (README, "Several hosts")
    experiment.run(config, FLAGS.workdir)
  except ArregError as e:
    _fail(str(e))


def _fail(message: str) -> None:
  print(f'error: {message}', file=sys.stderr, flush=True)
  sys.exit(2)


def _parse_flags(argv):
  """Parses flags; a bad config file, config argument or ``--config.x=...`` override is one clear error."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    _fail(f'{_last_error_line(str(e))} (flag parsing). Run with --helpfull for the flags.')
  except ArregError as e:
    _fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    _config_failure(e)


def _last_error_line(text: str) -> str:
  """The message of the innermost exception in ``text`` (config_flags embeds whole tracebacks in its errors)."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not any(line.startswith('Traceback') for line in lines):
    return ' '.join(lines)
  errors = [line for line in lines if re.match(r'^[\w.]+(Error|Exception)\b', line)]
  line = errors[-1] if errors else lines[-1]
  return line.split(': ', 1)[1] if ': ' in line else line


def _config_failure(e: Exception) -> None:
  detail = _last_error_line(str(e)).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
  missing = re.search(r"No such file or directory: '([^']+)'", str(e))
  if missing:
    _fail(f'config file {missing.group(1)} does not exist; pass one such as --config configs/mnist.py')
  if 'Failed loading config file' in str(e):
    _fail(f'cannot load the config file given to --config: {detail}')
  _fail(f'cannot apply the config: {detail}. Valid keys and their defaults are in arreg_jax/configuration.py '
        '(base_config); the config file must define get_config(arg=None)')


def run() -> None:
  """Console-script entry point."""
  app.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
