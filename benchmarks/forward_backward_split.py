"""Where arreg_jax loses to PyTorch on a CPU: the forward pass vs the input-gradient pass of ResNet-56.

Times, for the same weights and inputs (``torch_models.build`` copies the Flax weights), one forward pass and one
forward + input-gradient pass (the gradient of the batch-summed cross-entropy with respect to the images — one PGD
step without the update) in JAX (jitted; the custom-VJP convolution of ``arreg_jax.models.layers``) and in PyTorch
(eager, weights frozen). The best of ``--repeats`` calls after a warm-up. Prints a table; writes JSON.

  python benchmarks/forward_backward_split.py [--batch 32] [--repeats 10]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import machine  # noqa: E402  # pylint: disable=g-import-not-at-top  (the JSON writer)

from arreg_jax import models  # pylint: disable=g-import-not-at-top


def _best(fn, repeats: int) -> float:
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return min(times)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--batch', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                                    f'forward_backward_split_{jax.devices()[0].platform}.json'))
  args = parser.parse_args(argv)
  import torch  # pylint: disable=g-import-not-at-top
  import torch_models  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)

  b = args.batch
  apply_fn, variables = models.create('resnet56', num_classes=10, key=jax.random.key(0), input_shape=(32, 32, 3))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda a: jnp.asarray(rng.standard_normal(a.shape) * 0.05, a.dtype), variables)
  x = jnp.asarray(rng.random((b, 32, 32, 3)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, b), jnp.int32)

  fwd = jax.jit(lambda v, x: apply_fn(v, x, train=False))

  def loss(x, v, y):
    return -jnp.sum(jax.nn.log_softmax(apply_fn(v, x, train=False))[jnp.arange(b), y])

  grad = jax.jit(jax.grad(loss))
  jax_fwd = _best(lambda: fwd(variables, x), args.repeats)
  jax_grad = _best(lambda: grad(x, variables, y), args.repeats)

  net = torch_models.build('resnet56', 10, jax.device_get(variables))
  for p in net.parameters():
    p.requires_grad_(False)
  xt = torch.from_numpy(np.array(x).transpose(0, 3, 1, 2).copy())
  yt = torch.from_numpy(np.array(y)).long()

  def t_fwd():
    with torch.no_grad():
      return net(xt)

  def t_grad():
    xx = xt.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(net(xx), yt, reduction='sum').backward()
    return xx.grad

  torch_fwd = _best(t_fwd, args.repeats)
  torch_grad = _best(t_grad, args.repeats)
  rows = {'jax': {'forward_ms': 1e3 * jax_fwd, 'forward_input_grad_ms': 1e3 * jax_grad},
          'torch': {'forward_ms': 1e3 * torch_fwd, 'forward_input_grad_ms': 1e3 * torch_grad}}
  print(f'ResNet-56, batch {b}, best of {args.repeats}\n')
  print('| | forward (ms) | forward + input gradient (ms) | gradient part (ms) |\n|---|---:|---:|---:|')
  for name, r in rows.items():
    r['input_grad_part_ms'] = r['forward_input_grad_ms'] - r['forward_ms']
    print(f"| {name} | {r['forward_ms']:.1f} | {r['forward_input_grad_ms']:.1f} | {r['input_grad_part_ms']:.1f} |")
  ratio = {k: rows['jax'][k] / rows['torch'][k] for k in rows['jax']}
  print('| JAX ÷ PyTorch | ' + ' | '.join(f'{ratio[k]:.2f}×' for k in ('forward_ms', 'forward_input_grad_ms',
                                                                         'input_grad_part_ms')) + ' |')
  report = {'benchmark': 'forward_backward_split', 'model': 'resnet56', 'batch': b, 'repeats': args.repeats,
            'results': rows, 'jax_over_torch': ratio,
            'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
            'device': {'platform': jax.devices()[0].platform, 'device_kind': jax.devices()[0].device_kind,
                       'cpu_count': os.cpu_count(), 'machine': platform.machine()},
            'versions': {'jax': jax.__version__, 'torch': torch.__version__, 'python': platform.python_version()},
            'load_average_after': list(os.getloadavg()), 'timestamp': time.strftime('%Y-%m-%dT%H:%M:%S%z')}
  machine.write_results(args.out, report)
  print(f'\nwrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
