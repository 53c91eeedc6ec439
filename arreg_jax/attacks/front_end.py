"""The AutoAttack front end researchers know from the authors' code (fra31/auto-attack) and torchattacks:

    adversary = attacks.AutoAttack(logits_fn, norm='Linf', eps=8/255, version='standard')
    x_adv, result = adversary.run_standard_evaluation(x_test, y_test, bs=250)

It runs the stages of :mod:`.cascade` (APGD-CE → APGD-T → FAB-T → Square for 'standard') one after another over
the whole data set, each run of a stage (a restart, a target of APGD-T or FAB-T) on the points every earlier run
left robust — as the authors' code, so a target costs only what is left to attack — in batches of ``bs`` sharded
over the
devices (:func:`arreg_jax.sharding.map_batches`); it prints the clean accuracy, a progress line per batch (points
done, img/s, ETA) and the robust accuracy after each stage, and returns the adversarial images with an
:class:`AutoAttackResult` (clean, per-stage and final robust accuracy, the per-example robust mask, seconds per stage,
warnings), saved as JSON on request.

Before attacking it runs the authors' cheap checks on the first batch — a random forward pass, outputs that look
like probabilities, zero input gradients — and after Square the check that the gradient-free attack did not break
points the gradient-based ones missed; each failure is a warning with its reason, recorded in the result.

Compiled once: every stage is one program per (model function, stage settings, norm, batch size) — the target of a
run is a traced argument; FAB's restarts with a random start are a second program — with ε, the keys and a model
pair's parameters traced. The last batch of a run is padded to the smallest of at most four sizes (``bs``, ``bs``/2,
``bs``/4, ``bs``/8, rounded to the device count) that holds it, so a run left with few robust points does not attack
a full batch of padding, and a second evaluation — another ε, new weights of the same architecture — reuses every
program.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import sharding
from arreg_jax.attacks import cascade
from arreg_jax.attacks import gradient_masking, input_checks
from arreg_jax.attacks.norm_balls import norms


def _clean_batch(params, images, labels, mask, *, apply_fn):
  del mask
  logits = apply_fn(params, images).astype(jnp.float32)
  return {'correct': jnp.argmax(logits, -1) == labels, 'logits': logits}


def _run_batch(params, images, labels, mask, key_data, eps, target, *, apply_fn, stage, random_start, norm, layout):
  logits_fn = lambda x: apply_fn(params, x)
  x_adv, broken = cascade.run_stage(stage, logits_fn, images, labels, jax.random.wrap_key_data(key_data), eps, norm,
                                    mask, layout, one_run=random_start, target=target)
  return {'x_adv': x_adv.astype(images.dtype), 'broken': broken}


_clean_program = jax.jit(_clean_batch, static_argnames=('apply_fn',))
_run_program = jax.jit(_run_batch, static_argnames=('apply_fn', 'stage', 'random_start', 'norm', 'layout'))


@dataclasses.dataclass
class AutoAttackResult:
  """What :meth:`AutoAttack.run_standard_evaluation` measured (accuracies are shares in [0, 1])."""
  version: str
  norm: str
  eps: float
  n: int
  clean_accuracy: float
  robust_accuracy: float
  stages: dict[str, float]  # robust accuracy after each stage run, in order
  robust: np.ndarray  # (N,) bool: correct when clean and not broken by any stage
  seconds: dict[str, float]  # per stage, and 'clean', 'checks', 'total'
  attacks: list[str]  # the stages run, with their settings
  dropped: dict[str, str]  # stages dropped or reduced for the model's class count, and why
  warnings: list[str]
  settings: dict[str, Any]

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out['robust'] = [int(v) for v in np.asarray(self.robust)]
    return out

  def save_json(self, path: str) -> None:
    """Writes :meth:`to_dict` to ``path`` (atomically: a temporary file renamed into place)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
      json.dump(self.to_dict(), f, indent=1)
      f.write('\n')
    os.replace(tmp, path)


