r"""PGD-10 on a small CNN written with ``flax.linen.Conv`` + ``nn.max_pool`` against the same network written with
arreg_jax's drop-ins ``models.Conv`` + ``models.max_pool_2x2`` (identical parameters and forward values).

The network is the embedded default's small CNN (conv 3×3×16 → ReLU → 2×2 max-pool → conv 3×3×32 → ReLU → pool →
dense 128 → 10) on 28×28×1 inputs; the attack ``attacks.pgd`` (ε = 0.1, 10 steps of 0.025) in one ``jax.jit`` on a
batch of ``--batch`` random images, one XLA:CPU device. Both models get the same weights (the drop-ins load
``nn.Conv``'s parameters as they are); the script checks that their logits agree, then reports images/s of the best
of ``--repeats`` calls after one warm-up call.

  python benchmarks/fast_layers.py
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=1')
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import machine  # noqa: E402
from arreg_jax import attacks, models  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'fast_layers_cpu.json')


class PlainCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for c in (16, 32):
      x = nn.max_pool(nn.relu(nn.Conv(c, (3, 3))(x)), (2, 2), strides=(2, 2))
    return nn.Dense(10)(nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1))))


class FastCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    for c in (16, 32):
      x = models.max_pool_2x2(nn.relu(models.Conv(c, (3, 3), use_bias=True)(x)))
    return nn.Dense(10)(nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1))))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--out', default=DEFAULT_OUT)
  args = p.parse_args(argv)
  x = jnp.asarray(np.random.default_rng(0).random((args.batch, 28, 28, 1), dtype=np.float32))
  variables = PlainCNN().init(jax.random.key(0), x[:1])  # the drop-ins take nn.Conv's parameters as they are
  logits = {m.__name__: m().apply(variables, x) for m in (PlainCNN, FastCNN)}
  gap = float(jnp.abs(logits['PlainCNN'] - logits['FastCNN']).max())
  assert gap < 1e-4, gap
  y = jnp.argmax(logits['PlainCNN'], -1)
  rows = []
  for m in (PlainCNN, FastCNN):
    run = jax.jit(lambda v, x, y, m=m: attacks.pgd(lambda z: m().apply(v, z), x, y, jax.random.key(0), eps=0.1,
                                                   step_size=0.025, steps=10))
    run(variables, x, y).block_until_ready()
    times, others = [], []
    for _ in range(args.repeats):
      with machine.CpuShare() as share:
        run(variables, x, y).block_until_ready()
      times.append(share.wall)
      others.append(share.others)
    rows.append({'model': m.__name__, 'layers': 'nn.Conv + nn.max_pool' if m is PlainCNN else
                 'models.Conv + models.max_pool_2x2', 'batch': args.batch,
                 'images_per_s': round(args.batch / min(times), 1), 'seconds': [round(t, 4) for t in times],
                 'others_cpu_share': others})
    print(f'{rows[-1]["layers"]:36s} PGD-10, batch {args.batch}: {rows[-1]["images_per_s"]:8.1f} img/s', flush=True)
  speedup = rows[1]['images_per_s'] / rows[0]['images_per_s']
  print(f'speed-up of the drop-ins: {speedup:.2f}x (logits agree to {gap:.1e})')
  out = {'benchmark': 'PGD-10 with nn.Conv + nn.max_pool vs models.Conv + models.max_pool_2x2 (small CNN, MNIST size)',
         'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
         'command': machine.command_line(), 'device': machine.device_info(), 'versions': machine.versions(),
         'runs': [machine.command_line()], 'logits_max_abs_diff': gap, 'speedup': round(speedup, 2),
         'results': rows}
  machine.write_results(args.out, out, key_fields=('model', 'batch'), merge=False)


if __name__ == '__main__':
  main()
