r"""The measurements of the GPU suite (``benchmarks/gpu_suite.py`` runs them within its budget): one function per
part, each given a ``Part`` (``gpu_suite.Part``) to write its results into as it gets them, and the shapes of a full
run (:data:`FULL`) and of a tiny one (:data:`TINY`).

Every use of the package's training internals is in the block of functions right below the imports
(``load_config`` … ``mnist_default_argv``): when the training modules move, re-point those and nothing else.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import TYPE_CHECKING, Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

if TYPE_CHECKING:
  from gpu_suite import Part  # the budget and the file a part writes into

# ----------------------------------------------------------------------------------------------------------------
# The package, as the suite uses it. Re-point these when the training modules are renamed.


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)``: the experiment as a user would run it."""
  path = os.path.join(REPO, 'configs', f'{name}.py')
  if not os.path.exists(path):
    raise FileNotFoundError(f'no config {path}')
  spec = importlib.util.spec_from_file_location(f'_gpu_suite_config_{name}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@dataclasses.dataclass
class Training:
  """A member's compiled training programs, as a run builds them, and what they start from."""
  module: Any
  variables: dict
  state: Any
  hyper: Any
  multi_steps: dict  # steps per call -> the StepSpec of training.step.train_steps with that many steps
  calls: list  # steps per dispatch over one epoch
  microbatches: int
  program: Any  # the ahead-of-time compiled program of calls[0] steps (its memory figures)
  steps_per_epoch: int
  compile_s: float


def model_module(name: str, num_classes: int, precision: str = 'float32'):
  """The Flax module of model ``name`` computing in ``precision`` (``config.precision``'s values)."""
  from arreg_jax import models  # pylint: disable=g-import-not-at-top
  return models.get_module(name, num_classes=num_classes, dtype=models.compute_dtype(precision))


def training_mesh(batch_size: int):
  """The mesh a run trains on: the largest device count that divides the batch."""
  from arreg_jax import sharding  # pylint: disable=g-import-not-at-top
  return sharding.make_mesh(sharding.data_parallel_devices(batch_size))


def place(tree, mesh):
  """``tree`` replicated over ``mesh``, as a run holds its data set and state."""
  from arreg_jax import sharding  # pylint: disable=g-import-not-at-top
  return jax.device_put(tree, sharding.replicated(mesh))


def build_training(config, strength: float, images, labels, *, num_classes: int, augment_kind: str, mesh,
                   seed: int = 0) -> Training:
  """The training programs of one member of ``config`` at AR ``strength`` over the resident ``images`` (uint8) and
  ``labels``: model, optimizer, state, step hyper-parameters and the memory-planned step specs, as
  ``arreg_jax.training.loop.build_run`` makes them (its evaluation programs left out)."""
  from arreg_jax import models, sharding  # pylint: disable=g-import-not-at-top
  from arreg_jax.training import loop, memory_plan, state as state_lib, step  # pylint: disable=g-import-not-at-top
  batch = int(config.train.batch_size)
  num_train = int(images.shape[0])
  if not 1 <= batch <= num_train:
    raise ValueError(f'batch {batch} must be between 1 and the {num_train} training images')
  module = model_module(config.model.name, num_classes, config.precision)
  _, variables = models.create(config.model.name, num_classes=num_classes, key=jax.random.key(seed))
  steps_per_epoch = num_train // batch
  calls = loop.epoch_calls(steps_per_epoch, config.train.steps_per_call)
  spec_of = lambda k: step.step_spec(
      config, module=module, adversarial=step.is_adversarial(config, strength), augment=augment_kind,
      steps_per_epoch=steps_per_epoch, batch_sharding=sharding.batch_sharding(mesh), steps_per_call=calls[0],
      microbatches=k)
  state = place(state_lib.init_state(variables, spec_of(1).optimizer), mesh)
  hyper = place(step.step_hyper(config, strength, jax.random.key(seed + 1)), mesh)
  t0 = time.perf_counter()
  spec = memory_plan.plan_training(spec_of, config.train.microbatches, state, hyper, images, labels, mesh,
                                   'gpu_suite')
  perm = jax.ShapeDtypeStruct((num_train,), jnp.int32, sharding=sharding.replicated(mesh))
  program = step.train_steps.lower(spec, state, images, labels, perm, hyper).compile()  # jit's cache: no new compile
  compile_s = time.perf_counter() - t0
  specs = {n: spec.replace(steps_per_call=n) for n in set(calls)}
  return Training(module=module, variables=variables, state=state, hyper=hyper, multi_steps=specs, calls=calls,
                  microbatches=spec.microbatches, program=program, steps_per_epoch=steps_per_epoch,
                  compile_s=compile_s)


def run_training_epoch(t: Training, images, labels, perm) -> dict[str, float]:
  """One epoch of ``t``'s programs, as a run's epoch loop dispatches them; updates ``t.state``, returns the sums."""
  from arreg_jax.training import loop  # pylint: disable=g-import-not-at-top
  t.state, sums = loop.run_epoch(t.multi_steps, t.calls, t.state, images, labels, perm, t.hyper)
  return sums


def run_training_call(t: Training, n: int, images, labels, perm) -> dict:
  """One call of the ``n``-step program (blocks until done); updates ``t.state``, returns its metric sums."""
  from arreg_jax.training import step  # pylint: disable=g-import-not-at-top
  t.state, sums = step.train_steps(t.multi_steps[n], t.state, images, labels, perm, t.hyper)
  return jax.device_get(sums)


def memory_figures(program) -> dict[str, Any]:
  """The memory plan's view of a compiled program (per device) and the device's free memory, in bytes."""
  from arreg_jax.training import memory_plan  # pylint: disable=g-import-not-at-top
  fp = memory_plan.footprint(program)
  out = {'free_bytes': memory_plan.free_bytes(), 'safety': memory_plan.SAFETY}
  if fp is not None:
    out.update(argument_bytes=fp.argument, output_bytes=fp.output, alias_bytes=fp.alias, temp_bytes=fp.temp,
               new_bytes=fp.new_bytes, predicted_peak_bytes=fp.peak_bytes)
  return out


def attack_functions():
  """``(pgd, apgd, autoattack)`` of the attack library."""
  from arreg_jax import attacks  # pylint: disable=g-import-not-at-top
  return attacks.pgd, attacks.apgd, attacks.autoattack


def mnist_default_argv(workdir: str, tiny: bool) -> list[str]:
  """The embedded default's command; in tiny mode ``:smoke`` on one CPU device, one member, one epoch, no analysis
  (the plumbing of the part, in seconds)."""
  if tiny:
    return [sys.executable, '-m', 'arreg_jax.main', '--config', 'configs/mnist.py:smoke', '--workdir', workdir,
            '--cpu_devices=1', '--config.sweep=(0.0,)', '--config.train.epochs=1', '--config.analysis.enabled=False']
  return [sys.executable, '-m', 'arreg_jax.main', '--config', 'configs/mnist.py', '--workdir', workdir]


# ----------------------------------------------------------------------------------------------------------------
# Peaks, projections, memory.

# Dense peak FLOP/s by device name (vendors' datasheets; leads, not readings). Matched in order against
# ``device_kind``; a device matching none is reported as unknown (no MFU).
PEAKS: tuple[tuple[str, str, dict[str, float]], ...] = (
    (r'H100.*PCIe', 'H100 PCIe', {'bf16': 756e12, 'tf32': 378e12, 'f32': 51e12}),
    (r'H100.*(SXM|HBM3)', 'H100 SXM', {'bf16': 989e12, 'tf32': 495e12, 'f32': 67e12}),
    (r'H200(?!.*NVL)', 'H200 (H100 SXM compute)', {'bf16': 989e12, 'tf32': 495e12, 'f32': 67e12}),
    (r'A100', 'A100', {'bf16': 312e12, 'tf32': 156e12, 'f32': 19.5e12}),
)


def known_peak(device_kind: str) -> dict[str, Any]:
  """``{'device': name, 'flops_per_s': {...}}`` for a device of :data:`PEAKS`, else ``{'device': None, ...}``."""
  if not isinstance(device_kind, str):
    raise TypeError(f'device_kind must be a string, got {device_kind!r}')
  for pattern, name, peaks in PEAKS:
    if re.search(pattern, device_kind):
      return {'device': name, 'flops_per_s': dict(peaks), 'source': 'vendor datasheet, dense'}
  return {'device': None, 'flops_per_s': None, 'source': f'unknown device {device_kind!r}: add it to PEAKS'}


def mfu(achieved_flops_per_s: float, precision: str, peak: dict[str, Any]) -> dict[str, float | None]:
  """Achieved over peak: bfloat16 against the bf16 peak; float32 against both the plain f32 and the TF32 peak (XLA
  on NVIDIA GPUs computes float32 convolutions in TF32 unless told otherwise)."""
  p = peak.get('flops_per_s')
  if not p:
    return {'mfu': None}
  if precision == 'bfloat16':
    return {'mfu': achieved_flops_per_s / p['bf16']}
  return {'mfu_vs_f32': achieved_flops_per_s / p['f32'], 'mfu_vs_tf32': achieved_flops_per_s / p['tf32']}


def sweep_projection(epoch_s: float, measured_depth: int, epochs: int = 200, strengths: int = 3,
                     datasets: tuple[str, ...] = ('cifar10', 'cifar100')) -> dict[str, Any]:
  """Projected training time of the paper's CIFAR sweep (Tables 3 and 4: ResNet-56 and ResNet-110 × CIFAR-10 and
  CIFAR-100 × ``strengths`` AR strengths × ``epochs`` epochs) from one measured epoch of the CIFAR ResNet of
  ``measured_depth``: other depths are scaled by their multiply-accumulates (``train_throughput.resnet_macs``)."""
  if not (epoch_s > 0 and epochs >= 1 and strengths >= 1 and datasets):
    raise ValueError(f'bad projection input: epoch_s={epoch_s}, epochs={epochs}, strengths={strengths}')
  import train_throughput  # pylint: disable=g-import-not-at-top
  base = train_throughput.resnet_macs(measured_depth)[0]
  models = {}
  for depth in (56, 110):
    per_epoch = epoch_s * train_throughput.resnet_macs(depth)[0] / base
    models[f'resnet{depth}'] = {'epoch_s': per_epoch, 'runs': strengths * len(datasets),
                                'hours': per_epoch * epochs * strengths * len(datasets) / 3600}
  total = sum(m['hours'] for m in models.values())
  return {'covers': (f'training steps only of {2 * strengths * len(datasets)} runs (ResNet-56 and ResNet-110 × '
                     f'{" and ".join(datasets)} × {strengths} AR strengths) × {epochs} epochs; no per-epoch '
                     'evaluation, final analysis or checkpoints; ResNet-110 (and a model other than the measured '
                     'one) scaled by its multiply-accumulates; one device, runs one after another'),
          'measured_depth': measured_depth, 'measured_epoch_s': epoch_s, 'models': models, 'total_hours': total}


def memory_stats() -> dict[str, int] | None:
  """The first local device's allocator statistics (None where the backend keeps none, e.g. the CPU)."""
  try:
    stats = jax.local_devices()[0].memory_stats()
  except (NotImplementedError, RuntimeError):
    return None
  return {k: int(v) for k, v in stats.items()} if stats else None


# ----------------------------------------------------------------------------------------------------------------
# The shapes of a run.


@dataclasses.dataclass(frozen=True)
class Settings:
  """The shapes of one run: the real ones, or ``--tiny``'s."""
  tiny: bool
  attack_model: str
  attack_batches: tuple[int, ...]
  attack_steps: int
  attack_repeats: int
  check_batch: int
  epoch_model: str
  epoch_batch: int
  epoch_images: int
  train_attack_steps: int | None  # None: the config's
  matmul_n: int
  wrn_model: str
  wrn_batch: int
  wrn_images: int
  wrn_steps: int
  apgd_model: str
  apgd_images: int
  apgd_steps: int
  aa_targets: int
  aa_queries: int
  spectral_model: str
  spectral_repeats: int


FULL = Settings(tiny=False, attack_model='resnet56', attack_batches=(512, 128), attack_steps=10, attack_repeats=10,
                check_batch=8, epoch_model='resnet56', epoch_batch=256, epoch_images=50_000, train_attack_steps=None,
                matmul_n=8192, wrn_model='wrn50_2', wrn_batch=256, wrn_images=512, wrn_steps=3,
                apgd_model='resnet56', apgd_images=1000, apgd_steps=100, aa_targets=9, aa_queries=5000,
                spectral_model='resnet56', spectral_repeats=5)
TINY = Settings(tiny=True, attack_model='resnet20', attack_batches=(2,), attack_steps=1, attack_repeats=1,
                check_batch=2, epoch_model='resnet20', epoch_batch=4, epoch_images=8, train_attack_steps=1,
                matmul_n=128, wrn_model='wrn_smoke', wrn_batch=2, wrn_images=2, wrn_steps=1,
                apgd_model='resnet20', apgd_images=8, apgd_steps=2, aa_targets=1, aa_queries=4,
                spectral_model='cifar_cnn', spectral_repeats=1)
PRECISIONS = ('float32', 'bfloat16')
EPS_APGD = (8 / 255, 0.5 / 255)
EPS_AUTOATTACK = 0.5 / 255


# ----------------------------------------------------------------------------------------------------------------
# Part 1: PGD-10, arreg_jax vs the PyTorch tools.


def part_pgd_attack(p: Part) -> None:
  """L∞ PGD-10 (ε 8/255, step 2/255, random start): arreg_jax, torchattacks, the PyTorch loop eager and compiled, on
  one set of random weights checked equal first (``attack_throughput``); batch 512 before 128, f32 then bf16."""
  s = p.settings
  import attack_throughput as at  # pylint: disable=g-import-not-at-top
  name = s.attack_model
  methods = list(at.METHODS)
  torch = _optional('torch')
  missing = {}
  if torch is None:
    missing.update({m: 'torch is not installed' for m in methods if m != 'arreg_jax'})
  elif _optional('torchattacks') is None:
    missing['torchattacks'] = 'torchattacks is not installed (carry its wheel: benchmarks/gpu_wheels.sh)'
  if s.tiny and 'torch_compile' not in missing:
    missing['torch_compile'] = 'tiny mode: compiling with torch.compile takes longer than the whole tiny run'
  for m, why in missing.items():
    p.skip(m, why)
  methods = [m for m in methods if m not in missing]
  size = at.INPUT_SIZE[name]
  calib = np.random.default_rng(7).random((16, size, size, 3), dtype=np.float32)
  module, variables = at.random_variables(name, jax.random.key(0), calib)
  tmodel = cmodel = None
  if torch is not None:
    import torch_models  # pylint: disable=g-import-not-at-top
    import torch._dynamo  # pylint: disable=g-import-not-at-top
    torch._dynamo.config.cache_size_limit = 64  # one graph per (batch, autocast): never fall back to eager
    torch.set_num_threads(os.cpu_count() or 1)
    tmodel = torch_models.build(name, at.NUM_CLASSES[name], jax.device_get(variables)).requires_grad_(False)
    try:
      p.record(equivalence=at.check_equivalence(name, module, variables, tmodel, s.check_batch, 0))
    except SystemExit as e:  # the check's verdict: the PyTorch timings would compare different functions
      p.record(equivalence={'failed': str(e)})
      for m in methods[1:]:
        p.skip(m, 'the equivalence check failed')
      methods = ['arreg_jax']
    dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    tmodel = tmodel.to(dev)
    cmodel = torch.compile(tmodel, dynamic=False) if 'torch_compile' in methods else None
    p.record(torch={'device': dev, 'threads': torch.get_num_threads(),
                    'cudnn_allow_tf32': bool(torch.backends.cudnn.allow_tf32),
                    'matmul_allow_tf32': bool(torch.backends.cuda.matmul.allow_tf32)})
  p.record(model=name, steps=s.attack_steps, repeats=s.attack_repeats, methods=methods,
           note='images/s of the median and of the fastest timed call; timed calls interleaved across methods; '
                'float32 at each framework\'s default GPU precision (TF32 convolutions in both), bf16: JAX model '
                'dtype bfloat16, PyTorch autocast')
  # The first configuration's time is a guess (compilations, torch.compile's above all); then the last one's.
  estimate, basis = (120.0 if not s.tiny else 5.0), 'a guess for the first'
  for batch in s.attack_batches:
    for precision in ('f32', 'bf16'):
      what = f'{precision} batch {batch}'
      if not p.fits(estimate):
        p.skip(what, f'budget: ≈ {estimate:.0f} s needed ({basis}), {p.left():.0f} s left')
        continue
      t0 = time.monotonic()
      print(f'  {name} {what}: {", ".join(methods)}', flush=True)
      rows = at.time_config(name, variables, tmodel, cmodel, precision, batch, s.attack_repeats, tuple(methods), 0,
                            steps=s.attack_steps)
      for r in rows:
        p.add(r)
      at.print_table(rows)
      estimate, basis = time.monotonic() - t0, 'the last configuration\'s time'


# ----------------------------------------------------------------------------------------------------------------
# Part 2: one adversarial-training epoch.


def part_at_epoch(p: Part) -> None:
  """One PGD-10 adversarial-training epoch of ``configs/cifar10_resnet56.py`` per precision: compile (memory plan
  included), one call of every program, a few timed steps, then the whole epoch as a run dispatches it when it fits
  (else its projection from the timed steps); FLOPs, MFU and the projected sweep."""
  s = p.settings
  import train_throughput  # pylint: disable=g-import-not-at-top
  peak = known_peak(jax.devices()[0].device_kind)
  p.record(peak=peak)
  print(f'  matmul peak ({s.matmul_n}²)…', flush=True)
  p.record(matmul_peak_flops_per_s=train_throughput.matmul_peak(s.matmul_n, 5 if not s.tiny else 1))
  rng = np.random.default_rng(0)
  mesh = training_mesh(s.epoch_batch)
  images = place(rng.integers(0, 256, (s.epoch_images, 32, 32, 3), dtype=np.uint8), mesh)
  labels = place(rng.integers(0, 10, s.epoch_images).astype(np.int32), mesh)
  depth = int(s.epoch_model.removeprefix('resnet'))
  flops = None
  estimate, basis = (90.0 if not s.tiny else 5.0), 'a guess for the first'
  for precision in PRECISIONS:
    if not p.fits(estimate):
      p.skip(precision, f'budget: ≈ {estimate:.0f} s needed ({basis}), {p.left():.0f} s left')
      continue
    t0 = time.monotonic()
    config = _epoch_config(s, precision)
    strength = 8.0
    t = build_training(config, strength, images, labels, num_classes=10, augment_kind='cifar', mesh=mesh)
    if flops is None:  # the same arithmetic in both precisions; counted on the float32 model
      flops = train_throughput.count_flops(model_module(config.model.name, 10), t.variables, s.epoch_batch,
                                           int(config.attack.steps), depth=depth)
      p.record(flops_per_step=flops)
    perm = place(jax.random.permutation(jax.random.key(2), s.epoch_images).astype(jnp.int32), mesh)
    t_warm = time.perf_counter()
    for n in sorted(set(t.calls)):  # every distinct program runs once before anything is timed
      run_training_call(t, n, images, labels, perm)
    warm_s = time.perf_counter() - t_warm
    probe = []
    n0 = t.calls[0]
    for _ in range(3 if not s.tiny else 1):
      t1 = time.perf_counter()
      run_training_call(t, n0, images, labels, perm)
      probe.append((time.perf_counter() - t1) / n0)
    step_s = statistics.median(probe)
    projected_epoch_s = step_s * t.steps_per_epoch
    row = {'model': config.model.name, 'precision': precision, 'batch_size': s.epoch_batch,
           'epoch_images': t.steps_per_epoch * s.epoch_batch, 'steps_per_epoch': t.steps_per_epoch,
           'steps_per_call': n0, 'microbatches': t.microbatches, 'attack_steps': int(config.attack.steps),
           'compile_s': round(t.compile_s, 2), 'warmup_s': round(warm_s, 2),
           'probe_step_s': [round(x, 5) for x in probe], 'projected_epoch_s': round(projected_epoch_s, 2)}
    if p.fits(projected_epoch_s * 1.2 + 5):
      t1 = time.perf_counter()
      sums = run_training_epoch(t, images, labels, perm)
      epoch_s = time.perf_counter() - t1
      row.update(epoch_measured=True, epoch_s=round(epoch_s, 3), train_loss=sums['loss_sum'] / sums['count'])
    else:
      epoch_s = projected_epoch_s
      row.update(epoch_measured=False, epoch_s=round(epoch_s, 3),
                 epoch_note=f'budget: the epoch would take ≈ {projected_epoch_s:.0f} s; projected from the probe')
    step = epoch_s / t.steps_per_epoch
    achieved = flops['xla']['step'] / step
    row.update(seconds_per_step=round(step, 5), images_per_s=round(s.epoch_batch / step, 2),
               seconds_per_50k_epoch=round(50_000 / (s.epoch_batch / step), 2),
               achieved_flops_per_s=achieved, **mfu(achieved, precision, peak),
               table3_and_4_sweep=sweep_projection(epoch_s, depth, epochs=int(config.train.epochs),
                                                   strengths=len(config.sweep)))
    p.add(row)
    if precision == 'float32':
      p.shared['float32_epoch_s'] = (config.model.name, epoch_s)
    print(f'  {precision}: {row["images_per_s"]:.1f} img/s, epoch {epoch_s:.1f} s '
          f'({"measured" if row["epoch_measured"] else "projected"}), compile {t.compile_s:.1f} s; sweep of Tables '
          f'3+4 ≈ {row["table3_and_4_sweep"]["total_hours"]:.1f} h', flush=True)
    del t
    estimate, basis = time.monotonic() - t0, 'the last precision\'s time'


def _epoch_config(s: Settings, precision: str):
  config = load_config('cifar10_resnet56')
  config.model.name = s.epoch_model
  config.train.batch_size = s.epoch_batch
  config.precision = precision
  if s.train_attack_steps is not None:
    config.attack.steps = s.train_attack_steps
  return config


# ----------------------------------------------------------------------------------------------------------------
# Part 3: WRN-50-2, the memory plan against the allocator.


def part_wrn_memory(p: Part) -> None:
  """The training step of ``configs/tiny_imagenet.py`` (``microbatches='auto'``): what the memory plan predicts and
  picks, against the allocator's peak and the step time."""
  s = p.settings
  config = load_config('tiny_imagenet')
  config.model.name = s.wrn_model
  config.train.batch_size = s.wrn_batch
  if s.train_attack_steps is not None:
    config.attack.steps = s.train_attack_steps
  p.record(model=s.wrn_model, batch_size=s.wrn_batch, microbatches_requested=config.train.microbatches,
           precision=config.precision, attack_steps=int(config.attack.steps),
           note='memory figures per device, in bytes; predicted_peak = XLA arguments + temporaries + outputs − '
                'donated (memory_plan.Footprint); peak_bytes_in_use is the process\'s peak since it started')
  before = memory_stats()
  rng = np.random.default_rng(0)
  mesh = training_mesh(s.wrn_batch)
  images = place(rng.integers(0, 256, (s.wrn_images, 64, 64, 3), dtype=np.uint8), mesh)
  labels = place(rng.integers(0, 200, s.wrn_images).astype(np.int32), mesh)
  t = build_training(config, 8.0, images, labels, num_classes=200, augment_kind='tiny_imagenet', mesh=mesh)
  figures = memory_figures(t.program)
  p.record(microbatches_chosen=t.microbatches, compile_and_plan_s=round(t.compile_s, 2), memory_plan=figures)
  perm = place(jax.random.permutation(jax.random.key(2), s.wrn_images).astype(jnp.int32), mesh)
  n0 = t.calls[0]
  in_use = memory_stats()
  t1 = time.perf_counter()
  run_training_call(t, n0, images, labels, perm)
  first_s = time.perf_counter() - t1
  times = []
  for i in range(s.wrn_steps):
    if not p.fits(2 * (times[-1] if times else first_s)):
      p.skip(f'timed step {i + 1}', 'budget')
      break
    t1 = time.perf_counter()
    run_training_call(t, n0, images, labels, perm)
    times.append((time.perf_counter() - t1) / n0)
  after = memory_stats()
  row = {'first_call_s': round(first_s, 3), 'step_s': [round(x, 4) for x in times]}
  if times:
    row.update(step_s_median=statistics.median(times), images_per_s=s.wrn_batch / statistics.median(times))
  if after is None:
    row['measured'] = 'no memory_stats() on this backend'
  else:
    peak = after.get('peak_bytes_in_use')
    row.update(bytes_in_use_before_part=(before or {}).get('bytes_in_use'),
               peak_bytes_before_part=(before or {}).get('peak_bytes_in_use'),
               bytes_in_use_before_step=(in_use or {}).get('bytes_in_use'),
               peak_bytes_before_step=(in_use or {}).get('peak_bytes_in_use'), peak_bytes_in_use=peak,
               bytes_limit=after.get('bytes_limit'))
    # The allocator keeps one peak for the process: it shows the step's own only if the step raised it beyond
    # everything before (earlier parts, this program's compilation and autotuning).
    isolated = peak is not None and in_use is not None and peak > in_use.get('peak_bytes_in_use', -1)
    row['peak_isolated'] = isolated
    if isolated and 'new_bytes' in figures:
      measured_new = peak - in_use['bytes_in_use']
      row.update(measured_new_bytes=measured_new,
                 measured_over_predicted_new=measured_new / max(figures['new_bytes'], 1))
    elif not isolated:
      row['measured_note'] = 'the process reached its peak before the step: the step\'s own peak is not visible'
  p.add(row)
  print(f'  {s.wrn_model} batch {s.wrn_batch}: microbatches {t.microbatches}, step '
        f'{row.get("step_s_median", float("nan")):.3f} s; predicted new bytes {figures.get("new_bytes")}, '
        f'measured {row.get("measured_new_bytes")}', flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Part 4: APGD-CE and AutoAttack against the authors' code.


def part_apgd_autoattack(p: Part) -> None:
  """APGD-CE at each radius of :data:`EPS_APGD`, then AutoAttack (standard: APGD-CE → APGD-T → FAB-T → Square) at
  :data:`EPS_AUTOATTACK`: arreg_jax and, when its code is there, the authors' PyTorch attacks in turn."""
  s = p.settings
  import apgd_throughput  # pylint: disable=g-import-not-at-top
  import attack_throughput as at  # pylint: disable=g-import-not-at-top
  _, apgd, autoattack = attack_functions()
  name = s.apgd_model
  rng = np.random.default_rng(0)
  size = at.INPUT_SIZE[name]
  module, variables = at.random_variables(name, jax.random.key(0), rng.random((8, size, size, 3), dtype=np.float32))
  n = s.apgd_images
  images = rng.random((n, size, size, 3), dtype=np.float32)
  variables = apgd_throughput.calibrate_head(module, variables, images)  # logits: mean 0, std 1 over the images
  logits_fn = jax.jit(module.apply)
  labels = np.asarray(jnp.argmax(logits_fn(variables, images), -1)).astype(np.int32)
  p.record(model=name, images=n, apgd_steps=s.apgd_steps, autoattack={'eps': EPS_AUTOATTACK, 'version': 'standard',
           'attacks': ['apgd_ce', 'apgd_t', 'fab_t', 'square'], 'n_targets': s.aa_targets,
                                                               'queries': s.aa_queries},
           inputs='uniform random images labelled with the clean prediction; random weights, head recalibrated '
                  '(apgd_throughput.calibrate_head); arreg_jax compiled ahead of time (compile_s), then one timed call')
  authors, why = _authors_code(p.autoattack_dir)
  if authors is None:
    p.skip('authors', why)
  else:
    p.record(authors_code=why)
    authors = _Authors(p, authors, name, variables, images, labels, logits_fn)
  x, y = jnp.asarray(images), jnp.asarray(labels)
  robust = lambda adv: float(np.mean(np.asarray(jnp.argmax(logits_fn(variables, adv), -1)) == labels))
  args = (variables, x, y, jax.random.key(1), jnp.float32(EPS_APGD[0]))
  t0 = time.perf_counter()
  jax_apgd = jax.jit(lambda v, x, y, k, e: apgd(lambda z: module.apply(v, z), x, y, k, eps=e, steps=s.apgd_steps,
                                                loss='ce')).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  apgd_s = pair_s = None
  for eps in EPS_APGD:  # ε is an argument: one compiled program for both radii
    if pair_s is not None and not p.fits(pair_s):
      p.skip(f'apgd eps {eps * 255:g}/255', f'budget: the last radius took {pair_s:.0f} s, {p.left():.0f} s left')
      continue
    t0 = time.perf_counter()
    adv = jax.block_until_ready(jax_apgd(variables, x, y, jax.random.key(2), jnp.float32(eps)))
    apgd_s = time.perf_counter() - t0
    p.add({'attack': 'apgd_ce', 'eps': eps, 'eps_times_255': round(eps * 255, 3), 'method': 'arreg_jax',
           'compile_s': round(compile_s, 2), 'seconds': round(apgd_s, 4), 'images_per_s': round(n / apgd_s, 2),
           'robust_accuracy': robust(adv), 'max_linf': float(jnp.max(jnp.abs(adv - x)))})
    if authors is not None:
      authors.apgd(eps)
    pair_s = time.perf_counter() - t0
  # The cascade: APGD-CE, 9 APGD-T runs, 9 FAB-T runs, Square's queries (a forward each, about 1/300 of an APGD run of 100
  # forward-backward iterations), guessed from one APGD-CE run; compiling it takes longer than APGD-CE alone.
  estimate = (21 + s.aa_queries / 300) * (apgd_s or 1.0) + 3 * compile_s
  if not p.fits(estimate):
    p.skip('autoattack', f'budget: ≈ {estimate:.0f} s needed, {p.left():.0f} s left')
    return
  args = (variables, x, y, jax.random.key(3), jnp.float32(EPS_AUTOATTACK))
  t0 = time.perf_counter()
  jax_aa = jax.jit(lambda v, x, y, k, e: autoattack(lambda z: module.apply(v, z), x, y, k, eps=e, version='standard',
                                                    return_history=True, steps=s.apgd_steps, n_targets=s.aa_targets,
                                                    queries=s.aa_queries)).lower(*args).compile()
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  adv, history = jax.block_until_ready(jax_aa(*args))
  secs = time.perf_counter() - t0
  p.add({'attack': 'autoattack_standard', 'eps': EPS_AUTOATTACK, 'method': 'arreg_jax',
         'compile_s': round(compile_s, 2), 'seconds': round(secs, 4), 'images_per_s': round(n / secs, 2),
         'robust_accuracy': robust(adv),
         'robust_after': {k: float(np.mean(np.asarray(history[k])))  # in cascade order (pytrees sort keys)
                          for k in ('clean', 'apgd_ce', 'apgd_t', 'fab_t', 'square') if k in history}})
  if authors is not None:
    if p.fits(2 * secs):
      authors.autoattack()
    else:
      p.skip('authors autoattack', f'budget: arreg_jax\'s took {secs:.0f} s, {p.left():.0f} s left')


def _authors_code(folder: str):
  """``(the imported autoattack package, description)`` or ``(None, why not)``."""
  torch = _optional('torch')
  if torch is None:
    return None, 'torch is not installed'
  if not os.path.isdir(os.path.join(folder, 'autoattack')):
    return None, (f'the authors\' code is not at {folder}/autoattack (github.com/fra31/auto-attack; '
                  'benchmarks/README.md, "GPU suite")')
  sys.path.insert(0, os.path.abspath(folder))
  try:
    import autoattack  # pylint: disable=g-import-not-at-top
    import autoattack.autopgd_base  # pylint: disable=g-import-not-at-top,unused-import  (APGD, imported later)
  except Exception as e:  # pylint: disable=broad-except
    return None, f'the authors\' code at {folder} does not import: {type(e).__name__}: {e}'
  commit = None
  for f in ('COMMIT', '.git/HEAD'):
    if os.path.exists(os.path.join(folder, f)):
      with open(os.path.join(folder, f)) as fh:
        commit = fh.read().strip()
      break
  return autoattack, f'{folder} (commit {commit})'


class _Authors:
  """The authors' PyTorch attacks (github.com/fra31/auto-attack) on the PyTorch twin of the same model."""

  def __init__(self, p: Part, autoattack, name, variables, images, labels, logits_fn):
    import torch  # pylint: disable=g-import-not-at-top
    import attack_throughput as at  # pylint: disable=g-import-not-at-top
    import torch_models  # pylint: disable=g-import-not-at-top
    self.p, self.lib, self.torch, self.n = p, autoattack, torch, len(labels)
    self.dev = 'cuda' if torch.cuda.is_available() else 'cpu'
    tmodel = torch_models.build(name, at.NUM_CLASSES[name], jax.device_get(variables)).eval().requires_grad_(False)
    self.model = tmodel.to(self.dev)
    self.x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy()).to(self.dev)
    self.y = torch.from_numpy(labels.astype(np.int64)).to(self.dev)
    with torch.no_grad():
      tl = self.model(self.x).float().cpu().numpy()
    jl = np.asarray(logits_fn(variables, images))
    p.record(twin_check={'logits_max_rel_err': float(np.abs(tl - jl).max() / np.abs(jl).max()),
                         'same_prediction': float(np.mean(tl.argmax(1) == jl.argmax(1))), 'device': self.dev})

  def _timed(self, fn):
    t0 = time.perf_counter()
    adv = fn()
    if self.dev == 'cuda':
      self.torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    with self.torch.no_grad():
      acc = float((self.model(adv).argmax(1) == self.y).float().mean())
    return adv, secs, acc

  def apgd(self, eps: float) -> None:
    from autoattack.autopgd_base import APGDAttack  # pylint: disable=g-import-not-at-top
    s = self.p.settings
    attack = APGDAttack(self.model, n_iter=s.apgd_steps, norm='Linf', n_restarts=1, eps=eps, seed=0, loss='ce',
                        rho=.75, device=self.dev)
    adv, secs, acc = self._timed(lambda: attack.perturb(self.x, self.y))
    self.p.add({'attack': 'apgd_ce', 'eps': eps, 'eps_times_255': round(eps * 255, 3), 'method': 'authors',
                'seconds': round(secs, 4), 'images_per_s': round(self.n / secs, 2), 'robust_accuracy': acc,
                'max_linf': float((adv - self.x).abs().max())})

  def autoattack(self) -> None:
    s = self.p.settings
    aa = self.lib.AutoAttack(self.model, norm='Linf', eps=EPS_AUTOATTACK, version='custom',
                             attacks_to_run=['apgd-ce', 'apgd-t', 'fab-t', 'square'], device=self.dev, verbose=False)
    aa.apgd.n_restarts, aa.apgd.n_iter = 1, s.apgd_steps  # the standard version's settings
    aa.fab.n_restarts, aa.fab.n_iter, aa.fab.n_target_classes = 1, s.apgd_steps, s.aa_targets
    aa.apgd_targeted.n_target_classes, aa.apgd_targeted.n_restarts = s.aa_targets, 1
    aa.apgd_targeted.n_iter = s.apgd_steps
    aa.square.n_queries = s.aa_queries
    _, secs, acc = self._timed(lambda: aa.run_standard_evaluation(self.x, self.y, bs=self.n))
    self.p.add({'attack': 'autoattack_standard', 'eps': EPS_AUTOATTACK, 'method': 'authors',
                'seconds': round(secs, 4), 'images_per_s': round(self.n / secs, 2), 'robust_accuracy': acc})


# ----------------------------------------------------------------------------------------------------------------
# Part 5: spectral clipping.


def part_spectral_clip(p: Part) -> None:
  """``spectral_clip.bench_model``: every conv layer clipped in one program and layer by layer, and all spectra, once
  (compilations included); then, if the time it took says the rest fits, ``spectral_repeats`` timed repeats and eigh
  vs svd. As a share of part 2's float32 epoch when both ran on the same model."""
  s = p.settings
  import spectral_clip  # pylint: disable=g-import-not-at-top
  shared = p.shared.get('float32_epoch_s')
  epoch_s = shared[1] if shared and shared[0] == s.spectral_model else None
  p.record(model=s.spectral_model, epoch_seconds_from_part_2=epoch_s)
  args = lambda repeats, eigh: argparse.Namespace(max_sv=1.0, rounds=1, repeats=repeats, dense=False, eigh=eigh,
                                                  epoch_seconds=epoch_s)
  t0 = time.monotonic()
  quick = spectral_clip.bench_model(s.spectral_model, args(1, False))
  p.add({'pass': 'once', **quick})
  once_s = time.monotonic() - t0
  t = quick['timings']
  rounds = t['batched']['median_s'] + t['per_layer']['median_s'] + t['svs_batched']['median_s']
  # A second pass recompiles the single programs, times every method (1 + repeats) times, and eigh vs svd takes
  # about three spectra per repeat.
  estimate = once_s + rounds * (1 + s.spectral_repeats) + 3 * t['svs_batched']['median_s'] * s.spectral_repeats
  if p.fits(estimate):
    p.add({'pass': 'repeats', **spectral_clip.bench_model(s.spectral_model, args(s.spectral_repeats, True))})
  else:
    p.skip(f'{s.spectral_repeats} repeats and eigh vs svd', f'budget: ≈ {estimate:.0f} s needed, {p.left():.0f} s left')


# ----------------------------------------------------------------------------------------------------------------
# Part 6: the embedded default, end to end.


def part_mnist_default(p: Part) -> None:
  """The embedded default's command in a subprocess (its workdir in a temporary folder: only its figures come
  back), timed; training, analysis and report seconds read from its output."""
  s = p.settings
  workdir = tempfile.mkdtemp(prefix='gpu_suite_mnist_')  # not under --out: only its figures come back
  argv = mnist_default_argv(workdir, s.tiny)
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([REPO] + [x for x in env.get('PYTHONPATH', '').split(os.pathsep) if x])
  if jax.devices()[0].platform != 'cpu':
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'  # this process already holds JAX's preallocated pool
  if s.tiny:
    env['JAX_THREEFRY_PARTITIONABLE'] = '0'  # as this process in tiny mode (main): compiles in a third of the time
  p.record(mnist_command=' '.join(argv), workdir=f'{workdir} (removed at the end)',
           child_env={k: env.get(k) for k in ('XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_FLAGS', 'JAX_PLATFORMS',
                                              'JAX_THREEFRY_PARTITIONABLE')})
  log_path = os.path.join(workdir, 'suite_log.txt')
  t0 = time.perf_counter()
  timed_out = False
  with open(log_path, 'w') as log:
    try:
      proc = subprocess.run(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            timeout=max(p.left(), 1.0))
      code = proc.returncode
    except subprocess.TimeoutExpired:
      timed_out, code = True, None
  wall = time.perf_counter() - t0
  with open(log_path, errors='replace') as f:
    log_text = f.read()
  row = {'wall_s': round(wall, 2), 'returncode': code, 'timed_out': timed_out,
         'log_tail': log_text[-3000:]}
  m = re.search(r'sweep (?:trained|finished) in ([\d.]+) s', log_text)  # training.loop.train_sweep's line
  row['training_s'] = float(m.group(1)) if m else None
  row['analysis_s'] = {k: float(v) for k, v in re.findall(r'\[analysis\] (\S+): ([\d.]+) s', log_text)}
  m = re.search(r'\[report\] \S+ \(([\d.]+) s\)', log_text)
  row['report_s'] = float(m.group(1)) if m else None
  summary = os.path.join(workdir, 'summary.json')
  if os.path.exists(summary):
    with open(summary) as f:
      row['summary_rows'] = json.load(f).get('rows')
  shutil.rmtree(workdir, ignore_errors=True)  # checkpoints and all: what matters is in this part's file
  p.add(row)
  print(f'  {" ".join(argv[1:5])}: exit {code}, {wall:.1f} s{" (timed out)" if timed_out else ""}', flush=True)
  if code != 0:
    raise RuntimeError(f'the MNIST default {"timed out" if timed_out else f"exited {code}"}; log tail in the JSON')


# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PartSpec:
  name: str
  title: str
  run: Callable[[Part], None]
  least_s: dict  # {tiny: seconds}: below this much time left the part is skipped
  cap_s: dict  # {tiny: seconds}: the part stops starting new measurements after this long


# Least and most seconds per part ({tiny: s}). Guesses until a GPU run has timed them: the full caps add up to more
# than the default 480 s on purpose, so that an early part that finishes fast leaves its time to the later ones.
PARTS = (
    PartSpec('pgd_attack', 'L∞ PGD-10: arreg_jax vs torchattacks vs PyTorch eager and compiled', part_pgd_attack,
             {False: 60, True: 1}, {False: 170, True: 60}),
    PartSpec('at_epoch', 'one PGD-10 adversarial-training epoch, CIFAR-10-sized', part_at_epoch,
             {False: 60, True: 1}, {False: 130, True: 60}),
    PartSpec('wrn_memory', 'WRN-50-2 training step: memory plan vs allocator', part_wrn_memory,
             {False: 45, True: 1}, {False: 90, True: 60}),
    PartSpec('apgd_autoattack', 'APGD-CE and AutoAttack vs the authors\' code', part_apgd_autoattack,
             {False: 45, True: 1}, {False: 100, True: 60}),
    PartSpec('spectral_clip', 'spectral clipping of every conv layer', part_spectral_clip,
             {False: 10, True: 1}, {False: 30, True: 60}),
    PartSpec('mnist_default', 'the embedded MNIST default end to end', part_mnist_default,
             {False: 60, True: 1}, {False: 180, True: 120}),
)


def _optional(name: str):
  """The module ``name`` if it is installed (and imports), else None."""
  try:
    return importlib.import_module(name)
  except ImportError:
    return None
