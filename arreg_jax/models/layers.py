"""Layers shared by the models: a convolution with an explicit VJP and a reshape-based 2×2 max-pool.

Why not ``flax.linen.Conv`` and ``flax.linen.max_pool``: on XLA:CPU the input gradient that JAX derives for a
convolution is lowered to a naive loop when it sits inside a ``lax.while_loop`` (the PGD loop), and the input
gradient of ``reduce_window`` max-pooling is slow everywhere on CPU (measured on 2 CPU cores: ResNet-56 PGD-10 at
2.5 img/s with JAX's derived VJP inside the loop against ≈ 15 img/s with ours; a small MNIST CNN's adversarial step
3.2× slower with ``flax.linen.max_pool`` than with the reshape-based pool). ``conv2d``
below computes the same function as ``lax.conv_general_dilated`` but writes its VJP as two explicit convolutions
(a transposed convolution for the input, a batch-contracting convolution for the kernel), which every backend
lowers to its fast convolution kernels. The attack benchmark (``benchmarks/attack_throughput.py``) measures it.

Spectral normalization (Miyato, Kataoka, Koyama & Yoshida, ICLR 2018; draft 003 §5, appendix A.2): ``Conv`` and
``Dense`` with ``spectral_norm=True`` divide their kernel by the power-iteration estimate σ of the largest singular
value of its Miyato matrix (dense ``(out, in)``, conv ``(cout, kh·kw·cin)``; :func:`arreg_jax.spectral.miyato_matrix`).
The power-iteration vector ``u`` is a non-trainable variable ``sn_u`` in the ``'batch_stats'`` collection, so SN
models ride on the state plumbing BatchNorm models already have (``TrainState.batch_stats``, checkpoints, the train
step's ``mutable=['batch_stats']`` parameter update). One power-iteration round updates ``u`` only in a call with
``train=True`` **and** the collection mutable — the parameter-update forward pass of the train step. The attack
(``train=False``, or ``train=True`` without ``mutable``) and evaluation use the stored ``u`` unchanged
(``σ = uᵀWv``, ``v = Wᵀu/‖Wᵀu‖``). The spectral toolkit (``layer_specs``, clipping) sees the raw ``kernel``
parameter; the analysis first folds σ into the kernels (``arreg_jax.models.fold_spectral_norm``), so singular values
and bound terms are those of the layers the network applies.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

_DN = ('NHWC', 'HWIO', 'NHWC')


def _same_padding(size: int, k: int, s: int) -> tuple[int, int]:
  """XLA 'SAME' padding (lo, hi) for one spatial dimension."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def _conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int] = (1, 1)) -> jax.Array:
  """'SAME'-padded 2-D convolution whose VJP is two explicit convolutions (fast input gradients on XLA:CPU).

  Computes exactly ``lax.conv_general_dilated(x, w, strides, 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``;
  only its derivative is written differently (module docstring).

  Args:
    x: input (N, H, W, Cin).
    w: kernel (kh, kw, Cin, Cout).
    strides: (sh, sw), static.

  Returns:
    (N, ⌈H/sh⌉, ⌈W/sw⌉, Cout), in the inputs' dtype.
  """
  pads = [_same_padding(x.shape[1 + i], w.shape[i], strides[i]) for i in range(2)]
  return _conv(x, w, strides, pads)


def _conv2d_fwd(x, w, strides):
  return conv2d(x, w, strides), (x, w)


