r"""Attack throughput: arreg_jax's L∞ PGD-10 against the PyTorch tools, on the same weights and inputs.

For every model, precision and batch size, four implementations of L∞ PGD (ε = 8/255, 10 steps of 2/255, uniform
random start, ascent on the cross-entropy) craft adversarial examples for the same images:
  * ``arreg_jax``: ``arreg_jax.attacks.pgd`` in one ``jax.jit`` (the steps run in a ``lax.fori_loop``);
  * ``torchattacks``: ``torchattacks.PGD``;
  * ``torch_eager``: a hand-written PyTorch loop (``torch.autograd.grad`` of the summed cross-entropy);
  * ``torch_compile``: the same loop over ``torch.compile(model)`` (``dynamic=False``).
All PyTorch variants use one twin of the JAX model (``torch_models.py``) with the JAX weights copied in, weights
frozen (``requires_grad_(False)``) and in ``eval()`` mode, so no one computes parameter gradients.

Before timing, the script checks that the two frameworks compute the same function, with random, non-zero weights
(Fixup's zero-initialized layers would make the check trivial): in float64 the logits, the input gradient of the
summed cross-entropy and PGD-10 without a random start must agree to 1e-6; in float32 (what is timed) the logits to
1e-4, and the input gradients of most examples to 1e-3 or, failing that, JAX's to the float64 reference no worse than
3× PyTorch's (see ``check_equivalence`` for why). It prints the errors and exits with an error if they do not agree.

Precisions: ``f32``, and ``bf16`` — JAX: the model's computation dtype (``get_module(..., dtype=jnp.bfloat16)``;
parameters, the loss and the perturbation stay float32); PyTorch: ``torch.autocast('cpu' | 'cuda',
dtype=torch.bfloat16)`` around the attack. A precision an implementation cannot run is reported, not hidden.

Timing: every implementation is run once (twice for ``torch.compile``) to compile and warm up; then the timed
repetitions are interleaved (one call of each implementation per round), so load from other processes hits all of
them alike. Reported: images/s of the median call and of the best (fastest) call, with ratios against torchattacks
and compiled PyTorch, and for every call the share of the machine's CPU time that other processes used meanwhile
(from /proc/stat) plus the load average. On a shared machine PyTorch's OpenMP threads slow down far more than XLA's
when another job takes CPU time, so read contended calls as such. ``--wait_quiet S`` waits up to S seconds before
each call for other processes to use < 25% of the CPU; ``--threads 1`` pins the process to one core.

  python benchmarks/attack_throughput.py --wait_quiet 20                 # CPU defaults: ResNet-56, batch 32 and 128
  python benchmarks/attack_throughput.py --threads 1 --batch_sizes 32 --merge          # one core per framework
  python benchmarks/attack_throughput.py --models wrn50_2 --batch_sizes 8 --precisions f32 --repeats 2 \
      --check_batch 2 --merge
  python benchmarks/attack_throughput.py --models resnet56,wrn50_2 --batch_sizes 32,128,512 \
      --out benchmarks/results/attack_throughput_gpu.json                            # a GPU run

Results go to ``--out`` (JSON; with ``--merge`` new results replace the same configurations in an existing file and
the command is appended to its ``runs``).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from arreg_jax import attacks, host_devices, models, sharding  # noqa: E402
from machine import CpuShare, command_line, cpu_model, device_info, versions, wait_for_quiet  # noqa: E402,F401
from machine import write_results  # noqa: E402,F401  (re-exported for the scripts that import this one)

EPS, STEP_SIZE, STEPS = 8 / 255, 2 / 255, 10
NUM_CLASSES = {'resnet20': 10, 'resnet56': 10, 'wrn50_2': 200}
INPUT_SIZE = {'resnet20': 32, 'resnet56': 32, 'wrn50_2': 56}
METHODS = ('arreg_jax', 'torchattacks', 'torch_eager', 'torch_compile')
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'attack_throughput_cpu.json')
# float32 tolerances of the equivalence check, relative to the largest reference magnitude.
LOGITS_RTOL, GRAD_RTOL = 1e-4, 1e-3


# ----------------------------------------------------------------------------------------------------------------
# Random, non-zero weights.


def random_variables(name: str, key: jax.Array, calib_images: np.ndarray) -> tuple[Any, dict]:
  """``(module, variables)`` of model ``name`` with every layer random and non-zero.

  Every kernel is drawn He-normal (fan-in) × 0.6 (the ResNet has no normalization; 0.6 keeps a 56-layer residual
  stack from blowing up); biases N(0, 0.1²); BatchNorm scales U(0.5, 1.5), offsets N(0, 0.1²), and the running
  statistics are the batch statistics of ``calib_images`` (so evaluation mode is normalized, as after training).
  The draws are numpy's (seeded from ``key``): drawing them with ``jax.random`` compiles a program per layer shape,
  seconds on a CPU for nothing the benchmarks measure.
  """
  module = models.get_module(name, num_classes=NUM_CLASSES[name])
  x = jnp.asarray(calib_images)
  shapes = jax.eval_shape(lambda k: module.init(k, x[:1]), key)  # the variables' structure; nothing is compiled
  rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes['params'])
  new = []
  for path, leaf in leaves:
    kind, shape = str(path[-1].key), leaf.shape
    if kind == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      new.append(rng.standard_normal(shape) * np.sqrt(2.0 / fan_in) * 0.6)
    elif kind == 'bias':
      new.append(0.1 * rng.standard_normal(shape))
    elif kind == 'scale':
      new.append(rng.uniform(0.5, 1.5, shape))
    else:
      raise ValueError(f'unexpected parameter {path}')
  variables = {'params': jax.tree_util.tree_unflatten(tree, [jnp.asarray(a, jnp.float32) for a in new])}
  if 'batch_stats' in shapes:
    # Start from flax's initial running statistics (mean 0, variance 1); a training-mode call moves them 10% towards
    # the batch's own (momentum 0.9): solve for the batch statistics, in one compiled program.
    stats = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.full(leaf.shape, 1.0 if str(path[-1].key) == 'var' else 0.0, leaf.dtype),
        shapes['batch_stats'])

    def calibrate(params, stats, x):
      _, upd = module.apply({'params': params, 'batch_stats': stats}, x, train=True, mutable=['batch_stats'])
      return jax.tree.map(lambda new, old: (new - 0.9 * old) / 0.1, upd['batch_stats'], stats)
    variables['batch_stats'] = jax.jit(calibrate)(variables['params'], stats, x)
  return module, variables


# ----------------------------------------------------------------------------------------------------------------
# The attacks.


def jax_pgd(name: str, variables: dict, precision: str, random_start: bool = True, steps: int = STEPS) -> Callable:
  """Jitted ``(variables, x NHWC, y, key) -> x_adv`` running arreg_jax's PGD-``steps`` (default 10)."""
  dtype = jnp.bfloat16 if precision == 'bf16' else None
  module = models.get_module(name, num_classes=NUM_CLASSES[name], dtype=dtype)

  def attack(variables, x, y, key):
    return attacks.pgd(lambda z: module.apply(variables, z), x, y, key, eps=EPS, step_size=STEP_SIZE, steps=steps,
                       random_start=random_start)
  return jax.jit(attack)


