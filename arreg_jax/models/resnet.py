"""CIFAR ResNets (He et al. 2016, §4.2): 3 stages × n basic blocks, 16/32/64 channels, depth = 6n + 2.

The paper's models (SPEC §2, appendix D.3) have **no BatchNorm** and are trained from **Fixup** initialization
(Zhang, Dauphin, Ma 2019) **without Fixup's scalar multiplier and bias layers**, which would change the layers'
spectral norms. Fixup, as used here:
  * the last convolution of every residual branch and the classification layer start at zero, so an untrained
    network is the identity map through every block;
  * the other convolution of every branch gets He-normal init (fan-out, as in the Fixup reference code) scaled by
    L^(-1/(2m-2)) = L^(-1/2) for L = 3n residual branches of m = 2 layers each;
  * no convolution has a bias.
Shortcuts that change shape are He's option A (stride-2 subsampling, zero channels appended), as in the Fixup
CIFAR code, so every weight layer of the network is a convolution on the residual branches or the stem.
``use_bn=True`` gives the classic BatchNorm variant (conv → BN → ReLU, He-normal init), for comparison.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from arreg_jax.models.layers import Conv

_he_fan_out = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def _scaled(init, scale: float):
  def f(key, shape, dtype=jnp.float32):
    return init(key, shape, dtype) * scale
  return f


class BasicBlock(nn.Module):
  """Two 3×3 convolutions on the residual branch; option-A shortcut when the shape changes."""
  features: int
  strides: int
  num_branches: int  # L in Fixup
  use_bn: bool
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    norm = (lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name,
                                      dtype=self.dtype)) if self.use_bn else None
    if self.use_bn:
      init1, init2 = _he_fan_out, _he_fan_out
    else:
      init1, init2 = _scaled(_he_fan_out, self.num_branches ** -0.5), nn.initializers.zeros_init()
    y = Conv(self.features, (3, 3), (self.strides, self.strides), kernel_init=init1, dtype=self.dtype,
             name='conv1')(x)
    if self.use_bn:
      y = norm('bn1')(y)
    y = nn.relu(y)
    y = Conv(self.features, (3, 3), (1, 1), kernel_init=init2, dtype=self.dtype, name='conv2')(y)
    if self.use_bn:
      y = norm('bn2')(y)
    shortcut = x
    if self.strides != 1 or x.shape[-1] != self.features:
      shortcut = x[:, ::self.strides, ::self.strides, :]
      extra = self.features - x.shape[-1]
      shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return nn.relu(y + shortcut.astype(y.dtype))


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32×32 inputs in [0, 1]; returns float32 logits."""
  depth: int
  num_classes: int
  use_bn: bool = False
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    if (self.depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {self.depth}')
    n = (self.depth - 2) // 6
    x = x.astype(self.dtype or x.dtype)
    x = Conv(16, (3, 3), kernel_init=_he_fan_out, dtype=self.dtype, name='conv_init')(x)
    if self.use_bn:
      x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name='bn_init',
                       dtype=self.dtype)(x)
    x = nn.relu(x)
    for stage, features in enumerate((16, 32, 64)):
      for block in range(n):
        strides = 2 if (stage > 0 and block == 0) else 1
        x = BasicBlock(features, strides, 3 * n, self.use_bn, self.dtype,
                       name=f'stage{stage + 1}_block{block + 1}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'features', x)  # Φ(x), for the margin regularizer (poster 004)
    head_init = _he_fan_out if self.use_bn else nn.initializers.zeros_init()
    if self.use_bn:
      head_init = nn.initializers.lecun_normal()
    x = nn.Dense(self.num_classes, kernel_init=head_init, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)