def _conv2d_bwd(strides, res, g):
  x, w = res
  kh, kw = w.shape[:2]
  pads = [_same_padding(x.shape[1 + i], w.shape[i], strides[i]) for i in range(2)]
  # dL/dx: the transposed convolution. Dilate g by the stride, pad so that the flipped kernel visits every input
  # position it touched in the forward pass, and correlate with the spatially flipped, in/out-swapped kernel.
  w_t = jnp.flip(w, (0, 1)).swapaxes(2, 3)
  dx_pads = []
  for i, k in enumerate((kh, kw)):
    lo, _ = pads[i]
    size_in = x.shape[1 + i]
    dilated = (g.shape[1 + i] - 1) * strides[i] + 1
    pad_lo = k - 1 - lo
    pad_hi = size_in + k - 1 - pad_lo - dilated
    dx_pads.append((pad_lo, pad_hi))
  dx = lax.conv_general_dilated(g, w_t, (1, 1), dx_pads, lhs_dilation=strides, dimension_numbers=_DN)
  # dL/dw: correlate the input with the output gradient over the batch (batch is the contracted 'feature' dim).
  # Output length per spatial dim: H + lo + hi - (Ho - 1) * s, which must equal k.
  dw_pads = [(pads[i][0], k + (g.shape[1 + i] - 1) * strides[i] - x.shape[1 + i] - pads[i][0])
             for i, k in enumerate((kh, kw))]
  dw = lax.conv_general_dilated(
      x.transpose(3, 1, 2, 0),  # (Cin, H, W, N): the batch acts as the contracted feature dimension
      g.transpose(1, 2, 0, 3),  # (Ho, Wo, N, Cout): the 'kernel', dilated by the stride
      window_strides=(1, 1), padding=dw_pads, rhs_dilation=strides, dimension_numbers=_DN,
  )  # (Cin, kh, kw, Cout)
  dw = dw.transpose(1, 2, 0, 3)
  return dx.astype(x.dtype), dw.astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2×2 max-pool with stride 2, written as reshape + max: a drop-in for ``flax.linen.max_pool(x, (2, 2),
  strides=(2, 2))`` whose input gradient is fast on every backend (the ``reduce_window`` gradient of
  ``nn.max_pool`` is slow on CPU: a small MNIST CNN's adversarial step ran 3.2× slower with it).

  The forward values are those of ``nn.max_pool``. Where a window holds tied maxima (e.g. the zeros after a ReLU),
  the gradient is split equally among them (JAX's rule for ``max``) instead of going to one of them.

  Args:
    x: (N, H, W, C) with H and W even.

  Returns:
    (N, H/2, W/2, C).

  Raises:
    ValueError: H or W odd.
  """
  n, h, w, c = x.shape
  if h % 2 or w % 2:
    raise ValueError(f'max_pool_2x2 needs even spatial sizes, got {h}x{w}')
  return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


SN_COLLECTION = 'batch_stats'


def _sn_kernel(module: nn.Module, kernel: jax.Array, train: bool) -> jax.Array:
  """``kernel / σ`` with σ from one power-iteration round (kept only in a mutable train call)."""
  from arreg_jax.spectral import power  # pylint: disable=g-import-not-at-top  (spectral is model-agnostic)
  u = module.variable(SN_COLLECTION, 'sn_u', lambda: power.l2_normalize(
      jax.random.normal(module.make_rng('params'), (kernel.shape[-1],), jnp.float32)))
  update = train and module.is_mutable_collection(SN_COLLECTION) and not module.is_initializing()
  sigma, u_new = power.power_iteration(power.miyato_matrix(kernel), u.value, n_iter=1 if update else 0)
  if update:
    u.value = u_new
  return kernel / sigma


class Dense(nn.Dense):
  """``flax.linen.Dense`` (same parameters, same ``isinstance``) with optional Miyato spectral normalization."""
  spectral_norm: bool = False

  @nn.compact
  def __call__(self, inputs: jax.Array, train: bool = False) -> jax.Array:  # pylint: disable=arguments-differ
    kernel = self.param('kernel', self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype)
    if self.spectral_norm:
      kernel = _sn_kernel(self, kernel, train)
    dtype = self.dtype or inputs.dtype
    y = jnp.dot(inputs.astype(dtype), kernel.astype(dtype))
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    return y


class Conv(nn.Module):
  """A drop-in for ``flax.linen.Conv`` (padding 'SAME') whose input gradient is fast on XLA:CPU, by :func:`conv2d`.

  Use it in your own linen models when you attack them on a CPU: XLA:CPU lowers the input gradient that JAX derives
  for a convolution to a naive loop when it sits inside a ``lax.fori_loop``/``while_loop`` — the loop of PGD, APGD,
  FAB and Square — and this layer's explicit VJP avoids that (ResNet-56 PGD-10 on 2 cores: 15 img/s against 2.5).
  With :func:`max_pool_2x2` for ``nn.max_pool``, the embedded default's small CNN runs PGD-10 about 5× faster than
  with ``nn.Conv`` + ``nn.max_pool`` (73 → 447 and 113 → 499 img/s in two runs on a busy 2-core machine, batch 128,
  ``benchmarks/fast_layers.py``), with the same logits. Forward values are
  those of ``nn.Conv(features, kernel_size, strides, padding='SAME')``; the parameters have the same names and shapes
  (``kernel`` (kh, kw, Cin, Cout), ``bias`` (Cout,)), so trained ``nn.Conv`` weights load as they are. On GPU/TPU it
  is as fast as ``nn.Conv``.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    use_bias: add a ``bias`` parameter (default False, unlike ``nn.Conv``).
    kernel_init, bias_init: initializers, as ``nn.Conv``'s.
    dtype: the computation dtype (None: the input's); parameters are float32.
    spectral_norm: divide the kernel by its power-iteration spectral norm (Miyato et al. 2018; module docstring).

  The spectral toolkit reads ``kernel_size`` and ``strides`` to know the linear operator each layer applies.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  use_bias: bool = False
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros_init()
  dtype: Any = None  # computation dtype (None: the input's)
  spectral_norm: bool = False  # Miyato et al. (2018); see the module docstring

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kh, kw = self.kernel_size
    kernel = self.param('kernel', self.kernel_init, (kh, kw, x.shape[-1], self.features), jnp.float32)
    if self.spectral_norm:
      kernel = _sn_kernel(self, kernel, train)
    dtype = self.dtype or x.dtype
    y = conv2d(x.astype(dtype), kernel.astype(dtype), tuple(self.strides))
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32).astype(dtype)
    return y
