"""Minimum and average margin over training (Wu & Yu, poster 004): the per-epoch margin statistics.

The poster's observation: standard training raises the **minimum** margin (as gradient descent on a separable
dataset converges to the max-margin solution, Soudry et al. 2018) while the **average** margin falls; its
regularizer (:mod:`arreg_jax.regularizers`) keeps the average up. Two margins per example, on the clean
(un-augmented) images with the model in inference mode:

* the **logit margin** ``f_y(x) − max_{i≠y} f_i(x)`` (Definition 3 of the main paper; :mod:`margins`);
* the **feature-space margin** ``min_{k≠y} (f_y − f_k)/‖w_y − w_k‖`` — the distance of Φ(x) to the last layer's
  decision boundary, the poster's approximation of the input-space margin for deep models, and exactly the
  input-space margin ``sign · d(x, bd F_y)`` for logistic regression (:func:`regularizers.feature_space_margins`).

Both are signed (negative when misclassified); the minimum is over all examples of the split, so it is negative
while any training example is misclassified. :func:`track` summarizes a split (``<split>_margin_min``,
``_margin_mean``, ``_fmargin_min``, ``_fmargin_mean``, ``_acc``) and returns the per-example values for histograms.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import models, regularizers
from arreg_jax import sharding
from arreg_jax.analysis import margins as margins_lib
from arreg_jax.data import augment


def per_example(module: nn.Module, variables, x: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
  """``{'margin', 'feature_margin', 'correct'}`` for images ``x`` in [0, 1] (inference mode)."""
  logits, feats, _ = models.apply_with_features(module, variables, x, train=False)
  w, b = regularizers.effective_head(variables)
  return {
      'margin': margins_lib.margins(logits, labels),
      'feature_margin': regularizers.feature_space_margins(feats, w, b, labels),
      'correct': jnp.argmax(logits, axis=-1) == labels,
  }


@functools.lru_cache(maxsize=None)
def make_kernel(module: nn.Module, augment_kind: str):
  """Jitted ``(variables, images_uint8, labels, mask) -> per_example(...)`` (test-time preprocessing)."""

  def kernel(variables, images, labels, mask):
    del mask
    x = augment.preprocess(None, images, kind=augment_kind, train=False)
    return per_example(module, variables, x, labels)

  return jax.jit(kernel)


def summarize(out: dict[str, np.ndarray], split: str) -> dict[str, float]:
  return {
      f'{split}_margin_min': float(np.min(out['margin'])),
      f'{split}_margin_mean': float(np.mean(out['margin'])),
      f'{split}_fmargin_min': float(np.min(out['feature_margin'])),
      f'{split}_fmargin_mean': float(np.mean(out['feature_margin'])),
      f'{split}_margin_acc': float(np.mean(out['correct'])),
  }


def track(module: nn.Module, variables, images: np.ndarray, labels: np.ndarray, *, split: str, augment_kind: str,
          batch_size: int, mesh, limit: int | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Margins of the first ``limit`` examples of a split: ``(summary, {'<split>_margin': …, '<split>_fmargin': …})``."""
  out = sharding.map_batches(make_kernel(module, augment_kind), variables, images, labels, batch_size=batch_size,
                             mesh=mesh, limit=limit)
  arrays = {f'{split}_margin': out['margin'].astype(np.float32),
            f'{split}_fmargin': out['feature_margin'].astype(np.float32),
            f'{split}_correct': out['correct']}
  return summarize(out, split), arrays
