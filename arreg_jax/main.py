"""Command-line entry point: ``python -m arreg_jax.main --config configs/<name>.py --workdir DIR``.

Config values can be overridden on the command line (``--config.train.epochs=5``); ``--config
configs/<name>.py:smoke`` runs a tiny version of any config. Errors caused by the input (config, data, divergence)
are printed as one line, without a traceback, and exit with status 2.
"""

from __future__ import annotations

import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from arreg_jax import experiment
from arreg_jax.errors import ArregError

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/<name>.py[:smoke]).',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the report.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Orbax logs every step of every save at INFO; keep its warnings and errors only.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or '/orbax/' not in r.pathname)
  try:
    experiment.run(FLAGS.config, FLAGS.workdir)
  except ArregError as e:
    logging.error('%s', e)
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == '__main__':
  run()
