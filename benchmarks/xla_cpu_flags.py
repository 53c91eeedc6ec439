"""Does an XLA:CPU flag speed up arreg_jax's PGD-10 on ResNet-56? One subprocess per flag set, same weights/inputs.

The attack of ``attack_throughput.py`` (jit of ``arreg_jax.attacks.pgd``, L∞, ε = 8/255, 10 steps of 2/255) on
ResNet-56 with random non-zero weights, timed in a fresh process for each ``XLA_FLAGS`` value: oneDNN and XNNPACK /
YNNPACK library fusions for convolutions are the candidates for closing the gap to PyTorch's oneDNN convolutions on
CPUs. Prints a table and writes JSON (device, versions, command); a changed checksum shows that a flag took effect.

  python benchmarks/xla_cpu_flags.py [--batch 32] [--repeats 4]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  # pylint: disable=g-import-not-at-top  (the JSON writer)

FLAG_SETS = [
    '',
    '--xla_cpu_use_onednn=true',
    '--xla_cpu_experimental_onednn_custom_call=true',
    '--xla_cpu_use_xnnpack=true',
    '--xla_cpu_experimental_xnn_fusion_type=individual_convolution',
    '--xla_cpu_experimental_ynn_fusion_type=individual_convolution',
    '--xla_cpu_experimental_ynn_fusion_type=individual_convolution,individual_dot',
    '--xla_cpu_enable_fast_math=true',
]

_CHILD = r'''
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from arreg_jax import attacks, models
batch, repeats = int(sys.argv[1]), int(sys.argv[2])
apply_fn, variables = models.create('resnet56', num_classes=10, key=jax.random.key(0), input_shape=(32, 32, 3))
rng = np.random.default_rng(0)
variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.05, a.dtype), variables)
x = jnp.asarray(rng.random((batch, 32, 32, 3)), jnp.float32)
y = jnp.asarray(rng.integers(0, 10, batch), jnp.int32)
run = jax.jit(lambda v, x, y, k: attacks.pgd(lambda z: apply_fn(v, z, train=False), x, y, k, eps=8 / 255,
                                             step_size=2 / 255, steps=10))
t = time.perf_counter(); out = run(variables, x, y, jax.random.key(1)).block_until_ready()
first = time.perf_counter() - t
times = []
for i in range(repeats):
  t = time.perf_counter(); run(variables, x, y, jax.random.key(1)).block_until_ready()
  times.append(time.perf_counter() - t)
print('RESULT', json.dumps({'first_call_s': first, 'times_s': times, 'checksum': float(jnp.abs(out - x).sum())}))
'''


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=4)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                                    'xla_cpu_flags_cpu.json'))
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  rows = []
  print(f'| XLA_FLAGS | best img/s | median img/s | first call (s) | checksum |\n|---|---:|---:|---:|---:|')
  for flags in FLAG_SETS:
    env = {**os.environ, 'XLA_FLAGS': flags, 'JAX_PLATFORMS': 'cpu'}
    proc = subprocess.run([sys.executable, '-c', _CHILD, str(args.batch), str(args.repeats)], env=env,
                          capture_output=True, text=True, timeout=900)
    line = [l for l in proc.stdout.splitlines() if l.startswith('RESULT ')]
    if proc.returncode or not line:
      rows.append({'xla_flags': flags, 'error': proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else
                   f'exit {proc.returncode}'})
      print(f'| `{flags or "(none)"}` | error: {rows[-1]["error"][:80]} | | | |', flush=True)
      continue
    r = json.loads(line[0][len('RESULT '):])
    times = sorted(r['times_s'])
    r.update(xla_flags=flags, best_images_per_s=args.batch / times[0],
             median_images_per_s=args.batch / times[len(times) // 2])
    rows.append(r)
    print(f'| `{flags or "(none)"}` | {r["best_images_per_s"]:.1f} | {r["median_images_per_s"]:.1f} | '
          f'{r["first_call_s"]:.1f} | {r["checksum"]:.4f} |', flush=True)
  report = {
      'benchmark': 'xla_cpu_flags', 'model': 'resnet56', 'attack': 'linf pgd-10, eps 8/255, step 2/255',
      'batch': args.batch, 'repeats': args.repeats,
      'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
      'device': {'platform': jax.devices()[0].platform, 'device_kind': jax.devices()[0].device_kind,
                 'cpu_count': os.cpu_count(), 'machine': platform.machine()},
      'versions': {'jax': jax.__version__, 'python': platform.python_version()},
      'load_average_after': list(os.getloadavg()), 'timestamp': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      'results': rows,
  }
  machine.write_results(args.out, report)
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
