"""Small MNIST networks.

* ``LeNet``: the MNIST network of Madry et al. (2018), used by draft 003: conv 5×5×32 → max-pool 2 → conv 5×5×64
  → max-pool 2 → dense 1024 → dense num_classes, ReLU activations.
* ``SmallCNN``: conv 3×3×16 → pool → conv 3×3×32 → pool → dense 128 → dense num_classes; the embedded default's
  model, small enough that a four-strength adversarial sweep trains in minutes on two CPU cores.
* ``CifarCNN``: conv 3×3×32 → pool → conv 3×3×64 → pool → conv 3×3×128 → pool → dense 256 → dense num_classes; the
  "CNN on CIFAR-10" of the average-margin poster (004), whose architecture the poster does not give.
Pooling is :func:`max_pool_2x2` (reshape + max), whose input gradient is fast on every backend. With
``spectral_norm=True`` every conv and dense layer is Miyato-normalized (``layers.py``). The input of the last layer
(the penultimate features Φ(x)) is sown as ``intermediates/features`` (``arreg_jax.models.apply_with_features``).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from arreg_jax.models.layers import Conv, Dense, max_pool_2x2


class ConvPoolNet(nn.Module):
  """[conv k×k → ReLU → 2×2 max-pool] per entry of ``channels``, then dense layers; float32 logits."""
  num_classes: int
  channels: Sequence[int]
  kernel: int
  hidden: int
  dtype: Any = None
  spectral_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype or x.dtype)
    for i, c in enumerate(self.channels):
      x = Conv(c, (self.kernel, self.kernel), use_bias=True, dtype=self.dtype, spectral_norm=self.spectral_norm,
               name=f'conv{i + 1}')(x, train=train)
      x = max_pool_2x2(nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    if self.spectral_norm:
      x = nn.relu(Dense(self.hidden, dtype=self.dtype, spectral_norm=True, name='fc1')(x, train=train))
      self.sow('intermediates', 'features', x)
      x = Dense(self.num_classes, dtype=self.dtype, spectral_norm=True, name='head')(x, train=train)
    else:  # flax.linen.Dense, as before SN existed (same parameters and numerics)
      x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x))
      self.sow('intermediates', 'features', x)
      x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def LeNet(num_classes: int, dtype: Any = None, spectral_norm: bool = False) -> ConvPoolNet:
  return ConvPoolNet(num_classes, channels=(32, 64), kernel=5, hidden=1024, dtype=dtype, spectral_norm=spectral_norm)


def SmallCNN(num_classes: int, dtype: Any = None, spectral_norm: bool = False) -> ConvPoolNet:
  return ConvPoolNet(num_classes, channels=(16, 32), kernel=3, hidden=128, dtype=dtype, spectral_norm=spectral_norm)


def CifarCNN(num_classes: int, dtype: Any = None, spectral_norm: bool = False) -> ConvPoolNet:
  return ConvPoolNet(num_classes, channels=(32, 64, 128), kernel=3, hidden=256, dtype=dtype,
                     spectral_norm=spectral_norm)
