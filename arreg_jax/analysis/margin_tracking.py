"""Minimum and average margin over training (Wu & Yu, poster 004): the per-example margins and their summary.

The poster's observation: standard training raises the **minimum** margin (as gradient descent on a separable
dataset converges to the max-margin solution, Soudry et al. 2018) while the **average** margin falls; its
regularizer (``arreg_jax.regularizers``) keeps the average up. Two margins per example, on the clean images with the
model in inference mode:

* the **logit margin** ``f_y(x) − max_{i≠y} f_i(x)`` (Definition 3 of the main paper; :mod:`arreg_jax.attacks.losses`);
* the **feature-space margin** ``min_{k≠y} (f_y − f_k)/‖w_y − w_k‖`` — the distance of Φ(x) to the last layer's
  decision boundary, the poster's approximation of the input-space margin for deep models, and exactly the
  input-space margin ``sign · d(x, bd F_y)`` for logistic regression (:func:`feature_space_margins`).

Both are signed (negative when misclassified); the minimum is over all examples of the split, so it is negative
while any training example is misclassified. :func:`per_example` is the pure batch kernel, :func:`summarize` the
split's row (``<split>_margin_min``, ``_margin_mean``, ``_fmargin_min``, ``_fmargin_mean``, ``_margin_acc``). Running
them every epoch over the runner's datasets is ``arreg_jax.training.epoch_margins``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax.attacks import losses


def per_example(logits: jax.Array, features: jax.Array, last_w: jax.Array, last_b: jax.Array | None,
                labels: jax.Array) -> dict[str, jax.Array]:
  """``{'margin', 'feature_margin', 'correct'}`` of a batch.

  Args:
    logits: ``(B, K)``.
    features: the penultimate features ``Φ(x)``, ``(B, d)``.
    last_w: the last layer's kernel ``(d, K)`` as applied (Flax layout: ``w_k`` is column k).
    last_b: its bias ``(K,)`` or None.
    labels: int ``(B,)``.
  """
  return {
      'margin': losses.margin(logits, labels),
      'feature_margin': feature_space_margins(features, last_w, last_b, labels),
      'correct': jnp.argmax(logits, axis=-1) == labels,
  }


def summarize(out: dict[str, np.ndarray], split: str) -> dict[str, float]:
  """The split's row: min and mean of both margins and the accuracy."""
  return {
      f'{split}_margin_min': float(np.min(out['margin'])),
      f'{split}_margin_mean': float(np.mean(out['margin'])),
      f'{split}_fmargin_min': float(np.min(out['feature_margin'])),
      f'{split}_fmargin_mean': float(np.mean(out['feature_margin'])),
      f'{split}_margin_acc': float(np.mean(out['correct'])),
  }


def feature_space_margins(features: jax.Array, last_w: jax.Array, last_b: jax.Array | None,
                          labels: jax.Array) -> jax.Array:
  """The signed distance of ``Φ(x)`` to the decision boundary of the last layer; float32 ``(B,)``.

  ``min_{k≠y} (f_y − f_k) / ‖w_y − w_k‖`` with ``f = W Φ + b``: the margin the poster tracks for deep models
  (``(w_y − w_k)ᵀΦ(x)/‖w_y − w_k‖``, its approximation of the input-space margin) with the last layer's bias included,
  so that for a linear model (``Φ(x) = x``) it is exactly the poster's margin ``sign · d(x, bd F_y)``. Positive
  iff ``x`` is classified correctly. A class pair with ``w_y = w_k`` counts as distance 0 (``±0`` logit gap) unless
  its logit gap is nonzero, where it is ``±inf``.

  Args:
    features: ``Φ(x)``, ``(B, d)``.
    last_w: the last layer's kernel ``(d, K)`` as applied (Flax layout: ``w_k`` is column k).
    last_b: its bias ``(K,)`` or None.
    labels: int ``(B,)`` in ``[0, K)``.
  """
  chex.assert_rank([features, last_w, labels], [2, 2, 1])
  w = last_w.astype(jnp.float32)
  logits = features.astype(jnp.float32) @ w
  if last_b is not None:
    logits = logits + last_b.astype(jnp.float32)
  k = w.shape[1]
  is_y = jax.nn.one_hot(labels, k, dtype=jnp.bool_)
  f_y = jnp.sum(jnp.where(is_y, logits, 0.0), axis=-1, keepdims=True)
  w_y = w.T[labels]                                                   # (B, d)
  # ‖w_y − w_k‖² = ‖w_y‖² − 2 w_yᵀw_k + ‖w_k‖², without materializing (B, K, d).
  sq = jnp.sum(w * w, axis=0)                                        # (K,)
  dist2 = sq[labels][:, None] - 2.0 * (w_y @ w) + sq[None, :]
  norm = jnp.sqrt(jnp.maximum(dist2, 0.0))
  gap = f_y - logits
  ratio = jnp.where(norm > 0, gap / jnp.where(norm > 0, norm, 1.0), jnp.where(gap == 0, 0.0, jnp.sign(gap) * jnp.inf))
  return jnp.min(jnp.where(is_y, jnp.inf, ratio), axis=-1)
