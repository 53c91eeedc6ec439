"""Command-line entry point: ``python -m arreg_jax.analyze --workdir DIR`` (re)analyzes a trained sweep.

Restores every finished run of the sweep in ``DIR`` from its last checkpoint and writes ``analysis.json`` and
``per_example.npz`` into each run directory (:mod:`arreg_jax.sweep_analysis`), then ``report.md``, ``claims.json``
and ``figures/`` into ``DIR`` (:mod:`arreg_jax.report.builder`). The analysis settings are each run's config block
``analysis`` (defaults from ``arreg_jax/configuration.py`` for runs trained before it existed).

  --reuse        keep a run's analysis.json when it is up to date (same checkpoint metrics and settings)
  --report_only  only rebuild the report from the existing analysis files (no checkpoint is read)

Errors caused by the input (no sweep there, a damaged file, bad settings) are one line and exit status 2; Ctrl-C is
one line and status 130 (:mod:`arreg_jax.cli`).
"""

from __future__ import annotations

import os

if __name__ == '__main__':
  # Run as a program, before numpy loads: jaxlib's CPU LAPACK kernels (the batched SVDs of arreg_jax.spectral) run
  # on OpenBLAS, whose own threads oversubscribe the cores XLA already uses (3-30x slower, erratic).
  os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import time  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from arreg_jax import cli, distributed, host_devices, rundir, sweep_analysis  # pylint: disable=wrong-import-position
from arreg_jax import sweep as sweep_lib  # pylint: disable=wrong-import-position
from arreg_jax.errors import ArregError, ConfigError  # pylint: disable=wrong-import-position
from arreg_jax.report import builder  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
AGAIN = 'nothing is lost: run the same command again (files are replaced whole, never half-written)'


def check_run_files(workdir: str) -> None:
  """Reads every file of the sweep that the analysis and the report read back (``summary.json``, and each finished
  run's ``final.json``, ``metrics.jsonl`` and ``analysis.json``), so that a damaged one is reported — one line naming
  it and what to do (:func:`arreg_jax.rundir.read_json`) — before anything is written."""
  summary = os.path.join(workdir, rundir.SUMMARY)
  if os.path.exists(summary):
    rundir.read_json(summary)
  for run in sweep_lib.find_runs(workdir):
    if not run.finished:
      continue
    rundir.read_json(os.path.join(run.path, rundir.FINAL))
    rundir.read_jsonl(os.path.join(run.path, rundir.METRICS))
    analysis = os.path.join(run.path, rundir.ANALYSIS)
    if os.path.exists(analysis):
      rundir.read_json(analysis)


def analyze_and_report(workdir: str, *, reuse: bool = False, report_only: bool = False, mesh=None) -> dict:
  """Analyzes the finished runs of ``workdir`` (unless ``report_only``), then writes the report (process 0)."""
  if not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} does not exist; pass the directory of a trained sweep')
  check_run_files(workdir)
  seconds = None
  if not report_only:
    seconds = sweep_analysis.analyze_sweep(workdir, reuse=reuse, mesh=mesh)['analysis_s']
  if not distributed.is_main_process():  # the report only reads files: process 0 alone
    return {}
  t = time.time()
  try:
    out = builder.write_report(workdir, analysis_seconds=seconds)
  except FileNotFoundError as e:
    raise ArregError(str(e)) from e
  print(f'[report] {out["report"]} ({time.time() - t:.1f} s)', flush=True)
  return out


def define_flags() -> None:
  flags.DEFINE_string('workdir', None, 'The sweep directory written by python -m arreg_jax.main.')
  flags.DEFINE_bool('reuse', False, 'Keep up-to-date analysis.json files instead of recomputing them.')
  flags.DEFINE_bool('report_only', False, 'Only rebuild report.md, claims.json and the figures.')
  flags.mark_flags_as_required(['workdir'])


def main(argv) -> None:
  if len(argv) > 1:
    raise ConfigError(f'unexpected arguments: {" ".join(argv[1:])}. Usage: python -m arreg_jax.analyze --workdir DIR '
                      '[--reuse] [--report_only]')
  cli.quiet_orbax()
  host_devices.use_every_cpu_core()  # one XLA:CPU device per core on a CPU-only host, before JAX starts
  analyze_and_report(FLAGS.workdir, reuse=FLAGS.reuse, report_only=FLAGS.report_only)


def cli_main() -> None:
  """The program: defines the flags, runs :func:`main`, and ends the process (:func:`arreg_jax.cli.run`)."""
  define_flags()
  cli.run(main, on_interrupt=AGAIN)


if __name__ == '__main__':
  cli_main()
