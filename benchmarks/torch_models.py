"""PyTorch twins of arreg_jax's CIFAR ResNet-20/56/110 (Fixup, no BatchNorm) and WRN-50-2, for the benchmarks.

Same architecture, NCHW layout, weights copied from the Flax parameters (``load_flax``):
  * convolution kernels HWIO → OIHW, Dense kernels (in, out) → Linear weights (out, in);
  * BatchNorm ``scale``/``bias``/``mean``/``var`` → ``weight``/``bias``/``running_mean``/``running_var``
    (ε = 1e-5, evaluation mode uses the running statistics, as ``module.apply(..., train=False)`` does).

Padding: arreg_jax's convolutions use XLA 'SAME' padding, which for a 3×3 stride-2 convolution on an even input pads
0 pixels before and 1 after (PyTorch's ``padding=1`` pads 1 on both sides and samples different pixels). The twins
therefore pad explicitly (``SamePadConv2d``): symmetric ``padding`` in the convolution when the 'SAME' padding is
symmetric, an ``F.pad`` of (lo, hi) otherwise. Option-A shortcuts (ResNet) are ``x[:, :, ::s, ::s]`` with zero
channels appended, as in ``arreg_jax/models/resnet.py``.

Nothing here is imported by the package; the benchmarks import it as ``torch_models`` from this directory.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F


def _same_padding(size: int, k: int, s: int) -> tuple[int, int]:
  """XLA 'SAME' padding (lo, hi) for one spatial dimension (same formula as arreg_jax.models.layers)."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