def torch_pgd(model, x, y, *, random_start: bool = True, steps: int = STEPS):
  """The hand-written PyTorch L∞ PGD: summed cross-entropy, sign step, projection, clip to [0, 1]."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  adv = x.clone()
  if random_start:
    adv = (adv + torch.empty_like(x).uniform_(-EPS, EPS)).clamp_(0.0, 1.0)
  for _ in range(steps):
    adv.requires_grad_(True)
    loss = F.cross_entropy(model(adv), y, reduction='sum')
    (grad,) = torch.autograd.grad(loss, adv)
    adv = adv.detach() + STEP_SIZE * grad.sign()
    adv = torch.minimum(torch.maximum(adv, x - EPS), x + EPS).clamp_(0.0, 1.0)
  return adv.detach()


# ----------------------------------------------------------------------------------------------------------------
# Equivalence check.


def _framework_outputs(name: str, module, variables: dict, tmodel, x: np.ndarray, y: np.ndarray,
                       dtype) -> dict[str, np.ndarray]:
  """Logits, ∇ₓ Σ CE and PGD-10 without a random start, from JAX and the twin, computed in ``dtype`` (NHWC).

  JAX computes at full float32 precision (``jax.default_matmul_precision('highest')``): on NVIDIA GPUs its default
  for float32 convolutions is TF32 (as cuDNN's is in PyTorch), which would fail the float32 tolerance against the
  PyTorch twin on the CPU without saying anything about the model. The timings use the default precision.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  jvars = jax.tree.map(lambda a: jnp.asarray(a, dtype), variables)
  jx = jnp.asarray(x, dtype)

  def loss(x):
    logits = module.apply(jvars, x)
    return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, y)), logits
  with jax.default_matmul_precision('highest'):
    (_, jl), jg = jax.jit(jax.value_and_grad(loss, has_aux=True))(jx)
    j_adv = jax.jit(lambda v, x: attacks.pgd(lambda z: module.apply(v, z), x, y, jax.random.key(0), eps=EPS,
                                             step_size=STEP_SIZE, steps=STEPS, random_start=False))(jvars, jx)

  tdtype = torch.float64 if dtype == jnp.float64 else torch.float32
  tm = tmodel.to(tdtype)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(tdtype).requires_grad_(True)
  yt = torch.from_numpy(y.astype(np.int64))
  tl = tm(xt)
  (tg,) = torch.autograd.grad(F.cross_entropy(tl, yt, reduction='sum'), xt)
  t_adv = torch_pgd(tm, xt.detach(), yt, random_start=False)
  tmodel.to(torch.float32)
  nhwc = lambda t: t.detach().double().numpy().transpose(0, 2, 3, 1)
  return {'jax_logits': np.asarray(jl, np.float64), 'torch_logits': tl.detach().double().numpy(),
          'jax_grad': np.asarray(jg, np.float64), 'torch_grad': nhwc(tg),
          'jax_adv': np.asarray(j_adv, np.float64), 'torch_adv': nhwc(t_adv)}


