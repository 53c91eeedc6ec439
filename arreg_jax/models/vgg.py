"""VGG-16 / VGG-19 without BatchNorm for 32×32 inputs, as in draft 003 (appendix A.2).

Simonyan & Zisserman (2015) configurations D (16 weight layers) and E (19): 3×3 convolutions ('SAME', stride 1,
with bias) in five blocks of 64, 128, 256, 512, 512 channels, each followed by a 2×2 max-pool (32 → 1 pixel), then
the classifier. Draft 003: "We replace the fully connected layer with 4096 channels in the paper with one with 512
channels. We adopt VGG-Net without additional batch normalization layers. Dropout layers are omitted and all the
weights of VGG-net are initialized orthogonally (Saxe et al., 2014)." So the classifier is FC-512 → ReLU → FC-512 →
ReLU → FC-num_classes (13 + 3 = 16, or 16 + 3 = 19 weight layers), every kernel orthogonally initialized (convs as
the ``(kh·kw·cin, cout)`` matrix), biases zero. ``vgg_smoke`` is the same code at 1/16 width with one conv per block,
for smoke runs. ``spectral_norm=True`` Miyato-normalizes every layer (draft 003 trains all its VGGs that way).
The input of the last layer (Φ(x)) is sown as ``intermediates/features``; the last layer is named ``head``.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from arreg_jax.models.layers import Conv, Dense, max_pool_2x2

# Channels per conv, 'M' = 2×2 max-pool.
CONFIGS = {
    'vgg16': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M'),
    'vgg19': (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 256, 'M', 512, 512, 512, 512, 'M',
              512, 512, 512, 512, 'M'),
    'vgg_smoke': (4, 'M', 8, 'M', 16, 'M', 32, 'M', 32, 'M'),
}
HIDDEN = {'vgg16': 512, 'vgg19': 512, 'vgg_smoke': 32}


class VGG(nn.Module):
  num_classes: int
  layers: Sequence[Any]
  hidden: int = 512
  dtype: Any = None
  spectral_norm: bool = False

  @nn.compact
  def __call__(self, x, train: bool = False):
    init = nn.initializers.orthogonal()
    x = x.astype(self.dtype or x.dtype)
    i = 0
    for v in self.layers:
      if v == 'M':
        x = max_pool_2x2(x)
        continue
      i += 1
      x = Conv(int(v), (3, 3), use_bias=True, kernel_init=init, dtype=self.dtype, spectral_norm=self.spectral_norm,
               name=f'conv{i}')(x, train=train)
      x = nn.relu(x)
    x = x.reshape(x.shape[0], -1)
    for j in (1, 2):
      x = nn.relu(Dense(self.hidden, kernel_init=init, dtype=self.dtype, spectral_norm=self.spectral_norm,
                        name=f'fc{j}')(x, train=train))
    self.sow('intermediates', 'features', x)
    x = Dense(self.num_classes, kernel_init=init, dtype=self.dtype, spectral_norm=self.spectral_norm,
              name='head')(x, train=train)
    return x.astype(jnp.float32)


def make(name: str, num_classes: int, dtype: Any = None, spectral_norm: bool = False) -> VGG:
  return VGG(num_classes, CONFIGS[name], hidden=HIDDEN[name], dtype=dtype, spectral_norm=spectral_norm)
