"""Device memory planned before the first step: the compiled program's footprint against the device's free memory.

A program is compiled ahead of time (``jax.jit(f).lower(...).compile()``) and XLA's buffer assignment read back
(``compiled.memory_analysis()``). Per device, one call allocates ``temp + output − alias`` bytes on top of its
arguments (alias: outputs written into donated inputs — the training state). The arguments (dataset, state) are
already resident when the plan runs, so these *new* bytes are compared with the device's free memory:

* GPU / TPU: ``device.memory_stats()``: ``bytes_limit − bytes_in_use`` (the allocator's pool, less what is live);
* CPU: the host's ``MemAvailable`` (``/proc/meminfo``; psutil if that is unreadable and psutil is installed),
  divided among the local devices, since every XLA:CPU device runs its part of the program in the same memory.

A program fits when its new bytes are at most :data:`SAFETY` (90%) of the free bytes. Where either figure is
unknown (``memory_analysis()`` returns None on some backends, a device without ``memory_stats``), nothing is
planned and the run goes ahead. The free memory is injectable (``free=``) for tests.

Training with ``config.train.microbatches = 'auto'`` takes the smallest k (among the batch's divisors whose
microbatch splits over the devices) whose compiled step fits; the search compiles k = 1 and then jumps to the
smallest k predicted to fit, assuming temporaries shrink as 1/k (an optimistic guess, so it never skips a k that
would fit). A given k that does not fit raises :class:`~arreg_jax.errors.MemoryPlanError` naming the bytes and the
smallest k that does (verified by compiling it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import configuration, sharding
from arreg_jax.errors import MemoryPlanError
from arreg_jax.training import eval_step
from arreg_jax.training import step as step_lib

SAFETY = 0.9
GiB = 2 ** 30


@dataclasses.dataclass(frozen=True)
class Footprint:
  """XLA's per-device buffer sizes of one compiled program, in bytes."""
  argument: int
  output: int
  alias: int
  temp: int

  @property
  def new_bytes(self) -> int:
    """Bytes one call allocates beyond its arguments."""
    return max(self.temp + self.output - self.alias, 0)

  @property
  def peak_bytes(self) -> int:
    return self.argument + self.new_bytes


def footprint(compiled) -> Footprint | None:
  """The :class:`Footprint` of a ``jax.stages.Compiled``, or None where the backend reports none."""
  try:
    m = compiled.memory_analysis()
  except (NotImplementedError, RuntimeError):
    return None
  if m is None:
    return None
  return Footprint(argument=int(m.argument_size_in_bytes), output=int(m.output_size_in_bytes),
                   alias=int(m.alias_size_in_bytes), temp=int(m.temp_size_in_bytes))


def host_available_bytes() -> int | None:
  """The host's available memory (``MemAvailable``), or None where it cannot be read."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  try:
    import psutil  # pylint: disable=g-import-not-at-top  (optional; not a dependency)
    return int(psutil.virtual_memory().available)
  except ImportError:
    return None


def free_bytes(device=None, local_devices: int = 1) -> int | None:
  """Free memory of ``device`` (default: the first): its allocator's limit less what is in use, or on CPU the
  host's available memory shared among ``local_devices``; None if unknown."""
  device = device or jax.local_devices()[0]
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):
    stats = None
  if stats and 'bytes_limit' in stats:
    return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))
  if device.platform == 'cpu':
    avail = host_available_bytes()
    return None if avail is None else avail // max(int(local_devices), 1)
  return None


def fits(fp: Footprint, free: int, safety: float = SAFETY) -> bool:
  return fp.new_bytes <= safety * free


def gib(n: int) -> str:
  return f'{n / GiB:.2f} GiB ({n:,} bytes)'


def describe(fp: Footprint, free: int) -> str:
  return (f'needs {gib(fp.new_bytes)} per device beyond its {fp.argument / GiB:.2f} GiB of resident arguments '
          f'(XLA: temporaries {fp.temp / GiB:.2f} GiB + outputs {fp.output / GiB:.2f} GiB − donated '
          f'{fp.alias / GiB:.2f} GiB), but {gib(free)} are free ({SAFETY:.0%} usable)')


def _predicted_new(fp: Footprint, k_measured: int, k: int) -> float:
  """New bytes at ``k`` microbatches if temporaries shrank as 1/k (a lower bound on what k needs)."""
  return fp.temp * k_measured / k + fp.output - fp.alias


def smallest_fitting(measure: Callable[[int], tuple[Any, Footprint]], candidates: Sequence[int], free: int
                     ) -> tuple[int | None, Any, Footprint | None]:
  """``(k, program, footprint)`` for the smallest ``k`` of ``candidates`` (ascending) whose measured program fits,
  compiling as few as the 1/k prediction allows; ``(None, None, last footprint)`` if none fits."""
  i, fp = 0, None
  while i < len(candidates):
    k = candidates[i]
    program, fp = measure(k)
    logging.info('memory plan: %d microbatch(es): %s', k, describe(fp, free))
    if fits(fp, free):
      return k, program, fp
    i = next((j for j in range(i + 1, len(candidates))
              if _predicted_new(fp, k, candidates[j]) <= SAFETY * free), len(candidates))
  return None, None, fp