def _errors(o: dict[str, np.ndarray], x: np.ndarray) -> dict[str, float]:
  n = x.shape[0]
  lg_err = np.abs(o['jax_logits'] - o['torch_logits'])
  g_err = np.abs(o['jax_grad'] - o['torch_grad'])
  g_scale = np.abs(o['jax_grad']).max()
  per_example = g_err.reshape(n, -1).max(1) / g_scale
  adv_diff = np.abs(o['jax_adv'] - o['torch_adv'])
  return {
      'logits_max_abs': float(np.abs(o['jax_logits']).max()),
      'logits_max_abs_err': float(lg_err.max()),
      'logits_rel_err': float(lg_err.max() / np.abs(o['jax_logits']).max()),
      'grad_max_abs': float(g_scale),
      'grad_max_abs_err': float(g_err.max()),
      'grad_rel_err': float(g_err.max() / g_scale),
      'grad_rel_err_per_example': [float(e) for e in per_example],
      'pgd_no_random_start_frac_pixels_equal': float(np.mean(adv_diff < 1e-6)),
      'pgd_no_random_start_max_abs_diff': float(adv_diff.max()),
      'pgd_linf_from_clean': float(max(np.abs(o['jax_adv'] - x).max(), np.abs(o['torch_adv'] - x).max())),
  }