class SamePadConv2d(nn.Module):
  """Bias-free (by default) 2-D convolution with XLA 'SAME' padding for a fixed input size."""

  def __init__(self, cin: int, cout: int, k: int, stride: int, in_size: int, bias: bool = False):
    super().__init__()
    lo, hi = _same_padding(in_size, k, stride)
    self.symmetric = lo == hi
    self.pad = (lo, hi, lo, hi)  # F.pad order: W (left, right), H (top, bottom)
    self.conv = nn.Conv2d(cin, cout, k, stride, padding=lo if self.symmetric else 0, bias=bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if not self.symmetric:
      x = F.pad(x, self.pad)
    return self.conv(x)


# ----------------------------------------------------------------------------------------------------------------
# CIFAR ResNet-(6n+2), Fixup variant without BatchNorm (arreg_jax.models.resnet.CifarResNet, use_bn=False).


class BasicBlock(nn.Module):
  """conv3×3(stride) → ReLU → conv3×3 on the branch; option-A shortcut when the shape changes; ReLU after the sum."""

  def __init__(self, cin: int, cout: int, stride: int, in_size: int):
    super().__init__()
    self.conv1 = SamePadConv2d(cin, cout, 3, stride, in_size)
    self.conv2 = SamePadConv2d(cout, cout, 3, 1, -(-in_size // stride))
    self.stride = stride
    self.extra = cout - cin

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv2(F.relu(self.conv1(x)))
    shortcut = x
    if self.stride != 1 or self.extra:
      shortcut = x[:, :, ::self.stride, ::self.stride]
      shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra))  # zero channels appended (channel dim is 1)
    return F.relu(y + shortcut)


class CifarResNet(nn.Module):
  """ResNet-(6n+2) for 32×32 NCHW inputs in [0, 1]: 16/32/64 channels, global average pool, Linear head."""

  def __init__(self, depth: int = 56, num_classes: int = 10, in_size: int = 32):
    super().__init__()
    if (depth - 2) % 6:
      raise ValueError(f'CIFAR ResNet depth must be 6n+2, got {depth}')
    n = (depth - 2) // 6
    self.depth = depth
    self.conv_init = SamePadConv2d(3, 16, 3, 1, in_size)
    blocks = []
    cin, size = 16, in_size
    for stage, features in enumerate((16, 32, 64)):
      for block in range(n):
        stride = 2 if (stage > 0 and block == 0) else 1
        blocks.append(BasicBlock(cin, features, stride, size))
        cin, size = features, -(-size // stride)
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(64, num_classes)
    self._names = [f'stage{s + 1}_block{b + 1}' for s in range(3) for b in range(n)]

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.conv_init(x))
    x = self.blocks(x)
    return self.head(x.mean(dim=(2, 3)))

  def load_flax(self, params: Mapping[str, Any]) -> 'CifarResNet':
    """Copies the Flax ``params`` of ``resnet.CifarResNet(use_bn=False)`` into this module; returns self."""
    _copy_conv(self.conv_init, params['conv_init'])
    for name, block in zip(self._names, self.blocks):
      _copy_conv(block.conv1, params[name]['conv1'])
      _copy_conv(block.conv2, params[name]['conv2'])
    _copy_dense(self.head, params['head'])
    return self


# ----------------------------------------------------------------------------------------------------------------
# WRN-50-2 for 56×56 inputs (arreg_jax.models.wrn.WideResNet50): bottlenecks, BatchNorm, 3×3 stride-1 stem.


class Bottleneck(nn.Module):
  """1×1 → BN → ReLU → 3×3(stride) → BN → ReLU → 1×1 → BN, projection shortcut (1×1 conv + BN) when needed."""

  def __init__(self, cin: int, planes: int, width: int, stride: int, in_size: int):
    super().__init__()
    out = planes * 4
    self.conv1 = SamePadConv2d(cin, width, 1, 1, in_size)
    self.bn1 = nn.BatchNorm2d(width, eps=1e-5)
    self.conv2 = SamePadConv2d(width, width, 3, stride, in_size)
    self.bn2 = nn.BatchNorm2d(width, eps=1e-5)
    self.conv3 = SamePadConv2d(width, out, 1, 1, -(-in_size // stride))
    self.bn3 = nn.BatchNorm2d(out, eps=1e-5)
    self.shortcut = None
    if stride != 1 or cin != out:
      self.shortcut = nn.Sequential(SamePadConv2d(cin, out, 1, stride, in_size), nn.BatchNorm2d(out, eps=1e-5))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = F.relu(self.bn1(self.conv1(x)))
    y = F.relu(self.bn2(self.conv2(y)))
    y = self.bn3(self.conv3(y))
    return F.relu(y + (x if self.shortcut is None else self.shortcut(x)))


class WideResNet50(nn.Module):
  """WRN-50-k at 56×56 (no 7×7 stem, no max-pool), NCHW inputs in [0, 1]."""

  def __init__(self, num_classes: int = 200, widen_factor: int = 2, stage_sizes: Sequence[int] = (3, 4, 6, 3),
               base_width: int = 64, in_size: int = 56):
    super().__init__()
    self.conv_init = SamePadConv2d(3, base_width, 3, 1, in_size)
    self.bn_init = nn.BatchNorm2d(base_width, eps=1e-5)
    units, self._names = [], []
    cin, size = base_width, in_size
    for g, num_units in enumerate(stage_sizes):
      planes = base_width * 2 ** g
      for u in range(num_units):
        stride = 2 if (g > 0 and u == 0) else 1
        units.append(Bottleneck(cin, planes, planes * widen_factor, stride, size))
        self._names.append(f'group{g + 1}_unit{u + 1}')
        cin, size = planes * 4, -(-size // stride)
    self.units = nn.Sequential(*units)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn_init(self.conv_init(x)))
    x = self.units(x)
    return self.head(x.mean(dim=(2, 3)))

  def load_flax(self, params: Mapping[str, Any], batch_stats: Mapping[str, Any]) -> 'WideResNet50':
    """Copies Flax ``params`` and ``batch_stats`` of ``wrn.WideResNet50`` into this module; returns self."""
    _copy_conv(self.conv_init, params['conv_init'])
    _copy_bn(self.bn_init, params['bn_init'], batch_stats['bn_init'])
    for name, unit in zip(self._names, self.units):
      p, s = params[name], batch_stats[name]
      for i in (1, 2, 3):
        _copy_conv(getattr(unit, f'conv{i}'), p[f'conv{i}'])
        _copy_bn(getattr(unit, f'bn{i}'), p[f'bn{i}'], s[f'bn{i}'])
      if unit.shortcut is not None:
        _copy_conv(unit.shortcut[0], p['shortcut_conv'])
        _copy_bn(unit.shortcut[1], p['shortcut_bn'], s['shortcut_bn'])
      elif 'shortcut_conv' in p:
        raise ValueError(f'{name}: Flax has a projection shortcut, the twin has none')
    _copy_dense(self.head, params['head'])
    return self


# ----------------------------------------------------------------------------------------------------------------
# Weight copying.


def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32))


def _set(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
  if tuple(dst.shape) != tuple(src.shape):
    raise ValueError(f'{what}: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}')
  with torch.no_grad():
    dst.copy_(src)


def _copy_conv(m: SamePadConv2d, p: Mapping[str, Any]) -> None:
  _set(m.conv.weight, _t(p['kernel']).permute(3, 2, 0, 1).contiguous(), 'conv kernel (HWIO → OIHW)')
  if 'bias' in p:
    _set(m.conv.bias, _t(p['bias']), 'conv bias')


def _copy_dense(m: nn.Linear, p: Mapping[str, Any]) -> None:
  _set(m.weight, _t(p['kernel']).t().contiguous(), 'dense kernel ((in, out) → (out, in))')
  _set(m.bias, _t(p['bias']), 'dense bias')


def _copy_bn(m: nn.BatchNorm2d, p: Mapping[str, Any], s: Mapping[str, Any]) -> None:
  _set(m.weight, _t(p['scale']), 'bn scale')
  _set(m.bias, _t(p['bias']), 'bn bias')
  _set(m.running_mean, _t(s['mean']), 'bn mean')
  _set(m.running_var, _t(s['var']), 'bn var')


def build(name: str, num_classes: int, variables: Mapping[str, Any]) -> nn.Module:
  """The twin of arreg_jax model ``name`` ('resnet20', 'resnet56', 'resnet110' or 'wrn50_2') with ``variables``
  copied in, eval mode."""
  if name in ('resnet20', 'resnet56', 'resnet110'):
    model = CifarResNet(int(name[6:]), num_classes).load_flax(variables['params'])
  elif name == 'wrn50_2':
    model = WideResNet50(num_classes).load_flax(variables['params'], variables['batch_stats'])
  else:
    raise ValueError(f'no PyTorch twin for {name!r}')
  return model.eval()
