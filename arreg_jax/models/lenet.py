"""Small MNIST networks.

* ``LeNet``: the MNIST network of Madry et al. (2018), used by draft 003: conv 5×5×32 → max-pool 2 → conv 5×5×64
  → max-pool 2 → dense 1024 → dense num_classes, ReLU activations.
* ``SmallCNN``: conv 3×3×16 → pool → conv 3×3×32 → pool → dense 128 → dense num_classes; the embedded default's
  model, small enough that a four-strength adversarial sweep trains in minutes on two CPU cores.
Pooling is :func:`max_pool_2x2` (reshape + max), whose input gradient is fast on every backend.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from arreg_jax.models.layers import Conv, max_pool_2x2


class ConvPoolNet(nn.Module):
  """[conv k×k → ReLU → 2×2 max-pool] per entry of ``channels``, then dense layers; float32 logits."""
  num_classes: int
  channels: Sequence[int]
  kernel: int
  hidden: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train  # no dropout / BN
    x = x.astype(self.dtype or x.dtype)
    for i, c in enumerate(self.channels):
      x = Conv(c, (self.kernel, self.kernel), use_bias=True, dtype=self.dtype, name=f'conv{i + 1}')(x)
      x = max_pool_2x2(nn.relu(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x))
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def LeNet(num_classes: int, dtype: Any = None) -> ConvPoolNet:
  return ConvPoolNet(num_classes, channels=(32, 64), kernel=5, hidden=1024, dtype=dtype)


def SmallCNN(num_classes: int, dtype: Any = None) -> ConvPoolNet:
  return ConvPoolNet(num_classes, channels=(16, 32), kernel=3, hidden=128, dtype=dtype)