def check_equivalence(name: str, module, variables: dict, tmodel, batch: int, seed: int) -> dict[str, Any]:
  """Compares the JAX model and its PyTorch twin in float64 (strict) and float32 (as benchmarked).

  float64 is the test of "same function": logits, input gradients and PGD-10 without a random start must agree to
  1e-6 (relative to the largest magnitude) and on 99.9% of pixels. float32 cannot be held to a fixed tolerance on
  the input gradients: a ReLU whose input is within float32 rounding of zero (ResNet-56 has ~0.5M ReLUs per image,
  WRN-50-2 ~10M) can switch sides between two correct implementations that sum in different orders, changing that
  example's gradient. So in float32 the logits must agree to ``LOGITS_RTOL``, and the input gradients must either
  agree to ``GRAD_RTOL`` on the median example, or arreg_jax's float32 gradient must be no further from the float64
  reference than 3× PyTorch's float32 gradient is (both frameworks equally accurate). Raises ``SystemExit`` on
  failure.
  """
  size, nc = INPUT_SIZE[name], NUM_CLASSES[name]
  rng = np.random.default_rng(seed + 1)
  x = rng.random((batch, size, size, 3), dtype=np.float32)
  y = rng.integers(0, nc, batch).astype(np.int32)
  with jax.enable_x64(True):
    o64 = _framework_outputs(name, module, variables, tmodel, x, y, jnp.float64)
  o32 = _framework_outputs(name, module, variables, tmodel, x, y, jnp.float32)
  e64, e32 = _errors(o64, x), _errors(o32, x)
  # Each framework's float32 result against the float64 reference (PyTorch's float64, equal to JAX's — checked).
  g_ref, l_ref = o64['torch_grad'], o64['torch_logits']
  for fw in ('jax', 'torch'):
    e32[f'{fw}_f32_vs_f64_logits_rel_err'] = float(np.abs(o32[f'{fw}_logits'] - l_ref).max() / np.abs(l_ref).max())
    e32[f'{fw}_f32_vs_f64_grad_rel_err'] = float(np.abs(o32[f'{fw}_grad'] - g_ref).max() / np.abs(g_ref).max())
    e32[f'{fw}_f32_pgd_frac_pixels_equal_f64'] = float(np.mean(np.abs(o32[f'{fw}_adv'] - o64['torch_adv']) < 1e-6))
  for tag, e in (('float64', e64), ('float32', e32)):
    print(f'[check] {name} {tag}: logits max |JAX| {e["logits_max_abs"]:.3g}, max abs err '
          f'{e["logits_max_abs_err"]:.3g}, rel {e["logits_rel_err"]:.3g} | ∇ₓ Σ CE max |JAX| {e["grad_max_abs"]:.3g}, '
          f'max abs err {e["grad_max_abs_err"]:.3g}, rel {e["grad_rel_err"]:.3g} (per example: '
          + ' '.join(f'{v:.1g}' for v in e['grad_rel_err_per_example']) + ')')
    print(f'[check] {name} {tag}: PGD-10 without random start: '
          f'{100 * e["pgd_no_random_start_frac_pixels_equal"]:.3f}% of pixels equal, max |diff| '
          f'{e["pgd_no_random_start_max_abs_diff"]:.3g} (ε = {EPS:.4f}); max |x_adv − x| {e["pgd_linf_from_clean"]:.5f}')
  print(f'[check] {name} float32 vs the float64 reference: logits rel err JAX {e32["jax_f32_vs_f64_logits_rel_err"]:.3g}'
        f', PyTorch {e32["torch_f32_vs_f64_logits_rel_err"]:.3g}; ∇ₓ rel err JAX {e32["jax_f32_vs_f64_grad_rel_err"]:.3g}'
        f', PyTorch {e32["torch_f32_vs_f64_grad_rel_err"]:.3g}; PGD-10 (no random start) pixels equal to float64\'s: '
        f'JAX {100 * e32["jax_f32_pgd_frac_pixels_equal_f64"]:.1f}%, '
        f'PyTorch {100 * e32["torch_f32_pgd_frac_pixels_equal_f64"]:.1f}%')
  problems = []
  if not (e64['logits_rel_err'] < 1e-6 and e64['grad_rel_err'] < 1e-6):
    problems.append(f'float64 logits/gradients differ (rel {e64["logits_rel_err"]:.3g} / {e64["grad_rel_err"]:.3g})')
  if e64['pgd_no_random_start_frac_pixels_equal'] < 0.999:
    problems.append('float64 PGD without a random start disagrees on more than 0.1% of pixels')
  if not e32['logits_rel_err'] < LOGITS_RTOL:
    problems.append(f'float32 logits differ (rel err {e32["logits_rel_err"]:.3g} ≥ {LOGITS_RTOL})')
  grads_agree = np.median(e32['grad_rel_err_per_example']) < GRAD_RTOL
  as_accurate = e32['jax_f32_vs_f64_grad_rel_err'] <= 3 * e32['torch_f32_vs_f64_grad_rel_err']
  if not (grads_agree or as_accurate):
    problems.append(f'float32 input gradients differ (median per-example rel err ≥ {GRAD_RTOL}) and JAX\'s are further '
                    'from float64 than 3× PyTorch\'s')
  if max(e64['pgd_linf_from_clean'], e32['pgd_linf_from_clean']) > EPS + 1e-6:
    problems.append('an attack left the ε-ball')
  if problems:
    raise SystemExit(f'EQUIVALENCE CHECK FAILED for {name}: ' + '; '.join(problems) + '. The timings would compare '
                     'different functions; fix benchmarks/torch_models.py (or the model) first.')
  print(f'[check] {name}: OK — both frameworks compute the same function', flush=True)
  return {'batch': batch, 'float64': e64, 'float32': e32,
          'criteria': 'float64: logits and input-gradient max abs err < 1e-6 × max magnitude, PGD-10 (no random '
                      f'start) equal on ≥ 99.9% of pixels; float32: logits < {LOGITS_RTOL} relative, and median '
                      f'per-example input-gradient error < {GRAD_RTOL} relative or JAX\'s float32 input gradient no '
                      'further from the float64 reference than 3× PyTorch\'s'}


