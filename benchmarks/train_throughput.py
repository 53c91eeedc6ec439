r"""Adversarial-training throughput of arreg_jax: ResNet-56, L∞ PGD-10, CIFAR-10-sized data, on the current device.

Runs arreg_jax's real training program — ``training.step.train_steps`` as ``training.loop.build_run`` builds it from
``configs/cifar10_resnet56.py`` (batch 256, SGD momentum, pad-4 crop + flip on the device, PGD-10 at AR 8: ε = 8/255,
10 steps of 2/255, random start) — on a device-resident uint8 data set of 50,000 random 32×32×3 images, and reports
images/s, seconds per 50k-image epoch (training steps only, no evaluation) and the achieved FLOP/s against the
device's measured matmul peak, for ``precision`` float32 and bfloat16 (``config.precision``).

FLOPs of one training step, counted two ways (both printed):
  * XLA: ``jax.jit(f).lower(...).compile().cost_analysis()['flops']`` of the step's parts compiled on their own —
    one PGD step (forward + input gradient of the summed cross-entropy) and the parameter update (forward + backward
    of the mean cross-entropy) — combined as ``steps × pgd_step + update``. The whole step's own cost analysis is
    printed too: XLA's analysis counts a loop body once (``lax.fori_loop`` of the attack, ``lax.scan`` of
    ``steps_per_call``), so it undercounts a looped program; the script reports how its figure decomposes.
  * analytic: multiply-accumulates of every convolution and of the dense head from the architecture
    (H_out·W_out·C_in·C_out·k² per conv), M per image; a PGD step costs 2M (forward, input gradient), the update
    3M − M_stem (forward, weight gradients, activation gradients except the stem's input gradient); FLOPs = 2 × MACs.
    Element-wise work (ReLU, augmentation, the optimizer) is not counted. ResNet-56: M = 125.5 M MACs per image.
    XLA does not count kernel taps that fall on the 'SAME' zero padding (8% of them here, most on the 8×8 maps), so
    the count is also given without them (M = 113.9 M); XLA's figure lands ~1.5% above that one (it also counts
    element-wise operations). The achieved FLOP/s uses XLA's count, i.e. useful work only.
Peak: the median FLOP/s of an n×n by n×n ``jnp.dot`` (float32; bfloat16 inputs with a float32 result), and, if
PyTorch is installed, of ``torch.mm`` on the same sizes for reference.

  python benchmarks/train_throughput.py --wait_quiet 20    # CPU defaults: batch 256, 2 timed steps, f32 and bf16
  python benchmarks/train_throughput.py --steps 20 --steps_per_call 10 \
      --out benchmarks/results/train_throughput_gpu.json    # a GPU run
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from arreg_jax import attacks, models, presets, sharding  # noqa: E402
from arreg_jax.training import state as state_lib, step as step_lib  # noqa: E402
import machine as common  # noqa: E402  (machine description, CPU-share meter, JSON writer)

EPOCH_IMAGES = 50_000
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'train_throughput_cpu.json')


def resnet_macs(depth: int = 56, num_classes: int = 10, size: int = 32,
                valid_taps_only: bool = False) -> tuple[int, int]:
  """(multiply-accumulates of one forward pass of the CIFAR ResNet-(6n+2), of its stem conv alone), per image.

  Every 3×3 convolution costs H_out·W_out·C_in·C_out·9 MACs; with ``valid_taps_only``, the taps that fall on the
  'SAME' zero padding are left out (what XLA's cost analysis counts), i.e. 9·H_out·W_out becomes
  (Σ over output rows of in-bounds kernel rows)².
  """
  def taps(s_in, stride):
    s_out = -(-s_in // stride)
    if not valid_taps_only:
      return s_out * s_out * 9
    total = max((s_out - 1) * stride + 3 - s_in, 0)
    lo = total // 2
    per_dim = sum(sum(1 for k in range(3) if 0 <= o * stride - lo + k < s_in) for o in range(s_out))
    return per_dim * per_dim

  n = (depth - 2) // 6
  stem = taps(size, 1) * 3 * 16
  macs, cin, s = stem, 16, size
  for stage, c in enumerate((16, 32, 64)):
    for block in range(n):
      stride = 2 if (stage > 0 and block == 0) else 1
      s_out = -(-s // stride)
      macs += taps(s, stride) * cin * c + taps(s_out, 1) * c * c  # conv1 (maybe strided), conv2
      cin, s = c, s_out
  return macs + 64 * num_classes, stem


def _flops(compiled) -> float:
  ca = compiled.cost_analysis()
  if isinstance(ca, (list, tuple)):
    ca = ca[0]
  return float(ca.get('flops', float('nan')))


def matmul_peak(n: int, repeats: int) -> dict[str, Any]:
  """Median FLOP/s of n×n matmuls: JAX float32 and bfloat16 (float32 result); torch.mm if available."""
  out = {'n': n}
  key = jax.random.key(0)
  a = jax.random.normal(key, (n, n), jnp.float32)
  b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), jnp.float32)
  for tag, dt in (('jax_f32', jnp.float32), ('jax_bf16', jnp.bfloat16)):
    f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    x, y = a.astype(dt), b.astype(dt)
    jax.block_until_ready(f(x, y))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      jax.block_until_ready(f(x, y))
      times.append(time.perf_counter() - t0)
    out[tag] = 2 * n ** 3 / statistics.median(times)
  try:
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(os.cpu_count() or 1)
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    for tag, dt in (('torch_f32', torch.float32), ('torch_bf16', torch.bfloat16)):
      x = torch.randn(n, n, device=dev).to(dt)
      y = torch.randn(n, n, device=dev).to(dt)
      torch.mm(x, y)
      times = []
      for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(x, y)
        if dev == 'cuda':
          torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
      out[tag] = 2 * n ** 3 / statistics.median(times)
  except ImportError:
    pass
  return out


def count_flops(module, variables: dict, batch: int, steps: int, depth: int = 56, num_classes: int = 10
                ) -> dict[str, Any]:
  """XLA's and the analytic FLOP counts of one PGD-``steps`` adversarial training step of ``batch`` images of the
  CIFAR ResNet-``depth`` ``module`` (32×32×3 inputs)."""
  x = jnp.zeros((batch, 32, 32, 3), jnp.float32)
  y = jnp.zeros((batch,), jnp.int32)
  params = variables['params']

  def fwd(p, x):
    return module.apply({'params': p}, x, train=True)

  def pgd_step(p, x):  # one attack step's work: forward and input gradient of the summed CE
    return jax.grad(lambda x: attacks.cross_entropy_sum(lambda z: fwd(p, z), x, y))(x)

  def update(p, x):
    return jax.value_and_grad(lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(fwd(p, x), y)))(p)

  xla = {name: _flops(jax.jit(f).lower(params, x).compile())
         for name, f in (('forward', fwd), ('pgd_step', pgd_step), ('update', update))}
  xla['step'] = steps * xla['pgd_step'] + xla['update']
  out = {'xla': xla}
  for tag, valid in (('analytic', False), ('analytic_valid_taps', True)):
    macs, stem = resnet_macs(depth, num_classes, valid_taps_only=valid)
    a = {'forward': 2 * macs * batch, 'pgd_step': 4 * macs * batch, 'update': 2 * (3 * macs - stem) * batch}
    a['step'] = steps * a['pgd_step'] + a['update']
    out[tag] = a
    out[f'macs_per_image_forward_{tag}'] = macs
  out['xla_over_analytic_step'] = xla['step'] / out['analytic']['step']
  out['xla_over_analytic_valid_taps_step'] = xla['step'] / out['analytic_valid_taps']['step']
  return out


def bench_precision(precision: str, args, images, labels, mesh) -> dict[str, Any]:
  config = presets.cifar_paper('cifar10', 'resnet56')
  config.precision = precision
  config.train.batch_size = args.batch_size
  strength = float(args.strength)
  batch = args.batch_size
  steps_per_epoch = EPOCH_IMAGES // batch
  module = models.get_module('resnet56', num_classes=10, dtype=models.compute_dtype(config.precision))
  _, variables = models.create('resnet56', num_classes=10, key=jax.random.key(0))
  k = args.steps_per_call
  spec = step_lib.step_spec(config, module=module, adversarial=step_lib.is_adversarial(config, strength),
                            augment='cifar', steps_per_epoch=steps_per_epoch,
                            batch_sharding=sharding.batch_sharding(mesh), steps_per_call=k)
  state = jax.device_put(state_lib.init_state(variables, spec.optimizer), sharding.replicated(mesh))
  hyper = jax.device_put(step_lib.step_hyper(config, strength, jax.random.key(1)), sharding.replicated(mesh))
  perm = jax.device_put(jax.random.permutation(jax.random.key(2), EPOCH_IMAGES).astype(jnp.int32),
                        sharding.replicated(mesh))
  print(f'\n== {precision}: batch {batch}, {k} step(s) per call, PGD-{config.attack.steps} at ε = {strength:g}/255',
        flush=True)
  t0 = time.perf_counter()
  lowered = step_lib.train_steps.lower(spec, state, images, labels, perm, hyper)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  whole_step_xla_flops = _flops(compiled) / k
  t0 = time.perf_counter()
  state, m = compiled(state, images, labels, perm, hyper)
  jax.block_until_ready(m)
  warm_s = time.perf_counter() - t0
  print(f'  compiled in {compile_s:.1f} s; first call {warm_s:.1f} s', flush=True)
  calls = max(1, -(-args.steps // k))
  times, shares, waited = [], [], 0.0
  for _ in range(calls):
    waited += common.wait_for_quiet(args.wait_quiet) if args.wait_quiet else 0.0
    with common.CpuShare() as share:
      state, m = compiled(state, images, labels, perm, hyper)
      jax.block_until_ready(m)
    times.append(share.wall)
    shares.append(share.others)
    print(f'  call of {k} step(s): {times[-1]:.2f} s (other processes: '
          f'{"?" if share.others is None else format(share.others, ".0%")} of the CPU)', flush=True)
  others = None if None in shares else sum(o * t for o, t in zip(shares, times)) / sum(times)
  loss = float(m['loss_sum'] / m['count'])
  step_s = statistics.median(times) / k
  ips = batch / step_s
  flops = count_flops(module, variables, batch, int(config.attack.steps))
  row = {
      'precision': precision, 'batch_size': batch, 'steps_per_call': k, 'timed_steps': calls * k,
      'times_per_call_s': [round(t, 4) for t in times], 'compile_s': round(compile_s, 2),
      'first_call_s': round(warm_s, 2), 'seconds_per_step': round(step_s, 4), 'images_per_s': round(ips, 3),
      'seconds_per_50k_epoch': round(EPOCH_IMAGES / ips, 1), 'last_loss': loss,
      'flops_per_step_xla': flops['xla']['step'], 'flops_per_step_analytic': flops['analytic']['step'],
      'flops_parts_xla': flops['xla'], 'flops_parts_analytic': flops['analytic'],
      'flops_parts_analytic_valid_taps': flops['analytic_valid_taps'],
      'xla_over_analytic': round(flops['xla_over_analytic_step'], 4),
      'xla_over_analytic_valid_taps': round(flops['xla_over_analytic_valid_taps_step'], 4),
      'whole_program_cost_analysis_flops_per_step': whole_step_xla_flops,
      'achieved_flops_per_s': flops['xla']['step'] / step_s,
      'loadavg_end': [round(x, 2) for x in os.getloadavg()],
      'other_processes_cpu_share': None if others is None else round(others, 3), 'waited_for_quiet_s': round(waited, 1),
  }
  print(f'  {ips:.2f} img/s, {step_s:.2f} s/step, {row["seconds_per_50k_epoch"]:.0f} s per 50k-image epoch; '
        f'loss {loss:.3f}; other processes used {others if others is not None else float("nan"):.0%} '
        'of the CPU meanwhile', flush=True)
  print(f'  FLOPs/step: XLA {flops["xla"]["step"] / 1e12:.3f} T (= {config.attack.steps} × pgd_step '
        f'{flops["xla"]["pgd_step"] / 1e9:.1f} G + update {flops["xla"]["update"] / 1e9:.1f} G), analytic conv+dense '
        f'{flops["analytic"]["step"] / 1e12:.3f} T (XLA/analytic {flops["xla_over_analytic_step"]:.3f}; without the taps '
        f'on zero padding {flops["analytic_valid_taps"]["step"] / 1e12:.3f} T, XLA/that '
        f'{flops["xla_over_analytic_valid_taps_step"]:.3f}); '
        f'whole program\'s own cost analysis {whole_step_xla_flops / 1e12:.3f} T (loop bodies counted once)', flush=True)
  return row


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--batch_size', type=int, default=256)
  p.add_argument('--steps', type=int, default=2, help='timed training steps per precision (after one warm-up call)')
  p.add_argument('--steps_per_call', type=int, default=1, help='config.train.steps_per_call (lax.scan)')
  p.add_argument('--precisions', default='float32,bfloat16', help='comma-separated: float32, bfloat16')
  p.add_argument('--strength', type=float, default=8.0, help='AR strength: ε = strength/255')
  p.add_argument('--matmul_n', type=int, default=4096, help='size of the matmul that measures the peak')
  p.add_argument('--matmul_repeats', type=int, default=5)
  p.add_argument('--out', default=DEFAULT_OUT)
  p.add_argument('--merge', action='store_true', help='keep results of other configurations already in --out')
  p.add_argument('--wait_quiet', type=float, default=0.0,
                 help='before each timed call, wait up to this many seconds for other processes to use < 25%% of '
                      'the CPU (a shared machine)')
  args = p.parse_args(argv)
  precisions = [q for q in args.precisions.split(',') if q]
  for q in precisions:
    if q not in ('float32', 'bfloat16'):
      p.error(f'unknown precision {q!r}')

  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  print(f'devices: {jax.devices()}; CPU {common.cpu_model()} × {os.cpu_count()}; load average {os.getloadavg()}',
        flush=True)
  print(f'measuring the matmul peak ({args.matmul_n}×{args.matmul_n})…', flush=True)
  peak = matmul_peak(args.matmul_n, args.matmul_repeats)
  print('  ' + ', '.join(f'{k} {v / 1e9:.1f} GFLOP/s' for k, v in peak.items() if k != 'n'), flush=True)

  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (EPOCH_IMAGES, 32, 32, 3), dtype=np.uint8), sharding.replicated(mesh))
  labels = jax.device_put(rng.integers(0, 10, EPOCH_IMAGES).astype(np.int32), sharding.replicated(mesh))
  rows = []
  for q in precisions:
    row = bench_precision(q, args, images, labels, mesh)
    ref = peak['jax_bf16' if q == 'bfloat16' else 'jax_f32']
    row['matmul_peak_flops_per_s'] = ref
    row['fraction_of_peak'] = round(row['achieved_flops_per_s'] / ref, 4)
    row['fraction_of_f32_peak'] = round(row['achieved_flops_per_s'] / peak['jax_f32'], 4)
    rows.append(row)

  print('\nprecision  batch   img/s  s/step  s/50k-epoch  TFLOP/step(XLA)  achieved GFLOP/s  '
        'of matmul peak  others CPU')
  for r in rows:
    others = r['other_processes_cpu_share']
    print(f'{r["precision"]:9} {r["batch_size"]:>6} {r["images_per_s"]:7.2f} {r["seconds_per_step"]:7.2f} '
          f'{r["seconds_per_50k_epoch"]:12.0f} {r["flops_per_step_xla"] / 1e12:16.3f} '
          f'{r["achieved_flops_per_s"] / 1e9:17.1f} {100 * r["fraction_of_peak"]:14.1f}% '
          f'{"—" if others is None else format(others, "10.0%")}')
  out = {
      'benchmark': 'train_throughput',
      'what': ('ResNet-56 (Fixup, no BN), CIFAR-10-sized data (50k uint8 32x32x3 on the device), L∞ PGD-10 '
               'adversarial training with training.step.train_steps (configs/cifar10_resnet56.py); epoch time '
               '= 50000 / images_per_s (training steps only)'),
      'flop_counting': ('flops_per_step_xla = attack.steps × cost_analysis(forward + input grad) + '
                        'cost_analysis(forward + param grads), each compiled alone; flops_per_step_analytic = '
                        '2 × conv/dense MACs × (2 × steps + 3) − 2 × stem MACs; achieved = XLA count / median '
                        'seconds per step; whole_program_cost_analysis counts loop bodies once'),
      'matmul_peak_flops_per_s': peak,
      'device': common.device_info(),
      'versions': common.versions(),
      'runs': [{'command': common.command_line(), 'started_utc': started,
                'loadavg_at_end': [round(x, 2) for x in os.getloadavg()]}],
      'results': rows,
  }
  common.write_results(args.out, out, ('precision', 'batch_size', 'steps_per_call'), args.merge)
  print('results in ' + args.out)


if __name__ == '__main__':
  main()
