"""Per-example confidence measures on logits: the margin of Definition 3, the true-class probability, the loss.

Wen, Li & Jia (ICML 2020) study how adversarial robustness (AR) changes three per-example views of the same
confidence (§4.2.1, Fig. 1b, 4, 5a,b):

* the **margin** (Definition 3, the margin operator on logits) ``M(f(x), y) = f_y(x) − max_{i≠y} f_i(x)``:
  positive iff ``x`` is classified correctly, zero on the decision boundary between ``y`` and the runner-up class
  (:func:`arreg_jax.attacks.losses.margin`, the package's one margin);
* the **estimated probability** ``p(x)_y = softmax(f(x))_y`` of the true class (Fig. 5a);
* the **cross-entropy loss** ``−log p(x)_y`` (Fig. 5b), the surrogate loss actually trained
  (:func:`arreg_jax.attacks.losses.cross_entropy`).

:func:`per_example` is pure, shape-polymorphic over the batch and jit-able (logits promoted to float32);
:func:`confidence` runs it over a dataset for a model ``apply_fn(params, x)``, batched and compiled once per model.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import sharding
from arreg_jax.analysis import inputs
from arreg_jax.attacks import losses

Preprocess = Callable[[jax.Array], jax.Array]


def true_class_probability(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``softmax(f(x))_y``, the estimated probability of §4.2.1 (Fig. 5a); float32, shape ``(N,)``."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.exp(jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0])


def per_example(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """All per-example measures at once: ``margin``, ``prob`` (true class), ``loss`` (CE), ``correct``, ``pred``.

  Args:
    logits: ``(N, K)``, K ≥ 2.
    labels: int ``(N,)`` in ``[0, K)``.
  """
  return {
      'margin': losses.margin(logits, labels),
      'prob': true_class_probability(logits, labels),
      'loss': losses.cross_entropy(logits, labels),
      'correct': jnp.argmax(logits, axis=-1) == labels,
      'pred': jnp.argmax(logits, axis=-1).astype(jnp.int32),
  }


@functools.partial(jax.jit, static_argnums=(0, 1))
def _batch(apply_fn, preprocess, params, images, labels, mask):
  del mask  # per-example outputs; padding rows are dropped by sharding.map_batches
  x = images if preprocess is None else preprocess(images)
  return per_example(apply_fn(params, x), labels)


def confidence(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, images: Any, labels: Any, *,
               batch_size: int = 256, mesh: jax.sharding.Mesh | None = None, limit: int | None = None,
               preprocess: Preprocess | None = None) -> dict[str, np.ndarray]:
  """Margin, true-class probability, loss, correctness and prediction of every example (Fig. 1b, 4, 5a,b).

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (N, K)`` (``arreg_jax.adapters`` makes one from a linen, NNX or
      Equinox model), run in one compiled program per ``(apply_fn, preprocess)``.
    params: the pytree ``apply_fn`` takes.
    images: ``(N, ...)`` float images in [0, 1] with 4 dimensions, in the model's own layout (NHWC or NCHW).
    labels: int ``(N,)`` in ``[0, K)``.
    batch_size: examples per compiled call (rounded to the mesh's device count; the last batch is padded).
    mesh: the devices to shard batches over (default: every device, ``sharding.make_mesh()``).
    limit: analyze only the first ``limit`` examples.
    preprocess: a jittable function applied to each batch of ``images`` inside the program before ``apply_fn``
      (e.g. uint8 → float); ``images`` are then checked after it for shape and dtype only.

  Returns:
    ``{'margin', 'prob', 'loss'}`` float32 ``(n,)``, ``'correct'`` bool ``(n,)``, ``'pred'`` int32 ``(n,)``, numpy,
    with ``n = min(limit, N)``.
  """
  _, labels = inputs.check_model_inputs(apply_fn, params, images, labels, preprocess=preprocess, limit=limit)
  return sharding.map_batches(functools.partial(_batch, apply_fn, preprocess), params, images, labels,
                              batch_size=batch_size, mesh=mesh or sharding.make_mesh(), limit=limit)