# ----------------------------------------------------------------------------------------------------------------
# Timing.


def time_config(name: str, variables: dict, tmodel, cmodel, precision: str, batch: int, repeats: int,
                methods: tuple[str, ...], seed: int, wait_quiet_s: float = 0.0, steps: int = STEPS
                ) -> list[dict[str, Any]]:
  """Warms up every method, then times ``repeats`` interleaved rounds; one result row per method.

  PyTorch runs on CUDA when it sees a GPU (``tmodel`` and ``cmodel`` must be there already), else on the CPU; with
  ``methods`` = ``('arreg_jax',)`` PyTorch is not needed (``tmodel`` and ``cmodel`` may be None).
  """
  size, nc = INPUT_SIZE[name], NUM_CLASSES[name]
  rng = np.random.default_rng(seed + batch)
  x = rng.random((batch, size, size, 3), dtype=np.float32)
  y = rng.integers(0, nc, batch).astype(np.int32)
  # arreg_jax's default layout: the batch split over the largest number of devices that divides it (one XLA:CPU
  # device per core unless --cpu_devices says otherwise), the weights replicated — what training and evaluation do.
  mesh = sharding.make_mesh(sharding.data_parallel_devices(batch))
  xj, yj = (jax.device_put(a, sharding.batch_sharding(mesh)) for a in (x, y))
  jvars = jax.device_put(variables, sharding.replicated(mesh))
  if any(m != 'arreg_jax' for m in methods):
    import torch  # pylint: disable=g-import-not-at-top
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(dev)
    yt = torch.from_numpy(y.astype(np.int64)).to(dev)
    autocast = (lambda: torch.autocast(dev, dtype=torch.bfloat16)) if precision == 'bf16' else None
    sync = torch.cuda.synchronize if dev == 'cuda' else (lambda: None)

  def torch_call(fn):
    def run():
      if autocast is None:
        out = fn()
      else:
        with autocast():
          out = fn()
      sync()
      return out
    return run

  calls: dict[str, Callable[[], Any]] = {}
  if 'arreg_jax' in methods:
    jfn = jax_pgd(name, variables, precision, steps=steps)
    counter = iter(range(1 << 30))
    calls['arreg_jax'] = lambda: jax.block_until_ready(jfn(jvars, xj, yj, jax.random.key(next(counter))))
  if 'torchattacks' in methods:
    import torchattacks  # pylint: disable=g-import-not-at-top
    atk = torchattacks.PGD(tmodel, eps=EPS, alpha=STEP_SIZE, steps=steps, random_start=True)
    calls['torchattacks'] = torch_call(lambda: atk(xt, yt))
  if 'torch_eager' in methods:
    calls['torch_eager'] = torch_call(lambda: torch_pgd(tmodel, xt, yt, steps=steps))
  if 'torch_compile' in methods:
    calls['torch_compile'] = torch_call(lambda: torch_pgd(cmodel, xt, yt, steps=steps))

  rows = {m: {'model': name, 'precision': precision, 'batch_size': batch, 'method': m, 'steps': steps, 'times_s': [],
              'error': None} for m in calls}
  for m, fn in calls.items():
    t0 = time.perf_counter()
    try:
      out = fn()
      if m == 'torch_compile':
        out = fn()  # the first call compiles; a second may recompile for the input's requires_grad change
      rows[m]['warmup_s'] = round(time.perf_counter() - t0, 2)
      out = np.asarray(out.detach().cpu().float().numpy().transpose(0, 2, 3, 1) if hasattr(out, 'detach') else out)
      rows[m]['linf_from_clean'] = float(np.abs(out.astype(np.float32) - x).max())
    except Exception as e:  # pylint: disable=broad-except
      rows[m]['error'] = f'{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ""}'
      print(f'  {name} {precision} batch {batch} {m}: FAILED: {rows[m]["error"]}', flush=True)
  live = [m for m in calls if rows[m]['error'] is None]
  waited, busy_other, wall, load0 = 0.0, 0.0, 0.0, [round(x, 2) for x in os.getloadavg()]
  for _ in range(repeats):
    for m in live:
      waited += wait_for_quiet(wait_quiet_s) if wait_quiet_s else 0.0
      with CpuShare() as share:
        calls[m]()
      rows[m]['times_s'].append(round(share.wall, 4))
      rows[m].setdefault('other_processes_cpu_share_per_call', []).append(share.others)
      wall += share.wall
      busy_other = None if share.others is None or busy_other is None else busy_other + share.others * share.wall
  for m in live:
    r = rows[m]
    r['median_s'] = statistics.median(r['times_s'])
    r['images_per_s'] = round(batch / r['median_s'], 3)
    r['best_images_per_s'] = round(batch / min(r['times_s']), 3)
  for r in rows.values():
    r.update(loadavg_start=load0, loadavg_end=[round(x, 2) for x in os.getloadavg()],
             other_processes_cpu_share=None if busy_other is None or not wall else round(busy_other / wall, 3),
             waited_for_quiet_s=round(waited, 1))
  for field, prefix in (('images_per_s', 'ratio_vs_'), ('best_images_per_s', 'best_ratio_vs_')):
    base = {ref: rows[ref].get(field) for ref in ('torchattacks', 'torch_compile') if ref in rows}
    for r in rows.values():
      for ref, v in base.items():
        r[prefix + ref] = round(r[field] / v, 3) if v and r.get(field) else None
  return list(rows.values())


