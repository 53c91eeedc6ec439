"""Command-line AutoAttack evaluation of trained runs: ``python -m arreg_jax.evaluate --workdir RUN_OR_SWEEP``.

Restores each finished run (``--workdir`` is one run directory, or a sweep directory holding several) from its last
checkpoint (:func:`arreg_jax.training.checkpoints.restore_run`), takes its test set through the run's test transform, and runs
:class:`arreg_jax.attacks.AutoAttack` on it — the authors' standard version by default, L∞ at the run's robustness ε
(``config.eval.robustness.eps``, else ``config.eval.pgd_eps``) — printing the same lines as the library (initial
accuracy, a progress line per batch, the robust accuracy after each stage) and a table for the sweep at the end.
Each run's result goes to ``RUN/autoattack.json`` (``--json`` for a single run: another path).

  python -m arreg_jax.evaluate --workdir runs/mnist                       # every finished run of the sweep
  python -m arreg_jax.evaluate --workdir runs/c10/ar8 --eps 8/255 --examples 1000 --bs 250
  python -m arreg_jax.evaluate --workdir runs/mnist --version custom --attacks apgd-ce,fab-t

Errors caused by the input (no run there, bad ε) are printed as one line and exit with status 2. On a CPU-only host
the batches are sharded over one XLA:CPU device per core (``--cpu_devices``).
"""

from __future__ import annotations

import os
import types

from absl import flags
import jax
import numpy as np

from arreg_jax import attacks, cli, distributed, host_devices, models, rundir
from arreg_jax.data import augment
from arreg_jax.errors import ArregError, ConfigError
from arreg_jax.training import checkpoints

FLAGS = flags.FLAGS


def define_flags() -> None:
  """Defines the command line's flags (at start-up, not at import: ``arreg_jax.main`` has a ``--workdir`` too)."""
  flags.DEFINE_string('workdir', None, 'A run directory, or a sweep directory of runs, written by arreg_jax.main.')
  flags.DEFINE_string('eps', None, "The radius, e.g. 0.3 or 8/255 (default: the run's config.eval.robustness.eps, "
                      'else config.eval.pgd_eps).')
  flags.DEFINE_string('norm', 'Linf', "'Linf' or 'L2'.")
  flags.DEFINE_string('version', 'standard', "'standard', 'plus' or 'custom' (with --attacks).")
  flags.DEFINE_list('attacks', [], "The stages of --version=custom, e.g. apgd-ce,fab-t.")
  flags.DEFINE_integer('examples', None, 'Evaluate the first N test examples (default: all).')
  flags.DEFINE_integer('bs', 250, 'Batch size of the compiled programs (rounded to the device count).')
  flags.DEFINE_integer('seed', 0, 'Random seed of the evaluation.')
  flags.DEFINE_integer('steps', 100, 'APGD and FAB iterations (100: the authors).')
  flags.DEFINE_integer('n_targets', 9, 'APGD-T and FAB-T targets (9: the authors; at most classes - 1).')
  flags.DEFINE_integer('queries', 5000, 'Square Attack queries (5000: the authors).')
  flags.DEFINE_string('json', None, 'Where to write the result of a single run (default RUN/autoattack.json).')
  flags.DEFINE_string('cpu_devices', 'auto', "XLA:CPU devices on a CPU-only host: 'auto' (one per core) or N.")
  flags.mark_flags_as_required(['workdir'])


RESULT = 'autoattack.json'


def _parse_eps(text: str) -> float:
  try:
    if '/' in text:
      num, den = text.split('/', 1)
      return float(num) / float(den)
    return float(text)
  except ValueError:
    raise ArregError(f'--eps must be a number or a fraction such as 8/255, got {text!r}') from None


def run_dirs(workdir: str) -> list[str]:
  """The finished run directories ``workdir`` names: itself if it is a run, else the finished runs under it."""
  if not os.path.isdir(workdir):
    raise ArregError(f'--workdir {workdir} does not exist; pass a run or sweep directory written by arreg_jax.main')
  own = os.path.join(workdir, rundir.CONFIG)
  if os.path.isfile(own) and 'strength' in rundir.read_json(own):
    if not rundir.is_finished(workdir):
      raise ArregError(f'{workdir} has not finished training (no {rundir.FINAL}); finish it with arreg_jax.main')
    return [workdir]
  runs = [path for path, _ in rundir.run_dirs(workdir)]
  if not runs:
    raise ArregError(f'{workdir} holds no run directories (subdirectories with a config.json); train a sweep there '
                     'first with python -m arreg_jax.main')
  done = [path for path in runs if rundir.is_finished(path)]
  if not done:
    raise ArregError(f'none of the {len(runs)} runs in {workdir} has finished training')
  return done


