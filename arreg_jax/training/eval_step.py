"""The compiled evaluation step: clean and PGD metrics of a model over device-resident data, data-parallel (SPEC §5).

:class:`EvalStep` is the step as a hashable value (the model, the augmentation, the evaluation PGD, the attack
chunks) and :class:`BatchLayout` the batch it runs on; both are static arguments of the jitted :func:`eval_batch`,
so ``jax.jit``'s cache keeps one program per distinct pair. :func:`evaluate` sums it over a split in fixed-size
batches padded and masked to the device count (test loss and accuracy; the PGD accuracy over the clean-correct
examples). Training (:mod:`arreg_jax.training.loop`), its per-epoch and final metrics and the analysis all evaluate
through it.
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from arreg_jax import attacks, sharding
from arreg_jax.data import augment
from arreg_jax.training.step import add_metrics, logits_fn_of


@dataclasses.dataclass(frozen=True)
class PGDSpec:
  """The evaluation attack of SPEC §5: L∞ PGD of ``steps`` steps of ``step_size`` in the ball of radius ``eps``,
  from a uniform random start."""
  eps: float
  step_size: float
  steps: int


def pgd_spec(config: ml_collections.ConfigDict) -> PGDSpec:
  """The evaluation PGD of a run config (``config.eval.pgd_eps``, ``pgd_step_size``, ``pgd_steps``)."""
  e = config.eval
  return PGDSpec(eps=e.pgd_eps, step_size=e.pgd_step_size, steps=int(e.pgd_steps))


@dataclasses.dataclass(frozen=True)
class EvalStep:
  """The evaluation step of one model, as a hashable value: what its compiled program depends on.

  Attributes:
    module: the Flax module (evaluated in inference mode).
    augment: the dataset's augmentation kind (test-time preprocessing).
    pgd: the evaluation attack; None: clean metrics only.
    chunks: k > 1 attacks each batch in k chunks, one after the other, to bound the attack's memory
      (:func:`arreg_jax.training.memory_plan.plan_evaluation` chooses k); the metrics do not depend on k.
  """
  module: nn.Module
  augment: str
  pgd: PGDSpec | None = None
  chunks: int = 1


def make_eval_step(module: nn.Module, *, augment_kind: str, pgd_cfg=None, chunks: int = 1) -> EvalStep:
  """The :class:`EvalStep` of ``module``; ``pgd_cfg`` is a :class:`PGDSpec` (:func:`pgd_spec`), anything with
  ``eps``, ``step_size`` and ``steps``, or None (clean metrics only). Raises ValueError for ``chunks`` < 1."""
  if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
    raise ValueError(f'chunks must be an int >= 1, got {chunks!r}')
  if pgd_cfg is not None and not isinstance(pgd_cfg, PGDSpec):
    pgd_cfg = PGDSpec(eps=pgd_cfg.eps, step_size=pgd_cfg.step_size, steps=int(pgd_cfg.steps))
  return EvalStep(module=module, augment=augment_kind, pgd=pgd_cfg, chunks=chunks)


@dataclasses.dataclass(frozen=True)
class BatchLayout:
  """How :func:`eval_batch` lays out one batch: ``batch_size`` examples per batch, padded to ``padded_size`` rows
  (a multiple of the device count) and split over ``batch_sharding``'s mesh (None: one device, no padding)."""
  batch_size: int
  padded_size: int
  batch_sharding: jax.sharding.Sharding | None = None


def batch_layout(images: jax.Array, batch_size: int) -> BatchLayout:
  """The :class:`BatchLayout` for device-resident ``images``: the batch padded to a multiple of their mesh's device
  count and split over it (one device: unpadded, unsharded)."""
  data_mesh = images.sharding.mesh if isinstance(images.sharding, jax.sharding.NamedSharding) else None
  if data_mesh is None or data_mesh.size == 1:
    return BatchLayout(batch_size, batch_size)
  return BatchLayout(batch_size, sharding.round_up(batch_size, data_mesh), sharding.batch_sharding(data_mesh))


