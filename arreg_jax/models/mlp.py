"""Fully connected models of the average-margin poster (Wu & Yu, 004): binary logistic regression and an MLP.

* ``LogReg``: a single dense layer on the flattened image, ``f(x) = Wx + b``. With two classes (MNIST 0 vs 1,
  ``data.keep_classes=(0, 1)``) the softmax cross-entropy of ``f`` is exactly the logistic loss of the binary
  classifier ``(w_1 − w_0)ᵀx + (b_1 − b_0)``, the poster's motivating example; ``Φ(x) = x``.
* ``MLP``: dense ReLU layers of ``hidden`` widths, then the last layer. The poster's MLP is not specified; the
  default (two hidden layers of 256) is our choice.

The input of the last layer (Φ(x)) is sown as ``intermediates/features``; the last layer is named ``head``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from arreg_jax.models.layers import Dense


class MLP(nn.Module):
  """Flatten → [dense → ReLU] per entry of ``hidden`` → dense ``num_classes``; float32 logits."""
  num_classes: int
  hidden: Sequence[int] = (256, 256)
  dtype: Any = None
  spectral_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype or x.dtype)
    x = x.reshape(x.shape[0], -1)
    for i, h in enumerate(self.hidden):
      x = nn.relu(Dense(h, dtype=self.dtype, spectral_norm=self.spectral_norm, name=f'fc{i + 1}')(x, train=train))
    self.sow('intermediates', 'features', x)
    x = Dense(self.num_classes, dtype=self.dtype, spectral_norm=self.spectral_norm, name='head')(x, train=train)
    return x.astype(jnp.float32)


def LogReg(num_classes: int, dtype: Any = None, spectral_norm: bool = False) -> MLP:
  """Multinomial (binary for two classes) logistic regression: an MLP without hidden layers."""
  return MLP(num_classes, hidden=(), dtype=dtype, spectral_norm=spectral_norm)
