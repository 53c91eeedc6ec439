"""Command-line entry point: ``python -m arreg_jax.main --config configs/<name>.py --workdir DIR``.

Checks the sweep once (:mod:`arreg_jax.training.setup`), trains every member (:mod:`arreg_jax.training.loop`), then —
unless ``config.analysis.enabled`` is off — analyzes each finished run and writes the report
(:func:`arreg_jax.analyze.analyze_and_report`). Overrides: ``--config.train.epochs=5``; ``--config.KEY=None`` sets an
optional value back to None; ``--config configs/<name>.py:smoke`` runs a tiny version of any config. Errors caused by
the input are one line and exit status 2; Ctrl-C is one line and status 130 (:mod:`arreg_jax.cli`). This file is
kept short so that :func:`run` can be imported and called from a notebook.

``--cpu_devices=auto`` (the default) splits a CPU-only host into one XLA:CPU device per core, over which the batch is
sharded (:mod:`arreg_jax.host_devices`); ``--cpu_devices=N`` asks for N devices, ``--cpu_devices=1`` keeps XLA's
single device. It changes nothing on GPU/TPU hosts or when the user already set the CPU device count
(``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, or ``JAX_NUM_CPU_DEVICES``).
"""

from __future__ import annotations

import os

if __name__ == '__main__':
  # Run as a program, before numpy loads: jaxlib's CPU LAPACK kernels (the batched SVDs of arreg_jax.spectral) run
  # on OpenBLAS, whose own threads oversubscribe the cores XLA already uses (3-30x slower, erratic).
  os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

from absl import flags  # pylint: disable=g-import-not-at-top,wrong-import-position
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top,wrong-import-position

from arreg_jax import analyze, cli, distributed, host_devices  # pylint: disable=wrong-import-position
from arreg_jax.errors import ConfigError  # pylint: disable=wrong-import-position
from arreg_jax.training import loop, setup  # pylint: disable=wrong-import-position

FLAGS = flags.FLAGS
RESUME = ('nothing is lost: run the same command again to resume from the last checkpoint of every unfinished run; '
          'the resumed sweep ends exactly as an uninterrupted one would')


def define_flags() -> None:
  cli.register_config_parsers()
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/<name>.py[:smoke]).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the report.')
  flags.DEFINE_string('cpu_devices', 'auto', "XLA:CPU devices on a CPU-only host: 'auto' (one per core) or N.")
  flags.mark_flags_as_required(['config', 'workdir'])


def run(config, workdir: str) -> dict:
  """Train → analyze → report for ``config`` in ``workdir``; returns the training summary."""
  checked = setup.setup_sweep(config, workdir)  # the one check: config, work directory, data, devices
  summary = loop.train_sweep(checked)
  if config.analysis.enabled:
    analyze.analyze_and_report(workdir, reuse=True, mesh=checked.mesh)
  return summary


def main(args) -> None:
  argv, none_keys = args
  if len(argv) > 1:
    raise ConfigError(f'unexpected arguments: {" ".join(argv[1:])}. Every setting is a flag: --config FILE '
                      '--workdir DIR [--config.KEY=VALUE ...]')
  cli.quiet_orbax()
  cpu_devices = FLAGS.cpu_devices.strip().lower()
  if cpu_devices != 'auto' and not (cpu_devices.isdigit() and int(cpu_devices) >= 1):
    raise ConfigError(f"--cpu_devices must be 'auto' or an integer >= 1, got {FLAGS.cpu_devices!r}")
  host_devices.use_every_cpu_core('auto' if cpu_devices == 'auto' else int(cpu_devices))  # before JAX starts
  config = cli.load_config(FLAGS.config, none_keys)
  distributed.initialize(config.distributed)  # several hosts: before any computation (README, "Several hosts")
  run(config, FLAGS.workdir)


def cli_main() -> None:
  """The program: defines the flags, runs :func:`main`, and ends the process (:func:`arreg_jax.cli.run`)."""
  define_flags()
  cli.run(main, flags_parser=cli.parse_config_flags, on_interrupt=RESUME)


if __name__ == '__main__':
  cli_main()
