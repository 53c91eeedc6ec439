"""Command-line entry point: ``python -m arreg_jax.main --config configs/<name>.py --workdir DIR``.

Trains every member of the config's sweep (:mod:`arreg_jax.trainer`), then — unless ``config.analysis.enabled`` is
off — analyses each finished run (:mod:`arreg_jax.sweep_analysis`) and writes the report
(:mod:`arreg_jax.report.builder`), in turn. Config values can be overridden on the command line
(``--config.train.epochs=5``; ``--config.data.train_size=None`` sets an optional value back to None);
``--config configs/<name>.py:smoke`` runs a tiny version of any config. Errors caused by the input (config, data,
work directory, divergence, a full disk) are printed as one line, without a traceback, and exit with status 2.

``--cpu_devices=auto`` (the default) splits a CPU-only host into one XLA:CPU device per core, over which the batch is
sharded (:mod:`arreg_jax.host_devices`); ``--cpu_devices=N`` asks for N devices, ``--cpu_devices=1`` keeps XLA's
single device. It changes nothing on GPU/TPU hosts or when the user already set the CPU device count
(``--xla_force_host_platform_device_count`` in ``XLA_FLAGS``, or ``JAX_NUM_CPU_DEVICES``).
"""

from __future__ import annotations

import os

# jaxlib's CPU LAPACK kernels (the batched SVDs of arreg_jax.spectral) run on scipy's OpenBLAS, whose own threads
# oversubscribe the cores XLA already uses (3-30x slower, erratic); must be set before numpy is imported.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import re
import time

from absl import app
from absl import flags
from ml_collections import config_flags

from arreg_jax import configuration, distributed, host_devices, sweep_analysis, trainer
from arreg_jax.cli import fail, quiet_orbax
from arreg_jax.errors import ArregError
from arreg_jax.report import builder

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command line's flags (at start-up, not at import: ``arreg_jax.analyze`` has a ``--workdir`` too)."""
  config_flags.DEFINE_config_file('config', None, 'Experiment config file (configs/<name>.py[:smoke]).',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, metrics and the report.')
  flags.DEFINE_string('cpu_devices', 'auto', "XLA:CPU devices on a CPU-only host: 'auto' (one per core) or N.")
  flags.mark_flags_as_required(['config', 'workdir'])

_NONE_OVERRIDE = re.compile(r'^--config\.([\w.]+)=(None|none)$')
_none_overrides: list[str] = []


def run(config, workdir: str) -> dict:
  """Train → analyse → report for ``config`` in ``workdir``; returns the training summary."""
  # Training shards each (micro)batch over the largest device count that divides it; evaluation pads its batches.
  mesh = trainer.training_mesh(config)
  summary = trainer.train_sweep(config, workdir, mesh=mesh)
  if config.analysis.enabled:
    analysis = sweep_analysis.analyze_sweep(workdir, reuse=True, mesh=mesh)
    if distributed.is_main_process():  # the report only reads files: process 0 alone
      t = time.time()
      out = builder.write_report(workdir, analysis_seconds=analysis['analysis_s'])
      print(f'[report] {out["report"]} ({time.time() - t:.1f} s)', flush=True)
  return summary


def main(argv):
  if len(argv) > 1:
    fail(f'unexpected arguments: {" ".join(argv[1:])}. Every setting is a flag: --config FILE --workdir DIR '
         '[--config.KEY=VALUE ...]')
  quiet_orbax()
  cpu_devices = FLAGS.cpu_devices.strip().lower()
  if cpu_devices != 'auto' and not (cpu_devices.isdigit() and int(cpu_devices) >= 1):
    fail(f"--cpu_devices must be 'auto' or an integer >= 1, got {FLAGS.cpu_devices!r}")
  host_devices.use_every_cpu_core('auto' if cpu_devices == 'auto' else int(cpu_devices))  # before any computation
  try:
    config = FLAGS.config
    config.keys()  # a config file that failed to load raises here, not at parse time
    for key in _none_overrides:
      configuration.set_to_none(config, key)
  except ArregError as e:
    fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError, OSError, ImportError, SyntaxError) as e:
    config_failure(e)
  try:
    distributed.initialize(config.distributed)  # several hosts: before any computation (README, "Several hosts")
    run(config, FLAGS.workdir)
  except ArregError as e:
    fail(str(e))


def parse_flags(argv):
  """Parses flags; a bad config file, config argument or ``--config.x=...`` override is one clear error.

  ``--config.KEY=None`` overrides are taken out here and applied after the config has loaded
  (``configuration.set_to_none``): absl's typed parsers cannot read 'None'.
  """
  kept = []
  for arg in argv:
    m = _NONE_OVERRIDE.match(arg)
    if m:
      _none_overrides.append(m.group(1))
    else:
      kept.append(arg)
  try:
    return FLAGS(kept)
  except flags.Error as e:
    fail(f'{last_error_line(str(e))} (flag parsing). Run with --helpfull for the flags.')
  except ArregError as e:
    fail(str(e))
  except (AttributeError, KeyError, TypeError, ValueError, OSError, ImportError, SyntaxError) as e:
    config_failure(e)


def last_error_line(text: str) -> str:
  """The message of the innermost exception in ``text`` (config_flags embeds whole tracebacks in its errors)."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not any(line.startswith('Traceback') for line in lines):
    return ' '.join(lines)
  errors = [line for line in lines if re.match(r'^[\w.]+(Error|Exception)\b', line)]
  line = errors[-1] if errors else lines[-1]
  return line.split(': ', 1)[1] if ': ' in line else line


def config_failure(e: Exception) -> None:
  """One line for a config file that does not load or a value it cannot take."""
  text = str(e)
  if isinstance(e, SyntaxError):
    fail(f'the config file {e.filename} has a syntax error at line {e.lineno}: {e.msg}; fix the file')
  locked = re.search(r'Key "([^"]+)" does not exist and cannot be added since the config is locked', text)
  if locked:
    fail(f'unknown config key {locked.group(1)!r}. Check the spelling; the valid keys and their defaults are in '
         'arreg_jax/configuration.py (base_config)')
  detail = last_error_line(text).strip('\'"').replace('\\n', ' ').replace("\\'", "'")
  missing = re.search(r"No such file or directory: '([^']+)'", text)
  if missing:
    fail(f'config file {missing.group(1)} does not exist; pass one such as --config configs/mnist.py')
  if 'Failed loading config file' in text:
    fail(f'cannot load the config file given to --config: {detail}')
  fail(f'cannot apply the config: {detail}. Valid keys and their defaults are in arreg_jax/configuration.py '
       '(base_config); the config file must define get_config(arg=None)')


def cli() -> None:
  """Console-script entry point."""
  define_flags()
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  cli()
