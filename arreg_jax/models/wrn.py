"""WRN-50-2 for 56×56 Tiny-ImageNet crops (SPEC §2, appendix D.2).

Bottleneck ResNet-50 layout (4 groups of [3, 4, 6, 3] units, stride on the 3×3 conv as in torchvision) widened by
k = 2: the 3×3 convolutions have [64k, 128k, 256k, 512k] channels and each unit outputs 4 × [64, 128, 256, 512].
The 7×7 stride-2 stem is replaced by a 3×3 stride-1 convolution (64 channels) and the max-pool is removed, so the
groups see 56, 28, 14 and 7 pixels. BatchNorm after every convolution; Xavier-uniform convolution init; no dropout.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from arreg_jax.models.layers import Conv

_xavier = nn.initializers.xavier_uniform()


class Bottleneck(nn.Module):
  planes: int
  width: int
  strides: int
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name,
                                   dtype=self.dtype)
    out_features = self.planes * 4
    y = nn.relu(bn('bn1')(Conv(self.width, (1, 1), kernel_init=_xavier, dtype=self.dtype, name='conv1')(x)))
    y = Conv(self.width, (3, 3), (self.strides, self.strides), kernel_init=_xavier, dtype=self.dtype,
             name='conv2')(y)
    y = nn.relu(bn('bn2')(y))
    y = bn('bn3')(Conv(out_features, (1, 1), kernel_init=_xavier, dtype=self.dtype, name='conv3')(y))
    shortcut = x
    if self.strides != 1 or x.shape[-1] != out_features:
      shortcut = Conv(out_features, (1, 1), (self.strides, self.strides), kernel_init=_xavier, dtype=self.dtype,
                      name='shortcut_conv')(x)
      shortcut = bn('shortcut_bn')(shortcut)
    return nn.relu(y + shortcut)


class WideResNet50(nn.Module):
  num_classes: int
  widen_factor: int = 2
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  base_width: int = 64
  dtype: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = x.astype(self.dtype or x.dtype)
    x = Conv(self.base_width, (3, 3), kernel_init=_xavier, dtype=self.dtype, name='conv_init')(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name='bn_init',
                             dtype=self.dtype)(x))
    for g, num_units in enumerate(self.stage_sizes):
      planes = self.base_width * 2 ** g
      for u in range(num_units):
        strides = 2 if (g > 0 and u == 0) else 1
        x = Bottleneck(planes, planes * self.widen_factor, strides, self.dtype,
                       name=f'group{g + 1}_unit{u + 1}')(x, train)
    x = jnp.mean(x, axis=(1, 2))
    self.sow('intermediates', 'features', x)  # Φ(x), for the margin regularizer (poster 004)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)