def _attack(step: EvalStep, logits_fn, x, y, key, padded_size: int):
  """PGD on the batch, in ``step.chunks`` chunks: the random start is drawn for the whole batch first and each
  chunk starts from its rows of it, so every example gets the same start — and the same result up to float
  rounding — whatever the chunks. Chunk c holds rows c, c + k, c + 2k, … so that each stays split over the devices
  like the batch."""
  pgd, k = step.pgd, step.chunks
  attack = lambda x, y, delta: attacks.pgd(logits_fn, x, y, key, eps=pgd.eps, step_size=pgd.step_size,
                                           steps=pgd.steps, norm='linf', init_delta=delta)
  delta = attacks.pgd_random_start(key, x.shape, pgd.eps)
  if k == 1:
    return attack(x, y, delta)
  split = lambda a: jnp.swapaxes(a.reshape(padded_size // k, k, *a.shape[1:]), 0, 1)
  x_adv = jax.lax.map(lambda a: attack(*a), (split(x), split(y), split(delta)))
  return jnp.swapaxes(x_adv, 0, 1).reshape(x.shape)


@functools.partial(jax.jit, static_argnums=(0, 1))
def eval_batch(step: EvalStep, layout: BatchLayout, variables, images, labels, start, stop, key
               ) -> dict[str, jax.Array]:
  """The metric sums of one batch: ``layout.padded_size`` rows gathered inside the program from the
  device-resident ``images``/``labels`` from example ``start`` on (wrapping around the split,
  :func:`arreg_jax.sharding.padded_rows`), of which only the first ``layout.batch_size`` at positions < ``stop``
  count.

  The PGD key is ``fold_in(key, start // batch_size)``, and the random start of a row does not depend on
  ``padded_size`` (threefry bits are indexed by position), so padding the batch to a multiple of the device count
  changes no result. Sums: clean cross-entropy (``loss_sum``), ``correct`` and ``count`` over the unmasked examples
  and, with ``step.pgd``, ``pgd_correct``: among examples classified correctly when clean, those still correct after
  the attack (the PGD accuracy of SPEC §5 is ``pgd_correct / correct``).
  """
  index, mask = sharding.padded_rows(start, layout.padded_size, images.shape[0],
                                     jnp.minimum(stop, start + layout.batch_size), xp=jnp)
  x, y = images[index], labels[index]
  if layout.batch_sharding is not None:
    x, y, mask = (jax.lax.with_sharding_constraint(a, layout.batch_sharding) for a in (x, y, mask))
  key = jax.random.fold_in(key, start // layout.batch_size)
  x = augment.preprocess(key, x, kind=step.augment, train=False)
  logits_fn = logits_fn_of(step.module, variables, train=False)
  logits = logits_fn(x)
  ce = attacks.cross_entropy(logits, y)
  correct = (jnp.argmax(logits, -1) == y) & mask
  out = {
      'loss_sum': jnp.sum(jnp.where(mask, ce, 0.0)),
      'correct': jnp.sum(correct).astype(jnp.float32),
      'count': jnp.sum(mask).astype(jnp.float32),
  }
  if step.pgd is not None:
    x_adv = _attack(step, logits_fn, x, y, key, layout.padded_size)
    still = (jnp.argmax(logits_fn(x_adv), -1) == y) & correct
    out['pgd_correct'] = jnp.sum(still).astype(jnp.float32)
  return out


def evaluate(step: EvalStep, variables, images, labels, *, batch_size: int, key: jax.Array, limit: int | None = None,
             mesh=None) -> dict[str, float]:
  """Runs ``step`` (:func:`make_eval_step`) over the first ``limit`` examples (all if None) in fixed-size,
  padded and masked batches, data-parallel over the mesh the data lives on.

  ``images``/``labels`` are best device arrays replicated over a mesh (as training keeps them): each batch is then
  split over that mesh: the batches are those of one device, each padded (masked) to a multiple of the device
  count, so the results do not depend on the device count beyond float rounding. Host (numpy) arrays are
  first placed, replicated, on ``mesh`` (default: every device); arrays on one device are evaluated there. Sums
  accumulate on the devices; the host reads them once, at the end.

  Returns ``loss`` (mean CE), ``acc`` and, if computed, ``pgd_acc`` (over the clean-correct examples) and the raw
  counts.
  """
  if not isinstance(step, EvalStep):
    raise TypeError(f'step must be an EvalStep (make_eval_step), got {type(step).__name__}')
  if not isinstance(images, jax.Array) or not isinstance(labels, jax.Array):
    rep = sharding.replicated(mesh if mesh is not None else sharding.make_mesh())
    images, labels = jax.device_put((np.asarray(images), np.asarray(labels, np.int32)), rep)
  layout = batch_layout(images, batch_size)
  n = images.shape[0] if limit is None else min(limit, images.shape[0])
  window = sharding.DispatchWindow()
  totals = None
  for start in range(0, n, batch_size):
    out = eval_batch(step, layout, variables, images, labels, np.int32(start), np.int32(n), key)
    totals = out if totals is None else add_metrics(totals, out)
    window.push(totals)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  result = {'loss': totals['loss_sum'] / totals['count'], 'acc': totals['correct'] / totals['count'],
            'count': int(totals['count'])}
  if 'pgd_correct' in totals:
    result['pgd_acc'] = totals['pgd_correct'] / max(totals['correct'], 1.0)
    result['clean_correct'] = int(totals['correct'])
  return result
