"""Per-example confidence measures on logits: the margin of Definition 3, the true-class probability, the loss.

Wen, Li & Jia (ICML 2020) study how adversarial robustness (AR) changes three per-example views of the same
confidence (§4.2.1, Fig. 1b, 4, 5a,b):

* the **margin** (Definition 3, the margin operator on logits) ``M(f(x), y) = f_y(x) − max_{i≠y} f_i(x)``:
  positive iff ``x`` is classified correctly, zero on the decision boundary between ``y`` and the runner-up class;
* the **estimated probability** ``p(x)_y = softmax(f(x))_y`` of the true class (Fig. 5a);
* the **cross-entropy loss** ``−log p(x)_y`` (Fig. 5b), the surrogate loss actually trained.

All functions are pure, shape-polymorphic over the batch and jit-able; logits are promoted to float32. A tie between
``f_y`` and another logit gives a margin of exactly 0 (the example is on the boundary); with two classes the margin
is ``f_y − f_{1−y}``.
"""

from __future__ import annotations

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from arreg_jax.data import augment


def _check(logits: jax.Array, labels: jax.Array) -> None:
  chex.assert_rank(logits, 2)
  chex.assert_rank(labels, 1)
  chex.assert_equal_shape_prefix([logits, labels], 1)
  chex.assert_type(labels, int)
  if logits.shape[-1] < 2:
    raise ValueError(f'the margin needs at least 2 classes, got logits of shape {logits.shape}')


def margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``M(f(x), y) = f_y(x) − max_{i≠y} f_i(x)`` (Definition 3) for each row; float32, shape ``(N,)``."""
  _check(logits, labels)
  logits = logits.astype(jnp.float32)
  is_y = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.bool_)
  f_y = jnp.sum(jnp.where(is_y, logits, 0.0), axis=-1)
  f_other = jnp.max(jnp.where(is_y, -jnp.inf, logits), axis=-1)
  return f_y - f_other


def true_class_probability(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``softmax(f(x))_y``, the estimated probability of §4.2.1 (Fig. 5a); float32, shape ``(N,)``."""
  _check(logits, labels)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.exp(jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0])


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Per-example cross-entropy ``−log softmax(f(x))_y`` (Fig. 5b); float32, shape ``(N,)``."""
  _check(logits, labels)
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(log_p, labels[:, None], axis=-1)[:, 0]


def per_example(logits: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """All per-example measures at once: ``margin``, ``prob`` (true class), ``loss`` (CE), ``correct``, ``pred``."""
  return {
      'margin': margins(logits, labels),
      'prob': true_class_probability(logits, labels),
      'loss': cross_entropy(logits, labels),
      'correct': jnp.argmax(logits, axis=-1) == labels,
      'pred': jnp.argmax(logits, axis=-1).astype(jnp.int32),
  }


@functools.lru_cache(maxsize=None)
def make_kernel(module: nn.Module, augment_kind: str):
  """The jitted batch kernel ``(variables, images_uint8, labels, mask) -> per_example(...)`` for ``module``.

  Images are preprocessed with the deterministic test transform (``augment.preprocess(..., train=False)``) and the
  model runs in inference mode. Cached per (module, augmentation): the models of one sweep share one program.
  """

  def kernel(variables, images, labels, mask):
    del mask  # per-example outputs; padding rows are dropped by the caller
    x = augment.preprocess(None, images, kind=augment_kind, train=False)
    return per_example(module.apply(variables, x, train=False), labels)

  return jax.jit(kernel)
