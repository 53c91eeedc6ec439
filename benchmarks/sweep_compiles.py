r"""Compilations per sweep: how many XLA programs a sweep compiles, how long that takes, and the sweep's wall time.

Trains a sweep with ``arreg_jax.training.loop.train_sweep`` (training only: no analysis, no report) into a fresh
temporary work directory and counts, through ``jax.monitoring``, every backend compilation and the seconds spent
tracing, lowering and compiling. Members that share a model and an attack kind should share their compiled
programs (ε, the step size, the regularizer weights and the random keys are traced arguments of the training step,
``training.step.StepHyper``), so a sweep of n adversarially trained members should compile about as much as one.

  python benchmarks/sweep_compiles.py                                   # the embedded default, 1 epoch per member
  python benchmarks/sweep_compiles.py --epochs 8 --label after --merge  # the full default sweep (training part)
  python benchmarks/sweep_compiles.py --config configs/cifar10_resnet56.py:smoke --epochs 1

Prints a table (one row per member: wall seconds, compilations and compile seconds while it trained) and writes
``--out`` (JSON, with device, versions and command; ``--merge`` keeps the rows of other labels).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from arreg_jax import host_devices  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'sweep_compiles_cpu.json')
COMPILE_EVENTS = {
    '/jax/core/compile/jaxpr_trace_duration': 'trace_s',
    '/jax/core/compile/jaxpr_to_mlir_module_duration': 'lower_s',
    '/jax/core/compile/backend_compile_duration': 'compile_s',
}


class CompileMeter:
  """Counts backend compilations and sums tracing / lowering / compiling seconds (``jax.monitoring`` events)."""

  def __init__(self):
    import jax  # pylint: disable=g-import-not-at-top
    self.totals = collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **_):
    field = COMPILE_EVENTS.get(event)
    if field:
      self.totals[field] += duration
      if field == 'compile_s':
        self.totals['compiles'] += 1

  def snapshot(self) -> dict:
    return dict(self.totals)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--config', default='configs/mnist.py', help='config file[:arg], as for arreg_jax.main')
  p.add_argument('--epochs', type=int, default=1, help='config.train.epochs (0: the config\'s own)')
  p.add_argument('--cpu_devices', default='auto', help="XLA:CPU devices ('auto': one per core, the default)")
  p.add_argument('--label', default='', help='a name for this measurement (e.g. before / after a change)')
  p.add_argument('--out', default=DEFAULT_OUT)
  p.add_argument('--merge', action='store_true', help='keep the rows of other labels already in --out')
  args = p.parse_args(argv)
  host_devices.use_every_cpu_core(args.cpu_devices if args.cpu_devices == 'auto' else int(args.cpu_devices))

  import jax  # pylint: disable=g-import-not-at-top
  from arreg_jax import sweep  # pylint: disable=g-import-not-at-top
  from arreg_jax.training import loop, setup  # pylint: disable=g-import-not-at-top
  import machine as common  # pylint: disable=g-import-not-at-top  (machine description, JSON writer)

  path, _, arg = args.config.partition(':')
  spec = importlib.util.spec_from_file_location('sweep_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(*([arg] if arg else []))
  if args.epochs:
    config.train.epochs = args.epochs
    config.train.lr_boundaries = tuple(b for b in config.train.lr_boundaries if b < args.epochs)
  meter = CompileMeter()
  names = [m.name for m in sweep.members(config)]
  rows, last = [], {'t': time.perf_counter(), **meter.snapshot()}

  # One row per member: what happened between the end of the previous member and the end of this one.
  original = loop.train_member

  def timed_member(config, member, *a, **kw):
    out = original(config, member, *a, **kw)
    now, snap = time.perf_counter(), meter.snapshot()
    rows.append({'member': member.name, 'wall_s': round(now - last['t'], 2),
                 'compiles': snap.get('compiles', 0) - last.get('compiles', 0),
                 **{f: round(snap.get(f, 0.0) - last.get(f, 0.0), 2) for f in COMPILE_EVENTS.values()}})
    last.clear()
    last.update({'t': now, **snap})
    return out

  uptime_before = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
  loop.train_member = timed_member
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as workdir:
    loop.train_sweep(setup.setup_sweep(config, workdir))
  wall = time.perf_counter() - t0
  loop.train_member = original
  total = meter.snapshot()

  head = f'{"member":12} {"wall s":>8} {"compiles":>8} {"trace s":>8} {"lower s":>8} {"compile s":>9}'
  print(head)
  print('-' * len(head))
  for r in rows + [{'member': 'sweep', 'wall_s': round(wall, 2), 'compiles': total.get('compiles', 0),
                    **{f: round(total.get(f, 0.0), 2) for f in COMPILE_EVENTS.values()}}]:
    print(f'{r["member"]:12} {r["wall_s"]:8.2f} {r["compiles"]:8d} {r["trace_s"]:8.2f} {r["lower_s"]:8.2f} '
          f'{r["compile_s"]:9.2f}')

  result = {'label': args.label, 'config': args.config, 'epochs': config.train.epochs, 'members': names,
            'jax_devices': jax.device_count(), 'sweep_wall_s': round(wall, 2),
            'compiles': total.get('compiles', 0),
            **{f: round(total.get(f, 0.0), 2) for f in COMPILE_EVENTS.values()}, 'per_member': rows,
            'uptime_before': uptime_before,
            'uptime_after': subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}
  out = {'benchmark': 'sweep_compiles', 'date': datetime.datetime.now().isoformat(timespec='seconds'),
         'device': common.device_info(), 'versions': common.versions(),
         'notes': 'training only (training.loop.train_sweep); compiles = backend compilations '
                  '(/jax/core/compile/backend_compile_duration events); trace/lower/compile_s = seconds in '
                  'jaxpr tracing, MLIR lowering and XLA compilation; a member row covers the time from the end of '
                  'the previous member (the first also covers loading the data)',
         'runs': [common.command_line()], 'results': [{**result, 'command': common.command_line()}]}
  common.write_results(args.out, out, ('label', 'config', 'epochs', 'jax_devices'), args.merge)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
