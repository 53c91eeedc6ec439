"""The compiled evaluation step: clean and PGD metrics of a model over device-resident data, data-parallel.

:func:`make_eval_step` builds the jitted step, :func:`evaluate` runs it over a split in fixed-size batches padded and
masked to the device count (SPEC §5: test loss and accuracy; the PGD accuracy over the clean-correct examples).
Training (:mod:`arreg_jax.trainer`), the per-epoch and final metrics and the analysis all evaluate through it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import flax.linen as nn
import numpy as np
import optax

from arreg_jax import attacks, sharding
from arreg_jax.data import augment
from arreg_jax.train import add_metrics, logits_fn_of


def make_eval_step(module: nn.Module, *, augment_kind: str, pgd_cfg: ml_collections.ConfigDict | None,
                   chunks: int = 1):
  """Returns the jitted ``eval_step(variables, images, labels, start, stop, key, *, batch_size, padded_size,
  batch_sharding) -> metric sums`` that :func:`evaluate` calls once per batch.

  The batch is gathered inside the program from the device-resident ``images``/``labels``: ``padded_size`` (≥
  ``batch_size``, static) rows from example ``start`` on (wrapping around the split), of which only the first
  ``batch_size`` at positions < ``stop`` count; with a ``batch_sharding`` (static) the rows are split over its mesh,
  so each device evaluates its share. The PGD key is ``fold_in(key, start // batch_size)``, and the random start of
  a row does not depend on ``padded_size`` (threefry bits are indexed by position), so padding the batch to a
  multiple of the device count changes no result. Sums: clean cross-entropy and accuracy over the unmasked examples and, if
  ``pgd_cfg`` is given, the PGD accuracy of SPEC §5: among examples classified correctly when clean, those still
  correct after L∞ PGD (``pgd_cfg.eps``, ``steps`` steps of ``step_size``, random start) — ``pgd_correct`` /
  ``clean_correct``.

  ``chunks`` = k > 1 attacks the batch in k chunks, one after the other (``lax.map``), to bound the attack's memory
  (:func:`arreg_jax.memory_plan.plan_evaluation` chooses k when a batch does not fit). The random start is drawn for
  the whole batch first and each chunk starts from its rows of it, so every example gets the same start — and the
  same result up to float rounding — as with k = 1: the metrics do not depend on the memory they were computed in.
  Chunk c holds rows c, c + k, c + 2k, … so that each chunk stays split over the devices like the batch.
  """

  def eval_step(variables, images, labels, start, stop, key, *, batch_size: int, padded_size: int,
                batch_sharding=None):
    row = jnp.arange(padded_size, dtype=jnp.int32)
    pos = start + row
    index = pos % images.shape[0]
    x, y, mask = images[index], labels[index], (row < batch_size) & (pos < stop)
    if batch_sharding is not None:
      x, y, mask = (jax.lax.with_sharding_constraint(a, batch_sharding) for a in (x, y, mask))
    key = jax.random.fold_in(key, start // batch_size)
    x = augment.preprocess(key, x, kind=augment_kind, train=False)
    logits_fn = logits_fn_of(module, variables, train=False)
    logits = logits_fn(x)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    correct = (jnp.argmax(logits, -1) == y) & mask
    out = {
        'loss_sum': jnp.sum(jnp.where(mask, ce, 0.0)),
        'correct': jnp.sum(correct).astype(jnp.float32),
        'count': jnp.sum(mask).astype(jnp.float32),
    }
    if pgd_cfg is not None:
      attack = lambda x, y, delta: attacks.pgd(logits_fn, x, y, key, eps=pgd_cfg.eps, step_size=pgd_cfg.step_size,
                                               steps=int(pgd_cfg.steps), norm='linf', init_delta=delta)
      delta = attacks.pgd_random_start(key, x.shape, pgd_cfg.eps)
      if chunks == 1:
        x_adv = attack(x, y, delta)
      else:
        split = lambda a: jnp.swapaxes(a.reshape(padded_size // chunks, chunks, *a.shape[1:]), 0, 1)
        x_adv = jax.lax.map(lambda a: attack(*a), (split(x), split(y), split(delta)))
        x_adv = jnp.swapaxes(x_adv, 0, 1).reshape(x.shape)
      still = (jnp.argmax(logits_fn(x_adv), -1) == y) & correct
      out['pgd_correct'] = jnp.sum(still).astype(jnp.float32)
    return out

  if chunks < 1:
    raise ValueError(f'chunks must be >= 1, got {chunks}')
  return jax.jit(eval_step, static_argnames=('batch_size', 'padded_size', 'batch_sharding'))


def eval_layout(images: jax.Array, batch_size: int) -> dict:
  """The static arguments of :func:`make_eval_step`'s step for device-resident ``images``: the batch padded to a
  multiple of their mesh's device count and split over it (one device: unpadded, unsharded)."""
  data_mesh = images.sharding.mesh if isinstance(images.sharding, jax.sharding.NamedSharding) else None
  batch_spec, padded = None, batch_size
  if data_mesh is not None and data_mesh.size > 1:
    padded = sharding.round_up(batch_size, data_mesh)
    batch_spec = sharding.batch_sharding(data_mesh)
  return dict(batch_size=batch_size, padded_size=padded, batch_sharding=batch_spec)


def evaluate(eval_step, variables, images, labels, *, batch_size: int, key: jax.Array, limit: int | None = None,
             mesh=None) -> dict[str, float]:
  """Runs ``eval_step`` (:func:`make_eval_step`) over the first ``limit`` examples (all if None) in fixed-size,
  padded and masked batches, data-parallel over the mesh the data lives on.

  ``images``/``labels`` are best device arrays replicated over a mesh (as training keeps them): each batch is then
  split over that mesh: the batches are those of one device, each padded (masked) to a multiple of the device
  count, so the results do not depend on the device count beyond float rounding. Host (numpy) arrays are
  first placed, replicated, on ``mesh`` (default: every device); arrays on one device are evaluated there. Sums
  accumulate on the devices; the host reads them once, at the end.

  Returns ``loss`` (mean CE), ``acc`` and, if computed, ``pgd_acc`` (over the clean-correct examples) and the raw
  counts.
  """
  if not isinstance(images, jax.Array) or not isinstance(labels, jax.Array):
    rep = sharding.replicated(mesh if mesh is not None else sharding.make_mesh())
    images, labels = jax.device_put((np.asarray(images), np.asarray(labels, np.int32)), rep)
  static = eval_layout(images, batch_size)
  n = images.shape[0] if limit is None else min(limit, images.shape[0])
  window = sharding.DispatchWindow()
  totals = None
  for start in range(0, n, batch_size):
    out = eval_step(variables, images, labels, np.int32(start), np.int32(n), key, **static)
    totals = out if totals is None else add_metrics(totals, out)
    window.push(totals)
  totals = {k: float(v) for k, v in jax.device_get(totals).items()}
  result = {'loss': totals['loss_sum'] / totals['count'], 'acc': totals['correct'] / totals['count'],
            'count': int(totals['count'])}
  if 'pgd_correct' in totals:
    result['pgd_acc'] = totals['pgd_correct'] / max(totals['correct'], 1.0)
    result['clean_correct'] = int(totals['correct'])
  return result