def plan_train_step(compile_k: Callable[[int], Any], requested, candidates: Sequence[int], *, what: str,
                    free: int | None) -> tuple[int, Any]:
  """Chooses the training step's microbatch count: ``(k, compiled program)``.

  ``compile_k(k)`` compiles the step with k microbatches; ``requested`` is ``config.train.microbatches`` (an int
  or 'auto'); ``candidates`` the admissible counts, ascending; ``free`` the device's free bytes (None: unknown).
  Raises MemoryPlanError when the requested count (or, for 'auto', every candidate) does not fit.
  """
  first = 1 if requested == 'auto' else int(requested)
  program = compile_k(first)
  fp = footprint(program)
  if fp is None or free is None:
    logging.info('%s: no memory figures on this backend (%s); memory not planned, %d microbatch(es)', what,
                 'footprint' if fp is None else 'free memory', first)
    return first, program
  logging.info('memory plan: %d microbatch(es): %s', first, describe(fp, free))
  if fits(fp, free):
    return first, program
  rest = [k for k in candidates if k > first and _predicted_new(fp, first, k) <= SAFETY * free]
  measure = lambda k: (lambda p: (p, footprint(p)))(compile_k(k))
  k, program, last = smallest_fitting(measure, rest, free)
  if k is not None and requested == 'auto':
    logging.info('%s: microbatches=auto chose %d (of %s): %s', what, k, list(candidates), describe(last, free))
    return k, program
  fix = (f'set --config.train.microbatches={k} (or auto)' if k is not None else
         f'no microbatch count up to {max(candidates)} fits; lower config.train.batch_size (or use '
         "config.precision='bfloat16')")
  raise MemoryPlanError(f'{what}: the compiled training step with {first} microbatch(es) {describe(fp, free)} on '
                        f'{jax.local_devices()[0].platform}; {fix}')


def plan_eval_step(compile_k: Callable[[int], Any], candidates: Sequence[int], *, batch_size: int, what: str,
                   free: int | None) -> tuple[int, Any]:
  """Chooses how many chunks the evaluation step attacks its batch in: ``(k, compiled program)``.

  ``compile_k(k)`` compiles the step attacking in k chunks (:class:`arreg_jax.training.eval_step.EvalStep`; the
  metrics do not depend on k); ``candidates`` are the admissible k, ascending from 1. The smallest k that fits is
  taken (logged when > 1). Raises MemoryPlanError, suggesting a smaller ``config.eval.batch_size``, when even the
  largest does not fit.
  """
  program = compile_k(1)
  fp = footprint(program)
  if fp is None or free is None:
    return 1, program
  logging.info('memory plan: evaluation at batch %d: %s', batch_size, describe(fp, free))
  if fits(fp, free):
    return 1, program
  rest = [k for k in candidates if k > 1 and _predicted_new(fp, 1, k) <= SAFETY * free]
  measure = lambda k: (lambda p: (p, footprint(p)))(compile_k(k))
  k, chosen, last = smallest_fitting(measure, rest, free)
  if k is not None:
    logging.info('%s: the evaluation step attacks its batch of %d in %d chunks of %d: %s', what, batch_size, k,
                 batch_size // k, describe(last, free))
    return k, chosen
  k_max = max(candidates)
  room = SAFETY * free - (fp.output - fp.alias)
  # Temporaries taken as shrinking like 1/k with the chunks and growing like the batch: an estimate.
  suggested = max(int(batch_size * k_max * room / max(fp.temp, 1)), 1) if room > 0 else 1
  raise MemoryPlanError(f'{what}: the compiled evaluation step (PGD, batch {batch_size}) {describe(fp, free)}, and '
                        f'no split of its attack into up to {k_max} chunks fits; lower --config.eval.batch_size '
                        f'(about {suggested} would fit)')


def _local_free_bytes(mesh) -> int | None:
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  return free_bytes(local[0], local_devices=len(local))


def plan_training(spec_of: Callable[[int], step_lib.StepSpec], requested, state, hyper, images, labels, mesh,
                  what: str) -> step_lib.StepSpec:
  """The training program's spec with its microbatch count chosen: ``spec_of(k)`` is the spec with k
  microbatches; the program (:func:`arreg_jax.training.step.train_steps`) is compiled ahead of time for the state,
  step hyper-parameters and data at hand and checked against the device memory (:func:`plan_train_step`;
  ``requested`` is ``config.train.microbatches``, an int or 'auto').

  The program chosen is the one the training then calls: ``jax.jit`` keeps what ``lower(...).compile()`` compiled,
  so nothing is compiled twice.
  """
  perm = jax.ShapeDtypeStruct((images.shape[0],), jnp.int32, sharding=sharding.replicated(mesh))
  compile_k = lambda k: step_lib.train_steps.lower(spec_of(k), state, images, labels, perm, hyper).compile()
  b = spec_of(1).batch_size
  candidates = [k for k in configuration.divisors(b) if (b // k) % mesh.size == 0]
  k, _ = plan_train_step(compile_k, requested, candidates, what=what, free=_local_free_bytes(mesh))
  if requested == 'auto' or k > 1:
    logging.info('%s: %d microbatch(es) of %d examples per step of %d', what, k, b // k, b)
  return spec_of(k)


def plan_evaluation(step: eval_step.EvalStep, batch_size: int, variables, images, labels, key, mesh, what: str
                    ) -> eval_step.EvalStep:
  """``step`` (with PGD) attacking its batch in as few chunks as fit the device memory (:func:`plan_eval_step`),
  compiled ahead of time on ``images`` (the test set) at ``batch_size``: the program that evaluation then runs."""
  layout = eval_step.batch_layout(images, batch_size)
  args = (variables, images, labels, np.int32(0), np.int32(1), key)
  compile_k = lambda k: eval_step.eval_batch.lower(dataclasses.replace(step, chunks=k), layout, *args).compile()
  devices = layout.batch_sharding.mesh.size if layout.batch_sharding is not None else 1
  candidates = configuration.divisors(layout.padded_size // devices)
  k, _ = plan_eval_step(compile_k, candidates, batch_size=batch_size, what=what, free=_local_free_bytes(mesh))
  return dataclasses.replace(step, chunks=k)
