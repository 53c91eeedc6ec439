r"""Benchmark of the spectral toolkit: clipping every conv layer of ResNet-56 (32×32) and WRN-50-2 (56×56).

Compares, on the current JAX device:
  * ``batched``: ``spectral.clip_params`` — all conv layers in one compiled call, layers of equal
    (kernel shape, input size, stride) vmapped together;
  * ``per_layer``: a Python loop of ``spectral.clip_conv_kernel`` calls, one compiled call per layer (compiled once
    per distinct shape);
  * ``svs_batched``: ``spectral.layer_singular_values``' compiled call (all spectra, no clipping);
  * ``dense_svd``: the smallest conv layer's operator materialized as a dense matrix and decomposed with
    ``np.linalg.svd`` (the brute-force alternative), with the largest deviation of the FFT spectrum from it;
  * ``eigh_vs_svd`` (``--eigh``): per-frequency singular values from ``eigh(FᴴF)`` instead of ``svd(F)`` — time and
    the error of the smallest singular values (squaring the condition number loses them).

Timings are the median of ``--repeats`` runs after a warm-up; compile time is reported separately (ahead-of-time
lowering + compilation for the single-program paths; first pass minus the median for the per-layer loop). With
``--epoch_seconds`` (the measured wall time of one training epoch on the same device, which this script does not
guess) the cost of clipping all ResNet-56 layers once per epoch (the paper's schedule) is reported as a fraction.

  python benchmarks/spectral_clip.py                       # ResNet-56 only
  python benchmarks/spectral_clip.py --wrn --repeats 3     # and WRN-50-2 (slow on CPU)
  python benchmarks/spectral_clip.py --epoch_seconds 812.5
  python benchmarks/spectral_clip.py --epoch_from benchmarks/results/train_throughput_cpu.json   # same device
"""

from __future__ import annotations

import os

# jaxlib's CPU LAPACK kernels call the OpenBLAS bundled with scipy, which by default starts one thread per core on
# top of XLA's own pool; measured here, that oversubscription makes the batched SVDs 3-30x slower and erratic.
# Must be set before numpy/scipy load OpenBLAS; an explicit setting in the environment wins.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import machine  # noqa: E402  (the JSON writer)
from arreg_jax import spectral
from arreg_jax.spectral import conv as spectral_conv
from arreg_jax.spectral import model as spectral_model

# cifar_cnn (three conv layers): the smallest model with convs, for quick checks (benchmarks/gpu_suite.py --tiny).
_INPUT_SHAPES = {'cifar_cnn': (1, 32, 32, 3), 'resnet20': (1, 32, 32, 3), 'resnet56': (1, 32, 32, 3),
                 'wrn50_2': (1, 56, 56, 3)}
_NUM_CLASSES = {'cifar_cnn': 10, 'resnet20': 10, 'resnet56': 10, 'wrn50_2': 200}


def _block(tree):
  return jax.block_until_ready(tree)


def _median_time(fn: Callable[[], Any], repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    _block(fn())
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def _model_layers(name: str) -> tuple[dict[str, Any], tuple[spectral.LayerSpec, ...], str]:
  """Conv specs of the real model (or, if arreg_jax.models is unavailable, of its exact shapes), random kernels.

  The model is traced abstractly (``jax.eval_shape`` of its init), which is all ``layer_specs`` needs; kernels are
  random He-scaled normals (numpy's), because Fixup starts half of the convs at zero, which would make clipping
  trivial.
  """
  try:
    from arreg_jax import models  # pylint: disable=import-outside-toplevel
    module = models.get_module(name, num_classes=_NUM_CLASSES[name])
    shape = jax.ShapeDtypeStruct(_INPUT_SHAPES[name], jnp.float32)
    abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), shape)
    specs = spectral.layer_specs(module, abstract, _INPUT_SHAPES[name])
    source = f'arreg_jax.models.get_module({name!r})'
  except ImportError:
    specs = _synthetic_specs(name)
    source = 'synthetic shapes (arreg_jax.models unavailable)'
  specs = tuple(s for s in specs if s.kind == 'conv')
  rng = np.random.default_rng(1)  # numpy: jax.random would compile a program per kernel shape first
  conv_params: dict[str, Any] = {}
  for s in specs:
    fan_in = int(np.prod(s.kernel_shape[:-1]))
    kernel = jnp.asarray(rng.standard_normal(s.kernel_shape) * np.sqrt(2.0 / fan_in), jnp.float32)
    node = conv_params
    for p in s.path[:-1]:
      node = node.setdefault(p, {})
    node[s.path[-1]] = kernel
  return conv_params, specs, source