def _batch_sizes(bs: int, devices: int) -> tuple[int, ...]:
  return tuple(sorted({-(-max(bs >> j, 1) // devices) * devices for j in range(4)}))


def _clock(seconds: float) -> str:
  s = int(round(seconds))
  return f'{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}' if s >= 3600 else f'{s // 60}:{s % 60:02d}'


class AutoAttack:
  """AutoAttack (Croce & Hein, ICML 2020) over a data set, with the API of the authors' ``AutoAttack`` class.

  Args:
    model: ``logits_fn(images) -> logits (N, K)``, or a model pair with ``apply_fn(params, images)`` and ``params``
      (a Flax linen module: ``lambda x: module.apply(variables, x)``; NNX: ``lambda x: model(x)``; Equinox:
      ``jax.vmap(model)``). A pair's parameters are a traced argument: new weights recompile nothing.
    norm: 'Linf' or 'L2' (also 'linf', 'l2').
    eps: radius, in (0, 1] for L∞ (8/255, not 8), > 0 for L2.
    version: 'standard' (APGD-CE → APGD-T → FAB-T → Square), 'plus', or 'custom' with ``attacks_to_run``.
    attacks_to_run: the stages of 'custom', e.g. ``['apgd-ce', 'fab-t']`` (the authors' names or ours,
      :data:`arreg_jax.attacks.STAGE_NAMES`).
    seed: the evaluation's random seed (stage i of batch b draws from ``fold_in(fold_in(key(seed), i), b)``).
    verbose: print the progress and accuracy lines.
    steps, n_targets, queries: APGD/FAB iterations, APGD-T/FAB-T targets, Square queries (the authors' 100, 9,
      5000); fewer make a cheaper, weaker evaluation that is no longer AutoAttack's standard version.
    layout: 'NHWC' or 'NCHW', the layout of the images and of the model's input (Square reads it).
    mesh: the devices to shard batches over (default: every device).
    log: where the lines go (default ``print``).
    checks: run the authors' checks (random forward pass, probabilities, zero gradients) on the first batch.
  """

  def __init__(self, model: Any, norm: str = 'Linf', eps: float = 8 / 255, version: str = 'standard',
               attacks_to_run: Sequence[str] = (), seed: int = 0, verbose: bool = True, *, steps: int = 100,
               n_targets: int = 9, queries: int = 5000, layout: str = 'NHWC', mesh: jax.sharding.Mesh | None = None,
               log: Callable[[str], None] | None = None, checks: bool = True):
    self.apply_fn, self.params = input_checks.split_model(model, 'model')
    self.norm = input_checks.norm_name(norm)
    input_checks.check_eps(eps, self.norm)
    if not input_checks.is_concrete(eps) or np.ndim(eps) != 0:
      raise ValueError(f'eps must be a number, got {eps!r}')
    self.epsilon = float(eps)
    self.version = version
    names = [str(a).replace('-', '_') for a in attacks_to_run]
    self.stages = cascade.version_stages(version, attacks=names or None,
                                         steps=input_checks.static_int(steps, 'steps'),
                                         n_targets=input_checks.static_int(n_targets, 'n_targets'),
                                         queries=input_checks.static_int(queries, 'queries'))
    self.seed = input_checks.static_int(seed, 'seed', minimum=0)
    self.verbose = bool(verbose)
    self.layout = str(layout).upper()
    self.mesh = mesh
    self._log = log or functools.partial(print, flush=True)
    self.checks = bool(checks)

  @property
  def attacks_to_run(self) -> list[str]:
    return [s.name for s in self.stages]

  def log(self, line: str) -> None:
    if self.verbose:
      self._log(f'[AutoAttack] {line}')

  def _check_data(self, x, y) -> int:
    x = x if isinstance(x, (np.ndarray, jax.Array)) else np.asarray(x)
    input_checks.check_images(x)
    if any(s.name == 'square' for s in self.stages):
      input_checks.check_layout(x, self.layout)
    _, k = input_checks.logits_shape(lambda z: self.apply_fn(self.params, z), x[:1])
    input_checks.check_labels(y, x.shape[0], k)
    return k

  def _map(self, kernel, x, y, bs, **kw) -> dict[str, np.ndarray]:
    return sharding.map_batches(kernel, self.params, x, y, batch_size=bs, mesh=self.mesh, fixed_batch=True, **kw)

  def clean_accuracy(self, x_orig, y_orig, bs: int = 250) -> float:
    """The share of ``x_orig`` classified as ``y_orig``."""
    x, y = np.asarray(x_orig), np.asarray(y_orig)
    self._check_data(x, y)
    self.mesh = self.mesh or sharding.make_mesh()
    return float(np.mean(self._clean(x, y, bs)[0]))

  def _clean(self, x, y, bs) -> tuple[np.ndarray, np.ndarray]:
    kernel = functools.partial(_clean_program, apply_fn=self.apply_fn)
    sizes = _batch_sizes(bs, self.mesh.size)
    correct, first_logits = [], None
    for start in range(0, len(y), sizes[-1]):
      chunk = slice(start, min(start + sizes[-1], len(y)))
      size = min(s for s in sizes if s >= chunk.stop - chunk.start)
      out = self._map(kernel, x[chunk], y[chunk], size)
      correct.append(out['correct'])
      first_logits = out['logits'] if first_logits is None else first_logits
    return np.concatenate(correct), first_logits

  def _checks(self, x, y, logits) -> list[str]:
    """The authors' checks on the first batch: randomness, probabilities, zero gradients (warnings)."""
    messages = []
    if input_checks.looks_like_probabilities(logits):
      msg = ('the model seems to return probabilities (every row in [0, 1] and summing to 1): AutoAttack needs the '
             'logits; remove the final softmax')
      warnings.warn(msg, input_checks.ProbabilitiesWarning, stacklevel=3)
      messages.append(msg)
    model = _Pair(self.apply_fn, self.params)
    found = {'deterministic': gradient_masking.deterministic(model, x),
             'zero_gradients': gradient_masking.zero_gradients(model, x, y)}
    return messages + gradient_masking.warn_failed(found, 'AutoAttack')

  def run_standard_evaluation(self, x_orig, y_orig, bs: int = 250,
                              save_json: str | None = None) -> tuple[np.ndarray, AutoAttackResult]:
    """Runs the cascade over ``x_orig``; returns the adversarial images (NumPy, input shape and dtype; the clean
    image where no stage succeeded) and the :class:`AutoAttackResult` (also written to ``save_json`` if given).

    Args:
      x_orig: float (N, H, W, C) in [0, 1] (NCHW with ``layout='NCHW'``), NumPy or JAX.
      y_orig: int (N,) true classes.
      bs: the batch size of the compiled programs (rounded to a multiple of the device count).
      save_json: a path for the result as JSON.
    """
    t_start = time.perf_counter()
    x, y = np.asarray(x_orig), np.asarray(y_orig)
    k = self._check_data(x, y)
    bs = input_checks.static_int(bs, 'bs')
    self.mesh = self.mesh or sharding.make_mesh()
    bs = max(bs // self.mesh.size, 1) * self.mesh.size
    kept, dropped = cascade.plan(self.stages, k)
    result_warnings = []
    for name, why in dropped.items():
      msg = f'{k}-class model: {cascade.STAGE_LABELS[name]} {why}'
      warnings.warn(f'AutoAttack on a {msg}', cascade.ReducedCascadeWarning, stacklevel=2)
      result_warnings.append(msg)
    self.log(f'using {self.version} version including {", ".join(s.label for _, s in kept)} '
             f'({self.norm}, eps = {self.epsilon:.5g}, {len(y)} points, batches of {bs} on {self.mesh.size} '
             f'device(s))')
    t = time.perf_counter()
    robust, first_logits = self._clean(x, y, bs)
    seconds = {'clean': time.perf_counter() - t}
    clean_acc = float(np.mean(robust))
    self.log(f'initial accuracy: {100 * clean_acc:.2f}%')
    t = time.perf_counter()
    first = slice(0, min(bs, len(y)))
    if self.checks:
      result_warnings += self._checks(x[first], y[first], first_logits)
    seconds['checks'] = time.perf_counter() - t
    x_adv = x.copy()
    accuracy = {'clean': clean_acc}
    key = jax.random.key(self.seed)
    for i, stage in kept:
      t = time.perf_counter()
      self._run_stage(stage, jax.random.fold_in(key, i), x, y, x_adv, robust, bs)
      seconds[stage.name] = time.perf_counter() - t
      accuracy[stage.name] = float(np.mean(robust))
      self.log(f'robust accuracy after {stage.label}: {100 * accuracy[stage.name]:.2f}% '
               f'({seconds[stage.name]:.1f} s)')
    if 'square' in accuracy and len(accuracy) > 2:
      before = min(v for n, v in accuracy.items() if n != 'square')
      if accuracy['square'] < before - 0.002:
        msg = (f'Square Attack lowered the robust accuracy by {100 * (before - accuracy["square"]):.2f} points after '
               'the gradient-based attacks: they may be misled (gradient masking); the robust accuracy of the '
               'gradient-based attacks alone is not reliable')
        warnings.warn(msg, gradient_masking.GradientMaskingWarning, stacklevel=2)
        result_warnings.append(msg)
    seconds['total'] = time.perf_counter() - t_start
    dist = np.asarray(norms(jnp.asarray(x_adv - x), self.norm))
    self.log(f'max {self.norm} perturbation: {float(dist.max()):.5f}, nan in tensor: {int(np.isnan(x_adv).sum())}, '
             f'max: {float(x_adv.max()):.5f}, min: {float(x_adv.min()):.5f}')
    self.log(f'robust accuracy: {100 * float(np.mean(robust)):.2f}% ({seconds["total"]:.1f} s)')
    result = AutoAttackResult(
        version=self.version, norm=self.norm, eps=self.epsilon, n=int(len(y)), clean_accuracy=clean_acc,
        robust_accuracy=float(np.mean(robust)), stages=accuracy, robust=robust.copy(),
        seconds={n: round(v, 3) for n, v in seconds.items()},
        attacks=[f'{s.label}' + _describe(s) for _, s in kept], dropped=dropped, warnings=result_warnings,
        settings={'batch_size': bs, 'devices': self.mesh.size, 'seed': self.seed, 'layout': self.layout,
                  'stages': [dataclasses.asdict(s) for _, s in kept]})
    if save_json:
      result.save_json(save_json)
    return x_adv, result

  def _run_stage(self, stage, key, x, y, x_adv, robust, bs) -> None:
    """One stage over the points still ``robust``, in place: updates ``x_adv`` and ``robust``. As the authors'
    code, each run of the stage (a restart, or a target of APGD-T/FAB-T) attacks only the points every earlier run
    left robust, in batches of at most ``bs`` (the last one padded to the smallest of :func:`_batch_sizes`)."""
    sizes = _batch_sizes(bs, self.mesh.size)
    eps = np.float32(self.epsilon)
    runs = cascade.stage_runs(stage)
    t0, done = time.perf_counter(), 0
    for r, (random_start, target) in enumerate(runs):
      todo = np.flatnonzero(robust)
      if todo.size == 0:
        return
      kernel = functools.partial(_run_program, apply_fn=self.apply_fn, stage=stage, random_start=random_start,
                                 norm=self.norm, layout=self.layout)
      n_batches = -(-todo.size // bs)
      what = stage.label + (f' target {target + 1}/{stage.n_targets}' if stage.name in ('apgd_t', 'fab_t') else '')
      what += f' restart {r % stage.restarts + 1}/{stage.restarts}' if stage.restarts > 1 else ''
      for b in range(n_batches):
        idx = todo[b * bs:(b + 1) * bs]
        size = min(s for s in sizes if s >= idx.size)
        out = self._map(kernel, x[idx], y[idx], size, extra=(eps, np.int32(target)),
                        batch_key=jax.random.fold_in(jax.random.fold_in(key, r), b))
        broken = out['broken']
        x_adv[idx[broken]] = out['x_adv'][broken]
        robust[idx[broken]] = False
        done += idx.size
        rate = done / max(time.perf_counter() - t0, 1e-9)
        left = todo.size - (b * bs + idx.size) + (len(runs) - r - 1) * int(robust.sum())
        self.log(f'{what} - {b + 1}/{n_batches} - {int(broken.sum())} out of {idx.size} successfully perturbed - '
                 f'{int(robust.sum())} robust points left, {rate:.1f} img/s, ETA {_clock(left / rate)}')


def _describe(stage: cascade.Stage) -> str:
  if stage.name == 'square':
    return f' ({stage.queries} queries)'
  targets = f', {stage.n_targets} targets' if stage.name in ('apgd_t', 'fab_t') else ''
  return f' ({stage.steps} iterations, {stage.restarts} restart(s){targets})'


@dataclasses.dataclass(frozen=True)
class _Pair:
  apply_fn: Callable
  params: Any
