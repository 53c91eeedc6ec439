r"""Gradient accumulation (``config.train.microbatches``): step time and XLA's planned memory per microbatch count.

Builds arreg_jax's real training program (``training.step.train_steps``, one step per call, as ``training.loop``
does) for a CIFAR-10-shaped setting — ResNet-20 by default, batch 128, L∞ PGD-10 at AR 8 (ε = 8/255, 10 steps of
2/255, random start), pad-4 crop + flip — on a device-resident set of random uint8 32×32×3 images, and for each
microbatch count k compiles it ahead of time, reads ``compiled.memory_analysis()`` (what
`arreg_jax.training.memory_plan` compares with the device's free memory: temporaries + outputs − donated, beyond the
resident arguments) and times ``--steps`` steps after one warm-up step.

  python benchmarks/microbatch_memory.py                         # resnet20, batch 128, k = 1, 2, 4, 2 timed steps
  python benchmarks/microbatch_memory.py --model resnet56 --batch 256 --out benchmarks/results/microbatch_memory_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from arreg_jax import models, presets, sharding  # noqa: E402
from arreg_jax.training import memory_plan, state as state_lib, step as step_lib  # noqa: E402
import machine as common  # noqa: E402  (machine description, JSON writer)

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'microbatch_memory_cpu.json')
MiB = 2 ** 20


def build(model: str, batch: int, k: int, num_train: int):
  """(compiled one-step program, its arguments) for ``k`` microbatches."""
  cfg = presets.cifar_paper('cifar10', model)
  cfg.train.batch_size = batch
  module = models.get_module(model, num_classes=10)
  _, variables = models.create(model, num_classes=10, key=jax.random.key(0), input_shape=(32, 32, 3))
  steps_per_epoch = num_train // batch
  mesh = sharding.make_mesh()
  rep = sharding.replicated(mesh)
  spec = step_lib.step_spec(cfg, module=module, adversarial=True, augment='cifar', steps_per_epoch=steps_per_epoch,
                            microbatches=k, batch_sharding=sharding.batch_sharding(mesh))
  state = jax.device_put(state_lib.init_state(variables, spec.optimizer), rep)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (num_train, 32, 32, 3), dtype=np.uint8), rep)
  labels = jax.device_put(rng.integers(0, 10, (num_train,)).astype(np.int32), rep)
  perm = jax.device_put(rng.permutation(num_train).astype(np.int32), rep)
  hyper = jax.device_put(step_lib.step_hyper(cfg, 8.0, jax.random.key(1)), rep)
  return (step_lib.train_steps.lower(spec, state, images, labels, perm, hyper).compile(),
          (state, images, labels, perm, hyper))


def measure(model: str, batch: int, k: int, steps: int, num_train: int) -> dict:
  t0 = time.perf_counter()
  program, (state, images, labels, perm, hyper) = build(model, batch, k, num_train)
  compile_s = time.perf_counter() - t0
  fp = memory_plan.footprint(program)
  state, m = program(state, images, labels, perm, hyper)  # warm-up
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, m = program(state, images, labels, perm, hyper)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  row = {'model': model, 'batch': batch, 'microbatches': k, 'microbatch_size': batch // k,
         'compile_s': round(compile_s, 2), 'step_s_median': round(statistics.median(times), 3),
         'step_s': [round(t, 3) for t in times], 'images_per_s': round(batch / statistics.median(times), 1),
         'loadavg_after': [round(x, 2) for x in os.getloadavg()]}
  if fp is not None:
    row.update(temp_bytes=fp.temp, argument_bytes=fp.argument, output_bytes=fp.output, alias_bytes=fp.alias,
               new_bytes=fp.new_bytes, peak_bytes=fp.peak_bytes)
  return row


def print_table(rows: list[dict]) -> None:
  print(f'{"k":>3} {"micro":>6} {"compile s":>10} {"step s":>8} {"img/s":>7} {"temp MiB":>9} {"new MiB":>8} '
        f'{"peak MiB":>9}')
  for r in rows:
    print(f'{r["microbatches"]:>3} {r["microbatch_size"]:>6} {r["compile_s"]:>10.1f} {r["step_s_median"]:>8.2f} '
          f'{r["images_per_s"]:>7.1f} {r.get("temp_bytes", 0) / MiB:>9.1f} {r.get("new_bytes", 0) / MiB:>8.1f} '
          f'{r.get("peak_bytes", 0) / MiB:>9.1f}')


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='resnet20')
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--microbatches', default='1,2,4')
  p.add_argument('--steps', type=int, default=2)
  p.add_argument('--num_train', type=int, default=1024, help='size of the device-resident random data set')
  p.add_argument('--out', default=DEFAULT_OUT)
  a = p.parse_args(argv)
  uptime_before = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
  rows = []
  for k in (int(x) for x in a.microbatches.split(',')):
    rows.append(measure(a.model, a.batch, k, a.steps, a.num_train))
    print_table(rows[-1:] if len(rows) > 1 else rows)
  print()
  print_table(rows)
  out = {'benchmark': 'microbatch_memory', 'date': datetime.datetime.now().isoformat(timespec='seconds'),
         'command': common.command_line(), 'device': common.device_info(), 'versions': common.versions(),
         'uptime_before': uptime_before,
         'uptime_after': subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip(),
         'setting': {'attack': 'linf PGD-10, eps 8/255, step 2/255, random start', 'augment': 'cifar',
                     'steps_per_call': 1, 'memory': 'compiled.memory_analysis() per device; new = temp + output '
                     '- alias (what arreg_jax.training.memory_plan compares with free memory), peak = new + argument'},
         'runs': [common.command_line()], 'results': rows}
  common.write_results(a.out, out, ('model', 'batch', 'microbatches'), merge=False)
  print(f'wrote {a.out}')


if __name__ == '__main__':
  main()