def _synthetic_specs(name: str) -> tuple[spectral.LayerSpec, ...]:
  """Layer shapes of the paper's models (SPEC §2), for when the models package is not there."""
  specs = []
  if name == 'resnet56':
    specs.append(spectral.LayerSpec(('conv_init', 'kernel'), 'conv', (3, 3, 3, 16), (1, 1), (32, 32)))
    cin, hw = 16, 32
    for stage, feat in enumerate((16, 32, 64)):
      for block in range(9):
        s = 2 if (stage > 0 and block == 0) else 1
        p = f'stage{stage + 1}_block{block + 1}'
        specs.append(spectral.LayerSpec((p, 'conv1', 'kernel'), 'conv', (3, 3, cin, feat), (s, s), (hw, hw)))
        hw //= s
        specs.append(spectral.LayerSpec((p, 'conv2', 'kernel'), 'conv', (3, 3, feat, feat), (1, 1), (hw, hw)))
        cin = feat
  else:
    specs.append(spectral.LayerSpec(('conv_init', 'kernel'), 'conv', (3, 3, 3, 64), (1, 1), (56, 56)))
    cin, hw = 64, 56
    for g, units in enumerate((3, 4, 6, 3)):
      planes = 64 * 2 ** g
      width, out = 2 * planes, 4 * planes
      for u in range(units):
        s = 2 if (g > 0 and u == 0) else 1
        p = f'group{g + 1}_unit{u + 1}'
        specs.append(spectral.LayerSpec((p, 'conv1', 'kernel'), 'conv', (1, 1, cin, width), (1, 1), (hw, hw)))
        specs.append(spectral.LayerSpec((p, 'conv2', 'kernel'), 'conv', (3, 3, width, width), (s, s), (hw, hw)))
        specs.append(spectral.LayerSpec((p, 'conv3', 'kernel'), 'conv', (1, 1, width, out), (1, 1), (hw // s, hw // s)))
        if s != 1 or cin != out:
          specs.append(spectral.LayerSpec((p, 'shortcut_conv', 'kernel'), 'conv', (1, 1, cin, out), (s, s), (hw, hw)))
        hw //= s
        cin = out
  return tuple(specs)


def _kernel(params, spec):
  node = params
  for p in spec.path:
    node = node[p]
  return node


def bench_model(name: str, args) -> dict[str, Any]:
  params, specs, source = _model_layers(name)
  groups = spectral_model._group_specs(specs)  # pylint: disable=protected-access
  c = jnp.float32(args.max_sv)
  print(f'\n== {name}: {len(specs)} conv layers in {len(groups)} groups of equal shape ({source})', flush=True)
  result: dict[str, Any] = {'source': source, 'num_conv_layers': len(specs), 'num_groups': len(groups),
                            'num_singular_values': int(sum(s.num_singular_values for s in specs)),
                            'rounds': args.rounds, 'max_sv': args.max_sv, 'timings': {}}
  timings = result['timings']

  clip_batched = lambda: spectral.clip_params(params, specs, c, rounds=args.rounds)

  def clip_loop():
    return [spectral.clip_conv_kernel(_kernel(params, s), s.input_hw, c, layout='HWIO', rounds=args.rounds,
                                      stride=s.stride)
            for s in specs]

  svs_fn = spectral_model._compiled_svs(specs)  # pylint: disable=protected-access
  spectra = lambda: svs_fn(params)

  # Compile times: ahead-of-time lowering + compilation of the single programs; the loop's first pass (which
  # compiles one program per distinct layer shape) minus its median run.
  clip_fn = spectral_model._compiled_clip(spectral_model._check_specs(specs), args.rounds)  # pylint: disable=protected-access
  t0 = time.perf_counter()
  clip_fn.lower(params, c).compile()
  compile_batched = time.perf_counter() - t0
  t0 = time.perf_counter()
  svs_fn.lower(params).compile()
  compile_svs = time.perf_counter() - t0
  t0 = time.perf_counter()
  _block(clip_loop())
  first_loop = time.perf_counter() - t0
  _block(clip_batched())  # warm the jit caches of the public entry points
  _block(spectra())

  # Interleaved repeats, so that drifts of a shared machine hit every method alike.
  runs: dict[str, list[float]] = {'batched': [], 'per_layer': [], 'svs_batched': []}
  for _ in range(args.repeats):
    for key, fn in (('batched', clip_batched), ('per_layer', clip_loop), ('svs_batched', spectra)):
      t0 = time.perf_counter()
      _block(fn())
      runs[key].append(time.perf_counter() - t0)
  med = {k: statistics.median(v) for k, v in runs.items()}
  timings['batched'] = {'compile_s': compile_batched, 'median_s': med['batched'], 'runs_s': runs['batched']}
  timings['per_layer'] = {'compile_s': max(first_loop - med['per_layer'], 0.0), 'first_pass_s': first_loop,
                          'median_s': med['per_layer'], 'runs_s': runs['per_layer'],
                          'num_compiled_shapes': len(groups)}
  timings['svs_batched'] = {'compile_s': compile_svs, 'median_s': med['svs_batched'], 'runs_s': runs['svs_batched']}
  for key, label in (('batched', 'batched clip'), ('per_layer', 'per-layer clip'), ('svs_batched', 'spectra')):
    t = timings[key]
    print(f'  {label:15s} compile {t["compile_s"]:7.2f}s  run {t["median_s"]:8.3f}s  '
          f'(runs {", ".join(f"{x:.2f}" for x in t["runs_s"])})', flush=True)
  med = med['batched']

  if args.dense:
    result['dense_svd'] = _dense_oracle(params, specs)
  if args.eigh:
    result['eigh_vs_svd'] = _eigh_vs_svd(params, specs, args.repeats)
  if name == 'resnet56':
    if args.epoch_seconds:
      frac = med / args.epoch_seconds
      result['clip_fraction_of_epoch'] = frac
      result['epoch_seconds'] = args.epoch_seconds
      print(f'  clipping all layers once = {100 * frac:.3f}% of a {args.epoch_seconds:.1f}s epoch '
            f'(target < 2%)', flush=True)
    else:
      result['clip_fraction_of_epoch'] = None
      result['epoch_seconds'] = None
      print('  (pass --epoch_seconds to express the clip time as a fraction of a training epoch)')
  return result


def estimate_model(name: str, args) -> dict[str, Any]:
  """One layer of every distinct (shape, size, stride), timed once after compiling, scaled by the group sizes.

  For models too slow to clip whole on this device (WRN-50-2 on CPU): an estimate of one full clip, labelled so.
  """
  params, specs, source = _model_layers(name)
  groups = spectral_model._group_specs(specs)  # pylint: disable=protected-access
  c = jnp.float32(args.max_sv)
  print(f'\n== {name} (estimate): {len(specs)} conv layers in {len(groups)} groups ({source})', flush=True)
  rows, total, total_compile = [], 0.0, 0.0
  for idx in groups.values():
    spec = specs[idx[0]]
    kernel = _kernel(params, spec)
    t0 = time.perf_counter()
    compiled = spectral_conv._clip_conv_kernel_jit.lower(  # pylint: disable=protected-access
        kernel, c, input_hw=spec.operator_hw, stride=spec.stride, rounds=args.rounds, perm=(0, 1, 2, 3)).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _block(compiled(kernel, c))
    run_s = time.perf_counter() - t0
    plan = spec.plan()
    rows.append({'kernel_shape': list(spec.kernel_shape), 'input_hw': list(spec.input_hw),
                 'stride': list(spec.stride), 'layers': len(idx), 'pointwise': plan.pointwise,
                 'freq_matrix': [plan.rows, spec.kernel_shape[3]],
                 'num_freq_svd': 1 if plan.pointwise else plan.freq_hw[0] * plan.half_w,
                 'compile_s': compile_s, 'run_s': run_s})
    total += len(idx) * run_s
    total_compile += compile_s
    print(f'  {str(spec.kernel_shape):22s} {str(spec.input_hw):9s} s={spec.stride[0]} x{len(idx)}: '
          f'{run_s:8.3f}s per layer (compile {compile_s:.2f}s)', flush=True)
  print(f'  estimated clip of all {len(specs)} conv layers: {total:.1f}s (+{total_compile:.1f}s compile)')
  return {'source': source, 'estimate': True, 'num_conv_layers': len(specs), 'num_groups': len(groups),
          'num_singular_values': int(sum(s.num_singular_values for s in specs)), 'rounds': args.rounds,
          'max_sv': args.max_sv, 'estimated_clip_s': total, 'compile_s': total_compile, 'groups': rows}


def _dense_oracle(params, specs) -> dict[str, Any]:
  """Smallest layer: operator as a dense matrix (conv of every basis vector), np.linalg.svd, vs the FFT method."""
  spec = min(specs, key=lambda s: s.input_hw[0] * s.input_hw[1] * s.kernel_shape[2] * s.num_singular_values)
  kernel = _kernel(params, spec)
  h, w = spec.input_hw
  cin = spec.kernel_shape[2]
  t0 = time.perf_counter()
  basis = jnp.eye(h * w * cin, dtype=jnp.float32).reshape(-1, h, w, cin)
  cols = jax.jit(lambda b: spectral.circular_conv(b, kernel, spec.stride))(basis)
  matrix = np.asarray(cols).reshape(h * w * cin, -1).T  # (outputs, inputs)
  build_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  dense = np.linalg.svd(matrix.astype(np.float64), compute_uv=False)  # float64: also the accuracy oracle
  svd_s = time.perf_counter() - t0
  fft_fn = lambda: spectral.conv_singular_values(kernel, spec.input_hw, layout='HWIO', stride=spec.stride)
  fft = np.asarray(_block(fft_fn()))
  fft_s, _ = _median_time(fft_fn, 3)
  err = float(np.abs(np.sort(dense)[::-1] - fft).max() / dense.max())
  out = {'layer': spec.name, 'kernel_shape': list(spec.kernel_shape), 'input_hw': list(spec.input_hw),
         'matrix_shape': list(matrix.shape), 'dtype': 'float64 (numpy, OPENBLAS_NUM_THREADS as in env)',
         'build_s': build_s, 'svd_s': svd_s, 'fft_median_s': fft_s,
         'max_rel_error_fft_vs_dense': err}
  print(f'  dense SVD of {spec.name} {matrix.shape}: {svd_s:.2f}s (+{build_s:.2f}s to build) vs FFT '
        f'{1e3 * fft_s:.2f}ms; max |Δσ|/σ_max = {err:.2e}', flush=True)
  return out


def _eigh_vs_svd(params, specs, repeats) -> dict[str, Any]:
  """Singular values by eigh(FᴴF) (smaller side) vs svd(F), over all per-frequency matrices of every layer."""
  mats = []
  for s in specs:
    plan = s.plan()
    if plan.pointwise:
      mat = spectral_conv._pointwise_matrix(_kernel(params, s))  # pylint: disable=protected-access
      mats.append(mat.astype(jnp.complex64)[None])
    else:
      f = spectral_conv._freq_matrices(_kernel(params, s), plan)  # pylint: disable=protected-access
      mats.append(f.reshape(-1, *f.shape[-2:]))

  # One batched LAPACK call in flight at a time (spectral_model._after): concurrent ones can deadlock XLA:CPU.
  def by_svd(ms):
    out = [None]
    for m in ms:
      out.append(jnp.linalg.svd(spectral_model._after(m, out[-1]), compute_uv=False))  # pylint: disable=protected-access
    return out[1:]

  def by_eigh(ms):
    out = [None]
    for m in ms:
      m = spectral_model._after(m, out[-1])  # pylint: disable=protected-access
      g = (jnp.conj(jnp.swapaxes(m, -1, -2)) @ m if m.shape[-2] >= m.shape[-1]
           else m @ jnp.conj(jnp.swapaxes(m, -1, -2)))
      ev = jnp.linalg.eigvalsh(g, symmetrize_input=False)
      out.append(jnp.sqrt(jnp.maximum(ev[..., ::-1], 0.0)))
    return out[1:]

  svd_j, eigh_j = jax.jit(by_svd), jax.jit(by_eigh)
  a, b = _block(svd_j(mats)), _block(eigh_j(mats))
  svd_s, _ = _median_time(lambda: svd_j(mats), repeats)
  eigh_s, _ = _median_time(lambda: eigh_j(mats), repeats)
  max_err, small_rel = 0.0, 0.0
  for sa, sb in zip(a, b):
    sa, sb = np.asarray(sa, np.float64), np.asarray(sb, np.float64)
    top = sa.max()
    max_err = max(max_err, float(np.abs(sa - sb).max() / top))
    smallest = sa[..., -1]  # the smallest singular value of every frequency
    small_rel = max(small_rel, float(np.max(np.abs(smallest - sb[..., -1]) / np.maximum(smallest, 1e-30))))
  print(f'  eigh(FᴴF) {1e3 * eigh_s:.1f}ms vs svd {1e3 * svd_s:.1f}ms; max |Δσ|/σ_max {max_err:.1e}, worst relative '
        f'error of a smallest σ {small_rel:.1e}', flush=True)
  return {'svd_median_s': svd_s, 'eigh_median_s': eigh_s, 'max_abs_error_rel_to_max': max_err,
          'worst_rel_error_smallest_sv': small_rel}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--wrn', action='store_true',
                      help='also WRN-50-2 at 56×56: one layer per distinct shape, scaled to the whole model')
  parser.add_argument('--wrn_full', action='store_true',
                      help='with --wrn: the full comparison as for ResNet-56 (for accelerators; hours on CPU)')
  parser.add_argument('--repeats', type=int, default=5)
  parser.add_argument('--rounds', type=int, default=1, help='clip rounds (the paper: one clip per epoch)')
  parser.add_argument('--max_sv', type=float, default=1.0)
  parser.add_argument('--epoch_seconds', type=float, default=None,
                      help='wall time of one ResNet-56 training epoch on this device (measured elsewhere)')
  parser.add_argument('--epoch_from', default=None,
                      help='a train_throughput.py JSON measured on this device: its float32 seconds per 50k-image '
                           'ResNet-56 PGD-10 epoch is used as --epoch_seconds')
  parser.add_argument('--no_dense', dest='dense', action='store_false', help='skip the dense-matrix SVD')
  parser.add_argument('--no_eigh', dest='eigh', action='store_false', help='skip the eigh-vs-svd comparison')
  parser.add_argument('--out', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                                    f'spectral_clip_{jax.devices()[0].platform}.json'))
  args = parser.parse_args(argv)
  if args.epoch_from:
    if args.epoch_seconds:
      parser.error('give --epoch_seconds or --epoch_from, not both')
    with open(args.epoch_from) as f:
      measured = json.load(f)
    kind = measured['device']['jax_device_kind']
    if kind != jax.devices()[0].device_kind:
      parser.error(f'{args.epoch_from} was measured on {kind!r}, this device is {jax.devices()[0].device_kind!r}')
    rows = [r for r in measured['results'] if r['precision'] == 'float32']
    if not rows:
      parser.error(f'{args.epoch_from} has no float32 result')
    args.epoch_seconds = rows[0]['seconds_per_50k_epoch']
    print(f'epoch time from {args.epoch_from}: {args.epoch_seconds:.1f} s per 50k-image epoch (float32)')

  dev = jax.devices()[0]
  report: dict[str, Any] = {
      'benchmark': 'spectral_clip',
      'command': ' '.join([os.path.basename(sys.executable)] + sys.argv),
      'device': {'device_kind': dev.device_kind, 'platform': dev.platform, 'num_devices': jax.device_count(),
                 'cpu_count': os.cpu_count(), 'machine': platform.machine()},
      'versions': {'jax': jax.__version__, 'jaxlib': jaxlib.__version__, 'flax': flax.__version__,
                   'numpy': np.__version__, 'python': platform.python_version()},
      'env': {k: os.environ.get(k) for k in ('OPENBLAS_NUM_THREADS', 'XLA_FLAGS')},
      'timestamp': time.strftime('%Y-%m-%dT%H:%M:%S%z'),
      'models': {},
  }
  print(f'device {dev.device_kind} ({dev.platform}), jax {jax.__version__}')
  report['load_average_before'] = list(os.getloadavg())
  report['models']['resnet56'] = bench_model('resnet56', args)
  if args.wrn:
    report['models']['wrn50_2'] = bench_model('wrn50_2', args) if args.wrn_full else estimate_model('wrn50_2', args)
  report['load_average_after'] = list(os.getloadavg())

  print('\n| model | layers | groups | batched clip (s) | compile (s) | per-layer loop (s) | compile (s) | '
        'spectra (s) | speed-up |')
  print('|---|---|---|---|---|---|---|---|---|')
  for name, r in report['models'].items():
    if r.get('estimate'):
      print(f"| {name} (estimate: one layer per shape × group size) | {r['num_conv_layers']} | {r['num_groups']} | "
            f"≈ {r['estimated_clip_s']:.1f} (per-layer programs) | {r['compile_s']:.2f} | – | – | – | – |")
      continue
    t = r['timings']
    print(f"| {name} | {r['num_conv_layers']} | {r['num_groups']} | {t['batched']['median_s']:.3f} | "
          f"{t['batched']['compile_s']:.2f} | {t['per_layer']['median_s']:.3f} | {t['per_layer']['compile_s']:.2f} | "
          f"{t['svs_batched']['median_s']:.3f} | {t['per_layer']['median_s'] / t['batched']['median_s']:.2f}× |")
  machine.write_results(args.out, report)
  print(f'\nwrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