def print_table(results: list[dict[str, Any]]) -> None:
  """Median and best (fastest call) images/s, their ratios, and how busy other processes kept the CPU."""
  head = (f'{"model":9} {"prec":4} {"thr":>3} {"dev":>3} {"batch":>5} {"method":14} {"img/s":>7} {"×t.atk":>6} '
          f'{"×comp":>6} {"best":>7} {"×t.atk":>6} {"×comp":>6} {"others CPU per call":>20}')
  print(head)
  print('-' * len(head))
  fmt = lambda v, f: format(v, f) if isinstance(v, (int, float)) else '—'
  for r in results:
    lead = (f'{r["model"]:9} {r["precision"]:4} {r.get("threads", "?"):>3} {r.get("jax_devices", "?"):>3} '
            f'{r["batch_size"]:>5} {r["method"]:14}')
    if r.get('error'):
      print(f'{lead} FAILED: {r["error"][:60]}')
      continue
    shares = ' '.join(fmt(o, '.0%') for o in r.get('other_processes_cpu_share_per_call', []))
    print(f'{lead} {fmt(r["images_per_s"], "7.2f")} {fmt(r.get("ratio_vs_torchattacks"), "6.2f")} '
          f'{fmt(r.get("ratio_vs_torch_compile"), "6.2f")} {fmt(r["best_images_per_s"], "7.2f")} '
          f'{fmt(r.get("best_ratio_vs_torchattacks"), "6.2f")} {fmt(r.get("best_ratio_vs_torch_compile"), "6.2f")} '
          f'{shares:>20}')


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--models', default='resnet56', help='comma-separated: resnet56, wrn50_2')
  p.add_argument('--batch_sizes', default='32,128', help='comma-separated (a GPU run: 32,128,512)')
  p.add_argument('--precisions', default='f32,bf16', help='comma-separated: f32, bf16')
  p.add_argument('--methods', default=','.join(METHODS), help='comma-separated subset of ' + ', '.join(METHODS))
  p.add_argument('--repeats', type=int, default=3, help='timed calls per method and configuration (median)')
  p.add_argument('--check_batch', type=int, default=8, help='batch size of the equivalence check')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--out', default=DEFAULT_OUT, help='JSON results file')
  p.add_argument('--merge', action='store_true', help='keep results of other configurations already in --out')
  p.add_argument('--threads', type=int, default=0,
                 help='0: all cores; 1: the process pinned to one core (os.sched_setaffinity) and '
                      'torch.set_num_threads(1): a comparison per core, less sensitive to other processes')
  p.add_argument('--cpu_devices', default='auto',
                 help="XLA:CPU devices for arreg_jax ('auto': one per core, the package's default; 1: one device)")
  p.add_argument('--check_only', action='store_true', help='run the equivalence checks, time nothing')
  p.add_argument('--wait_quiet', type=float, default=0.0,
                 help='before each timed call, wait up to this many seconds for other processes to use < 25%% of '
                      'the CPU (a shared machine)')
  args = p.parse_args(argv)

  threads = args.threads or os.cpu_count() or 1
  if args.threads not in (0, 1):
    p.error('--threads takes 0 (all cores) or 1')
  if args.threads == 1:
    # Pin this thread to one core before XLA's and PyTorch's thread pools exist: their threads inherit the mask
    # and size themselves by it. (XLA_FLAGS=--xla_cpu_multi_thread_eigen=false does not make XLA:CPU serial: it
    # still used ~1.4 cores on the PGD program.)
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})

  if args.threads == 1:
    args.cpu_devices = '1'
  host_devices.use_every_cpu_core(args.cpu_devices if args.cpu_devices == 'auto' else int(args.cpu_devices))

  import torch  # pylint: disable=g-import-not-at-top
  import torch._dynamo  # pylint: disable=g-import-not-at-top
  import torch_models  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(threads)
  torch._dynamo.config.cache_size_limit = 64  # one graph per (batch size, autocast) — do not fall back to eager
  dev = 'cuda' if torch.cuda.is_available() else 'cpu'
  names = [m for m in args.models.split(',') if m]
  batches = [int(b) for b in args.batch_sizes.split(',') if b]
  precisions = [q for q in args.precisions.split(',') if q]
  methods = tuple(m for m in args.methods.split(',') if m)
  for m in names:
    if m not in NUM_CLASSES:
      p.error(f'unknown model {m!r}; choose from {", ".join(NUM_CLASSES)}')
  for q in precisions:
    if q not in ('f32', 'bf16'):
      p.error(f'unknown precision {q!r}; choose f32 or bf16')
  for m in methods:
    if m not in METHODS:
      p.error(f'unknown method {m!r}; choose from {", ".join(METHODS)}')

  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  print(f'devices: JAX {jax.devices()}, torch {dev}; CPU {cpu_model()} × {os.cpu_count()}; '
        f'torch threads {torch.get_num_threads()}; load average {os.getloadavg()}', flush=True)
  if os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1):
    print('WARNING: the machine is already loaded; the timings below are contended (see "others CPU").', flush=True)
  equivalence, results = {}, []
  for name in names:
    size = INPUT_SIZE[name]
    calib = np.random.default_rng(args.seed + 7).random((16, size, size, 3), dtype=np.float32)
    module, variables = random_variables(name, jax.random.key(args.seed), calib)
    tmodel = torch_models.build(name, NUM_CLASSES[name], jax.device_get(variables)).requires_grad_(False)
    equivalence[name] = check_equivalence(name, module, variables, tmodel, args.check_batch, args.seed)
    if args.check_only:
      continue
    tmodel = tmodel.to(dev)
    cmodel = torch.compile(tmodel, dynamic=False)
    for precision in precisions:
      for batch in batches:
        print(f'\n== {name} {precision} batch {batch}: warming up and timing {", ".join(methods)} '
              f'({args.repeats} interleaved rounds)', flush=True)
        rows = time_config(name, variables, tmodel, cmodel, precision, batch, args.repeats, methods, args.seed,
                           args.wait_quiet)
        for r in rows:
          r['threads'] = threads
          r['jax_devices'] = len(sharding.data_parallel_devices(batch))
        print_table(rows)
        results.extend(rows)

  run = {'command': command_line(), 'started_utc': started,
         'loadavg_at_end': [round(x, 2) for x in os.getloadavg()]}
  out = {
      'benchmark': 'attack_throughput',
      'attack': {'norm': 'linf', 'eps': EPS, 'step_size': STEP_SIZE, 'steps': STEPS, 'random_start': True},
      'notes': ('images/s = batch / median seconds of one PGD-10 call after warm-up; best_images_per_s = batch / '
                'fastest call (robust to other processes); timed calls interleaved across methods; '
                'other_processes_cpu_share = CPU time used by other processes during the timed calls / '
                '(cores × wall), per call and weighted over the configuration; PyTorch models frozen (requires_grad False, eval mode); bf16: JAX model dtype '
                'bfloat16 with float32 params/loss, PyTorch torch.autocast(bfloat16).'),
      'device': device_info(),
      'threads': threads,
      'versions': versions(),
      'runs': [run],
      'equivalence': equivalence,
      'results': results,
  }
  out = write_results(args.out, out, ('model', 'precision', 'batch_size', 'method', 'threads', 'jax_devices'),
                      args.merge)
  print('\n== all results in ' + args.out)
  print_table(out['results'])


if __name__ == '__main__':
  main()