def evaluate_run(run_dir: str, *, eps: float | None, norm: str, version: str, attacks_to_run, examples, bs, seed,
                 steps, n_targets, queries, json_path: str | None) -> attacks.AutoAttackResult:
  """AutoAttack on one run's test set; writes and returns its result."""
  config, module, variables, ds, epoch = checkpoints.restore_run(run_dir)
  if eps is None:
    eps = float(config.eval.robustness.eps if config.eval.robustness.eps is not None else config.eval.pgd_eps)
  n = min(examples or ds.num_test, ds.num_test)
  images = np.asarray(augment.preprocess(None, jax.numpy.asarray(ds.test_images[:n]), kind=ds.augment, train=False))
  name = os.path.basename(os.path.normpath(run_dir))
  model = types.SimpleNamespace(apply_fn=models.inference_apply(module), params=variables)
  adversary = attacks.AutoAttack(model, norm=norm, eps=eps, version=version, attacks_to_run=attacks_to_run,
                                 seed=seed, steps=steps, n_targets=n_targets, queries=queries,
                                 verbose=distributed.is_main_process(),
                                 log=lambda line: print(f'[{name}] {line}', flush=True))
  _, result = adversary.run_standard_evaluation(images, np.asarray(ds.test_labels[:n], np.int32), bs=bs)
  result.settings.update({'run': name, 'epoch': epoch, 'examples': n, 'test_examples': ds.num_test})
  if distributed.is_main_process():
    rundir.write_json(json_path or os.path.join(run_dir, RESULT), result.to_dict())
  return result


def main(argv):
  if len(argv) > 1:
    raise ConfigError(f'unexpected arguments: {" ".join(argv[1:])}. Usage: python -m arreg_jax.evaluate '
                      '--workdir DIR [--eps 8/255] [--version standard]')
  cpu_devices = FLAGS.cpu_devices.strip().lower()
  if cpu_devices != 'auto' and not (cpu_devices.isdigit() and int(cpu_devices) >= 1):
    raise ConfigError(f"--cpu_devices must be 'auto' or an integer >= 1, got {FLAGS.cpu_devices!r}")
  host_devices.use_every_cpu_core('auto' if cpu_devices == 'auto' else int(cpu_devices))
  cli.quiet_orbax()
  try:
    runs = run_dirs(FLAGS.workdir)
    if FLAGS.json and len(runs) > 1:
      raise ArregError('--json names one file; with a sweep each run writes its own RUN/autoattack.json')
    eps = _parse_eps(FLAGS.eps) if FLAGS.eps is not None else None
    results = {}
    for run in runs:
      results[os.path.basename(run)] = evaluate_run(
          run, eps=eps, norm=FLAGS.norm, version=FLAGS.version, attacks_to_run=FLAGS.attacks,
          examples=FLAGS.examples, bs=FLAGS.bs, seed=FLAGS.seed, steps=FLAGS.steps, n_targets=FLAGS.n_targets,
          queries=FLAGS.queries, json_path=FLAGS.json)
  except (ValueError, TypeError) as e:  # the library's checks of ε, norm, version and the data
    raise ConfigError(str(e)) from e
  if distributed.is_main_process():
    print(_table(results), flush=True)


def _table(results: dict[str, attacks.AutoAttackResult]) -> str:
  stages = list(next(iter(results.values())).stages)
  head = ['run', 'eps'] + stages + ['seconds']
  rows = [[name, f'{r.eps:.5g}'] + [f'{100 * r.stages.get(s, float("nan")):.2f}' for s in stages]
          + [f'{r.seconds["total"]:.0f}'] for name, r in results.items()]
  widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
  fmt = lambda row: '  '.join(str(c).rjust(w) for c, w in zip(row, widths))
  return '\n'.join(['robust accuracy (%) after each stage:', fmt(head)] + [fmt(r) for r in rows])


def cli_main() -> None:
  """The program: defines the flags, runs :func:`main`, and ends the process (:func:`arreg_jax.cli.run`)."""
  define_flags()
  cli.run(main, on_interrupt='nothing is lost: run the same command again (each result file is written whole)')


if __name__ == '__main__':
  cli_main()
