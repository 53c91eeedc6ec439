"""Command-line entry point: ``python -m arreg_jax.analyze --workdir DIR`` (re)analyses a trained sweep.

Restores every finished run of the sweep in ``DIR`` from its last checkpoint, writes ``analysis.json`` and
``per_example.npz`` into each run directory, then ``report.md``, ``claims.json`` and ``figures/`` into ``DIR``
(:mod:`arreg_jax.analysis.run_analysis`, :mod:`arreg_jax.report.builder`). The analysis settings are each run's
config block ``analysis`` (defaults from ``arreg_jax/configuration.py`` for runs trained before it existed).

  --reuse        keep a run's analysis.json when it is up to date (same checkpoint metrics and settings)
  --report_only  only rebuild the report from the existing analysis files (no checkpoint is read)

Errors caused by the input (no sweep there, bad settings) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import os

# jaxlib's CPU LAPACK kernels (the batched SVDs of arreg_jax.spectral) run on scipy's OpenBLAS, whose own threads
# oversubscribe the cores XLA already uses (3-30x slower, erratic); must be set before numpy is imported.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import sys

from absl import app
from absl import flags
from absl import logging

from arreg_jax import host_devices
from arreg_jax.errors import ArregError

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'The sweep directory written by python -m arreg_jax.main.')
flags.DEFINE_bool('reuse', False, 'Keep up-to-date analysis.json files instead of recomputing them.')
flags.DEFINE_bool('report_only', False, 'Only rebuild report.md, claims.json and the figures.')
flags.mark_flags_as_required(['workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  host_devices.use_every_cpu_core()  # one XLA:CPU device per core on a CPU-only host (arreg_jax.host_devices)
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= logging.converter.STANDARD_WARNING or '/orbax/' not in r.pathname)
  workdir = FLAGS.workdir
  try:
    if not os.path.isdir(workdir):
      raise ArregError(f'--workdir {workdir} does not exist; pass the directory of a trained sweep')
    if FLAGS.report_only:
      from arreg_jax.report import builder  # pylint: disable=g-import-not-at-top
      try:
        out = builder.write_report(workdir)
      except FileNotFoundError as e:
        raise ArregError(str(e)) from e
      print(f'[report] {out["report"]}', flush=True)
    else:
      from arreg_jax.analysis import run_analysis  # pylint: disable=g-import-not-at-top
      run_analysis.analyze_sweep(workdir, reuse=FLAGS.reuse)
  except ArregError as e:
    print(f'error: {e}', file=sys.stderr, flush=True)
    sys.exit(2)


def run() -> None:
  app.run(main)


if __name__ == '__main__':
  run()
