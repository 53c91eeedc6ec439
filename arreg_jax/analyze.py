"""Command-line entry point: ``python -m arreg_jax.analyze --workdir DIR`` (re)analyses a trained sweep.

Restores every finished run of the sweep in ``DIR`` from its last checkpoint and writes ``analysis.json`` and
``per_example.npz`` into each run directory (:mod:`arreg_jax.sweep_analysis`), then ``report.md``, ``claims.json``
and ``figures/`` into ``DIR`` (:mod:`arreg_jax.report.builder`). The analysis settings are each run's config block
``analysis`` (defaults from ``arreg_jax/configuration.py`` for runs trained before it existed).

  --reuse        keep a run's analysis.json when it is up to date (same checkpoint metrics and settings)
  --report_only  only rebuild the report from the existing analysis files (no checkpoint is read)

Errors caused by the input (no sweep there, bad settings) are printed as one line and exit with status 2.
"""

from __future__ import annotations

import os

# jaxlib's CPU LAPACK kernels (the batched SVDs of arreg_jax.spectral) run on scipy's OpenBLAS, whose own threads
# oversubscribe the cores XLA already uses (3-30x slower, erratic); must be set before numpy is imported.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import time

from absl import app
from absl import flags

from arreg_jax import distributed, host_devices, sweep_analysis
from arreg_jax.errors import ArregError
from arreg_jax.cli import fail, quiet_orbax
from arreg_jax.report import builder

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command line's flags (at start-up, not at import: ``arreg_jax.main`` has a ``--workdir`` too)."""
  flags.DEFINE_string('workdir', None, 'The sweep directory written by python -m arreg_jax.main.')
  flags.DEFINE_bool('reuse', False, 'Keep up-to-date analysis.json files instead of recomputing them.')
  flags.DEFINE_bool('report_only', False, 'Only rebuild report.md, claims.json and the figures.')
  flags.mark_flags_as_required(['workdir'])


def analyse_and_report(workdir: str, *, reuse: bool = False, report_only: bool = False) -> dict:
  """Analyses the finished runs of ``workdir`` (unless ``report_only``), then writes the report."""
  if not os.path.isdir(workdir):
    raise ArregError(f'--workdir {workdir} does not exist; pass the directory of a trained sweep')
  seconds = None
  if not report_only:
    seconds = sweep_analysis.analyze_sweep(workdir, reuse=reuse)['analysis_s']
  if not distributed.is_main_process():
    return {}
  t = time.time()
  try:
    out = builder.write_report(workdir, analysis_seconds=seconds)
  except FileNotFoundError as e:
    raise ArregError(str(e)) from e
  print(f'[report] {out["report"]} ({time.time() - t:.1f} s)', flush=True)
  return out


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}. Usage: python -m arreg_jax.analyze --workdir DIR '
          '[--reuse] [--report_only]')
  quiet_orbax()
  host_devices.use_every_cpu_core()  # one XLA:CPU device per core on a CPU-only host (arreg_jax.host_devices)
  try:
    analyse_and_report(FLAGS.workdir, reuse=FLAGS.reuse, report_only=FLAGS.report_only)
  except ArregError as e:
    fail(str(e))


def cli() -> None:
  define_flags()
  app.run(main)


if __name__ == '__main__':
  cli()
