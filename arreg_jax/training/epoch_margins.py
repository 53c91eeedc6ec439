"""Per-epoch margin tracking of a training run (poster 004; ``config.margins.track``): the library's margins on the
runner's data.

The training loop calls :func:`track` after every epoch on the clean train and test sets: the uint8 images are turned into
model inputs inside the compiled program (``data.augment.preprocess``, the test transform), the model returns its
logits and penultimate features (``models.apply_with_features``), and :mod:`arreg_jax.analysis.margin_tracking`
computes the logit and feature-space margins with the last layer as applied (``regularizers.effective_head``).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import numpy as np

from arreg_jax import models, regularizers, sharding
from arreg_jax.analysis import margin_tracking
from arreg_jax.data import augment


@functools.lru_cache(maxsize=None)
def make_kernel(module: nn.Module, augment_kind: str):
  """Jitted ``(variables, images_uint8, labels, mask) -> margin_tracking.per_example(...)`` (test preprocessing)."""

  def kernel(variables, images, labels, mask):
    del mask
    x = augment.preprocess(None, images, kind=augment_kind, train=False)
    logits, feats, _ = models.apply_with_features(module, variables, x, train=False)
    w, b = regularizers.effective_head(variables)
    return margin_tracking.per_example(logits, feats, w, b, labels)

  return jax.jit(kernel)


def track(module: nn.Module, variables, images: np.ndarray, labels: np.ndarray, *, split: str, augment_kind: str,
          batch_size: int, mesh, limit: int | None = None) -> tuple[dict[str, float], dict[str, np.ndarray]]:
  """Margins of the first ``limit`` examples of a split: ``(summary, {'<split>_margin': …, '<split>_fmargin': …})``."""
  out = sharding.map_batches(make_kernel(module, augment_kind), variables, images, labels, batch_size=batch_size,
                             mesh=mesh, limit=limit)
  arrays = {f'{split}_margin': out['margin'].astype(np.float32),
            f'{split}_fmargin': out['feature_margin'].astype(np.float32),
            f'{split}_correct': out['correct']}
  return margin_tracking.summarize(out, split), arrays
