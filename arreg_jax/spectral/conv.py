"""Singular values and clipping of one convolution (by FFT, Sedghi et al. 2019) or one dense layer.

Convolutions follow Sedghi, Gupta & Long, "The Singular Values of Convolutional Layers" (ICLR 2019): a convolution
with a ``(kh, kw, cin, cout)`` HWIO kernel acting on ``H × W`` inputs with **wrap-around (circular) padding** is a
doubly block-circulant operator, so the 2-D DFT block-diagonalizes it. Its singular values are the union, over the
``H·W`` frequencies ``(u, v)``, of the singular values of the ``cin × cout`` matrices
``F[u, v] = Σ_{a,b} K[a, b] exp(-2πi (a·u/H + b·v/W))``, i.e. of ``fft2`` of the kernel zero-padded to ``H × W``.
Wen, Li & Jia (ICML 2020, §4.2.2, Fig. 1a and 5c,d, appendix B.2) use these per-layer spectra, and clip them every
epoch (appendix B.4.2, D.3, Table 6) with Sedghi et al.'s projection. SPEC.md §4–5 has the summary.

Conventions used throughout :mod:`arreg_jax.spectral`:

* **Circular padding.** The models pad with zeros ('SAME'); like Sedghi et al. and the paper, the spectrum reported
  for a conv layer is that of the wrap-around operator with the same kernel. A circular shift of the input is an
  orthogonal map, so the padding offset ('SAME' vs anything else) does not change the singular values, and
  convolution vs cross-correlation only conjugates each ``F[u, v]``, which does not change them either.
* **The DFT as a small matrix product.** ``F`` is computed as ``G_h · K · G_wᵀ`` with ``(n × k)`` DFT matrices
  instead of ``fft2`` of a zero-padded kernel. The two are identical when ``k ≤ n``; the matrix form also covers a
  kernel larger than its input (a 3×3 kernel on 2×2 inputs in deep layers), where the taps that alias onto the same
  input pixel are summed, which is what ``fft2`` of the wrapped kernel would give. For ``k ≪ n`` it is also cheaper
  than a full FFT.
* **Half the frequencies.** The kernel is real, so ``F[-u, -v] = conj(F[u, v])`` has the same singular values. Only
  the ``W//2 + 1`` columns ``v ∈ [0, W//2]`` are decomposed (one batched ``jnp.linalg.svd``); every spectrum
  returned by this module has already been expanded back to all ``H·W`` frequencies (columns ``0 < v < W/2`` count
  twice), so it is the operator's full multiset of singular values and any statistic (mean, std, quantiles) of
  the returned array is a statistic of the operator.
* **Strided convolutions** (stride ``s``, e.g. ResNet downsampling) are handled **exactly** by the polyphase
  decomposition: when ``s`` divides ``H`` and ``W``, the stride-``s`` circular convolution of ``H × W`` inputs is,
  after an orthogonal re-indexing of its input (``x[s·i + r, s·j + q, c] → x_{(r,q)}[i, j, c]``), a stride-1
  circular convolution of ``(H/s) × (W/s)`` inputs with ``s²·cin`` input channels and a ``⌈kh/s⌉ × ⌈kw/s⌉`` kernel
  ``K_poly[α, β, (r, q, c), o] = K[s·α + r, s·β + q, c, o]`` (zero where ``s·α + r ≥ kh``). Its spectrum has
  ``(H/s)·(W/s)·min(s²·cin, cout)`` values, structural zeros included (a 1×1 stride-2 convolution ignores three
  quarters of its input, so it has zero singular values whenever ``cout > cin``). When ``s`` does not divide the
  input size, :func:`layer_specs` rounds the size up to a multiple of ``s`` and marks the layer ``exact=False``.
* **Frequency-independent kernels.** When ``⌈kh/s⌉ = ⌈kw/s⌉ = 1`` (1×1 convolutions, stride 1 or 2) every frequency
  sees the same matrix, ``K`` reshaped to ``(kh·kw·cin, cout)`` (zero-padded to ``s²·cin`` rows): it is decomposed
  once and its singular values are repeated ``(H/s)·(W/s)`` times in the returned spectrum.
* **Dense layers** are plain matrices: their singular values are those of the ``(in, out)`` kernel.
* Spectra are returned **sorted in descending order**, as ``jnp.linalg.svd`` does.

BatchNorm (WRN-50-2) is not folded into the kernels: these are the spectra of the weight layers themselves.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any
IntPair = tuple[int, int]

HIGHEST = lax.Precision.HIGHEST


def pair(value: int | Sequence[int] | None, name: str) -> IntPair:
  """Normalizes an int / length-2 sequence / None (= 1) to a pair of positive ints."""
  if value is None:
    return (1, 1)
  if isinstance(value, (int, np.integer)):
    out = (int(value), int(value))
  else:
    out = tuple(int(v) for v in value)
    if len(out) == 1:
      out = (out[0], out[0])
  if len(out) != 2 or min(out) < 1:
    raise ValueError(f'{name} must be a positive int or a pair of them, got {value!r}')
  return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------------------------
# Static plans: the DFT matrices and their pseudo-inverses for one (kernel shape, input size, stride).
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvPlan:
  """Everything about one (kernel shape, operator input size, stride) that does not depend on the kernel values."""
  kernel_shape: tuple[int, int, int, int]
  hw: IntPair                 # operator input size (a multiple of the stride)
  stride: IntPair
  freq_hw: IntPair            # (H/s_h, W/s_w): the stride-1 polyphase grid
  pointwise: bool             # ceil(kh/s_h) == ceil(kw/s_w) == 1: the same matrix at every frequency

  @property
  def half_w(self) -> int:
    return self.freq_hw[1] // 2 + 1

  @property
  def rows(self) -> int:
    """Rows of each frequency's matrix: the polyphase input channels s_h·s_w·cin."""
    return self.stride[0] * self.stride[1] * self.kernel_shape[2]

  @property
  def rank(self) -> int:
    return min(self.rows, self.kernel_shape[3])

  @property
  def count(self) -> int:
    """Number of singular values of the operator: (H/s_h)·(W/s_w)·min(s_h·s_w·cin, cout)."""
    return self.freq_hw[0] * self.freq_hw[1] * self.rank

  def freq_bytes(self) -> int:
    """Approximate bytes of F and its SVD factors for one kernel (complex64)."""
    if self.pointwise:
      kh, kw, cin, cout = self.kernel_shape
      return 3 * 4 * kh * kw * cin * cout
    return 3 * 8 * self.freq_hw[0] * self.half_w * self.rows * self.kernel_shape[3]


@functools.lru_cache(maxsize=None)
def make_plan(kernel_shape: tuple[int, ...], hw: IntPair, stride: IntPair) -> ConvPlan:
  if len(kernel_shape) != 4:
    raise ValueError(f'a conv kernel must be HWIO (kh, kw, cin, cout), got shape {kernel_shape}')
  if hw[0] % stride[0] or hw[1] % stride[1]:
    raise ValueError(
        f'input size {hw} is not a multiple of the stride {stride}: the polyphase decomposition needs it '
        '(layer_specs rounds such sizes up and marks the layer exact=False)')
  kh, kw = kernel_shape[:2]
  pointwise = -(-kh // stride[0]) == 1 and -(-kw // stride[1]) == 1
  freq_hw = (hw[0] // stride[0], hw[1] // stride[1])
  return ConvPlan(tuple(int(d) for d in kernel_shape), hw, stride, freq_hw, pointwise)  # type: ignore[arg-type]


@functools.lru_cache(maxsize=None)
def _axis_dft(k: int, n_freq: int, s: int) -> tuple[np.ndarray, np.ndarray]:
  """DFT of one spatial axis in polyphase form, and its pseudo-inverse.

  Returns ``G`` of shape ``(n_freq, s, k)`` with ``G[u, r, a] = exp(-2πi u⌊a/s⌋/n_freq)·[a mod s = r]`` (the map
  from the ``k`` taps of a kernel column to its DFT on the ``n_freq``-point polyphase grid, one row per phase ``r``)
  and ``P = pinv(G)`` of shape ``(k, n_freq, s)`` (complex128). For ``s = 1`` and ``k ≤ n_freq``, ``P = Gᴴ/n_freq``
  is the inverse DFT cut to the kernel's support, Sedghi et al.'s projection; in general ``P`` gives the
  least-squares (operator-Frobenius-nearest) kernel change for a change of the per-frequency matrices, which also
  covers aliasing kernels (``⌈k/s⌉ > n_freq``).
  """
  a = np.arange(k)
  dft = np.exp(-2j * np.pi * np.outer(np.arange(n_freq), a // s) / n_freq)  # (n_freq, k)
  phase = (a % s)[None, :] == np.arange(s)[:, None]  # (s, k)
  g = dft[:, None, :] * phase[None, :, :]
  p = np.linalg.pinv(g.reshape(n_freq * s, k)).reshape(k, n_freq, s)
  return g, p


def _half_weights(n: int) -> np.ndarray:
  """Multiplicity of the columns v = 0..n//2 of a real signal's DFT: 2 for 0 < v < n/2, else 1."""
  v = np.arange(n // 2 + 1)
  return np.where((v == 0) | (2 * v == n), 1, 2)


def _expand_index(n: int) -> np.ndarray:
  """For each of the n columns, the half-spectrum column with the same singular-value multiset."""
  v = np.arange(n)
  return np.where(v <= n // 2, v, n - v)


# ----------------------------------------------------------------------------------------------------------------
# Per-kernel traceable kernels.
# ----------------------------------------------------------------------------------------------------------------


def _freq_matrices(kernel: jax.Array, plan: ConvPlan) -> jax.Array:
  """``F[u, v]`` for u ∈ [0, H/s), v ∈ [0, (W/s)//2]: shape ``(H/s, W/s//2 + 1, s_h·s_w·cin, cout)``, complex64."""
  kh, kw, cin, cout = plan.kernel_shape
  g_h, _ = _axis_dft(kh, plan.freq_hw[0], plan.stride[0])
  g_w, _ = _axis_dft(kw, plan.freq_hw[1], plan.stride[1])
  g_w = g_w[:plan.half_w]
  k = kernel.astype(jnp.complex64)
  f = jnp.einsum('ura,abco->urbco', jnp.asarray(g_h, jnp.complex64), k, precision=HIGHEST)
  f = jnp.einsum('vqb,urbco->uvrqco', jnp.asarray(g_w, jnp.complex64), f, precision=HIGHEST)
  return f.reshape(plan.freq_hw[0], plan.half_w, plan.rows, cout)


def _pointwise_matrix(kernel: jax.Array) -> jax.Array:
  kh, kw, cin, cout = kernel.shape
  return kernel.reshape(kh * kw * cin, cout)


def conv_svs_single(kernel: jax.Array, plan: ConvPlan) -> jax.Array:
  """All ``plan.count`` singular values of the circular operator, sorted descending (traceable)."""
  if plan.pointwise:
    s = jnp.linalg.svd(_pointwise_matrix(kernel).astype(jnp.float32), compute_uv=False)
    s = jnp.concatenate([s, jnp.zeros((plan.rank - s.shape[0],), s.dtype)])
    s = jnp.tile(s, plan.freq_hw[0] * plan.freq_hw[1])
  else:
    s = jnp.linalg.svd(_freq_matrices(kernel, plan), compute_uv=False)  # (H', W'//2+1, rank)
    s = s[:, _expand_index(plan.freq_hw[1])].reshape(-1)
  return -jnp.sort(-s)


def _shrink(mat: jax.Array, max_sv: jax.Array) -> jax.Array:
  """``-U·max(S - c, 0)·Vᴴ``: the change that clips the singular values of (a batch of) matrices at ``max_sv``.

  Returning the change rather than ``U·min(S, c)·Vᴴ`` makes a matrix already under ``c`` come back bit-for-bit.
  """
  u, s, vh = jnp.linalg.svd(mat, full_matrices=False)
  excess = jnp.maximum(s - max_sv, 0).astype(u.dtype)
  return -jnp.einsum('...ik,...k,...kj->...ij', u, excess, vh, precision=HIGHEST)


def dense_clip_single(w: jax.Array, max_sv: jax.Array) -> jax.Array:
  return (w + _shrink(w.astype(jnp.float32), max_sv)).astype(w.dtype)


def conv_clip_single(kernel: jax.Array, max_sv: jax.Array, plan: ConvPlan, rounds: int) -> jax.Array:
  """``rounds`` rounds of: per-frequency SVD, clip at ``max_sv``, project back onto the kernel's support."""
  kh, kw, cin, cout = plan.kernel_shape
  sh, sw = plan.stride
  dtype = kernel.dtype
  if rounds == 0:
    return kernel
  if plan.pointwise:
    # Every frequency holds the same matrix (plus structural zero rows): one SVD is exact in one round.
    mat = _pointwise_matrix(kernel).astype(jnp.float32)
    return (mat + _shrink(mat, max_sv)).reshape(kernel.shape).astype(dtype)
  _, p_h = _axis_dft(kh, plan.freq_hw[0], sh)
  _, p_w = _axis_dft(kw, plan.freq_hw[1], sw)
  # Real kernels have conjugate-symmetric spectra and the clip keeps that symmetry, so the back-projection over all
  # frequencies is the real part of the one over the half plane with the columns 0 < v < W/2 counted twice.
  p_w = p_w[:, :plan.half_w, :] * _half_weights(plan.freq_hw[1])[None, :, None]
  p_h = jnp.asarray(p_h, jnp.complex64)
  p_w = jnp.asarray(p_w, jnp.complex64)

  def one_round(_, k):
    delta = _shrink(_freq_matrices(k, plan), max_sv)
    delta = delta.reshape(plan.freq_hw[0], plan.half_w, sh, sw, cin, cout)
    dk = jnp.einsum('aur,uvrqco->avqco', p_h, delta, precision=HIGHEST)
    dk = jnp.einsum('bvq,avqco->abco', p_w, dk, precision=HIGHEST)
    return k + dk.real

  return lax.fori_loop(0, rounds, one_round, kernel.astype(jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Public functions of a single kernel.
# ----------------------------------------------------------------------------------------------------------------


def _layout_perm(layout: str, kernel: jax.Array) -> tuple[int, ...]:
  """The permutation taking a kernel in ``layout`` (a permutation of 'HWIO', e.g. 'OIHW') to HWIO."""
  if not isinstance(layout, str) or sorted(layout.upper()) != sorted('HWIO'):
    raise ValueError(f"layout must name the kernel's axes with the letters H, W, I, O, e.g. 'HWIO' (Flax) or "
                     f"'OIHW' (Equinox, PyTorch); got {layout!r}")
  if jnp.ndim(kernel) != 4:
    raise ValueError(f'kernel must be a 4-D convolution kernel, got shape {jnp.shape(kernel)}')
  return tuple(layout.upper().index(c) for c in 'HWIO')


@functools.partial(jax.jit, static_argnames=('input_hw', 'stride', 'perm'))
def _conv_singular_values_jit(kernel, input_hw, stride, perm):
  kernel = jnp.transpose(kernel, perm)
  return conv_svs_single(kernel, make_plan(kernel.shape, input_hw, stride))


def conv_singular_values(kernel: jax.Array, input_hw: int | Sequence[int], *, layout: str,
                         stride: int | Sequence[int] = 1) -> jax.Array:
  """All singular values of a circular 2-D convolution (Sedghi, Gupta & Long 2019), sorted descending.

  Args:
    kernel: the 4-D kernel, its axes in ``layout``.
    input_hw: spatial size ``(H, W)`` (or one int for square inputs) of the inputs the layer sees.
    layout: the kernel's axes, a permutation of ``'HWIO'``: ``'HWIO'`` for Flax (linen and NNX), ``'OIHW'`` for
      Equinox and PyTorch. Required: a kernel's shape does not say its layout (a ``(3, 3, 3, 3)`` kernel reads
      either way). :func:`arreg_jax.spectral.layer_specs` reads it from a model's program instead.
    stride: the convolution's stride (int or pair); must divide ``input_hw``. Strided convolutions are exact
      (polyphase decomposition, see the module docstring).

  Returns:
    float32 array of length ``(H/s_h)·(W/s_w)·min(s_h·s_w·cin, cout)``: the operator's full multiset of singular
    values (for stride 1, ``H·W·min(cin, cout)``), descending. Frequencies computed once through conjugate
    symmetry are already repeated, and a frequency-independent kernel (1×1 conv) has its matrix's singular values
    repeated at every frequency, so plain statistics of the array are statistics of the operator.
  """
  perm = _layout_perm(layout, kernel)
  return _conv_singular_values_jit(jnp.asarray(kernel), pair(input_hw, 'input_hw'), pair(stride, 'stride'), perm)


@jax.jit
def dense_singular_values(w: jax.Array) -> jax.Array:
  """Singular values of a dense kernel, descending (length ``min(in, out)``; the same for ``(in, out)`` and its
  transpose ``(out, in)``)."""
  chex.assert_rank(w, 2)
  return jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)


@functools.partial(jax.jit, static_argnames=('input_hw', 'stride', 'rounds', 'perm'))
def _clip_conv_kernel_jit(kernel, max_sv, input_hw, stride, rounds, perm):
  hwio = jnp.transpose(kernel, perm)
  clipped = conv_clip_single(hwio, max_sv, make_plan(hwio.shape, input_hw, stride), rounds)
  return jnp.transpose(clipped, np.argsort(perm))


def clip_conv_kernel(kernel: jax.Array, input_hw: int | Sequence[int], max_sv: float | jax.Array, *, layout: str,
                     rounds: int = 1, stride: int | Sequence[int] = 1) -> jax.Array:
  """Clips the singular values of a circular convolution at ``max_sv`` (Sedghi, Gupta & Long 2019, §3.2).

  One round: the per-frequency matrices ``F[u, v]`` are decomposed, singular values above ``max_sv`` are cut to
  ``max_sv``, and the change is mapped back to the kernel by the inverse DFT, real part, cut to the ``kh × kw``
  support. (Written as ``K + P·ΔF`` with ``P`` the pseudo-inverse of the kernel → spectrum map, which is exactly
  "inverse FFT and cut" when ``k ≤ n``, and the least-squares projection for aliasing or strided kernels; strided
  kernels are clipped through their polyphase form and mapped back.) ``rounds`` rounds run in a
  ``lax.fori_loop``.

  Cutting the kernel back to its support makes one round inexact: the projected operator's norm exceeds
  ``max_sv``. This alternating projection converges slowly. For a standard-normal 3×3×4×5 kernel on 8×8 inputs
  clipped to 1 the norm is ≈ 1.36 after one round and ≈ 1.03 after ten (Sedghi et al. clip once per epoch and let
  training carry on; the paper follows them). 1×1 and other frequency-independent kernels are clipped exactly in one
  round. A kernel whose singular values are all ``≤ max_sv`` comes back unchanged (the update is ``-U·max(S-c,0)·Vᴴ``,
  exactly zero).

  Args:
    kernel: the 4-D kernel, its axes in ``layout``.
    input_hw: spatial size of the layer's inputs, ``(H, W)`` or an int.
    max_sv: the clipping threshold ``c`` (may be traced).
    layout: the kernel's axes, a permutation of ``'HWIO'`` (``'HWIO'`` Flax, ``'OIHW'`` Equinox/PyTorch); required.
    rounds: number of project-and-clip rounds (static).
    stride: the convolution's stride; must divide ``input_hw``.

  Returns:
    The clipped kernel, same shape, layout and dtype.
  """
  perm = _layout_perm(layout, kernel)
  if rounds < 0:
    raise ValueError(f'rounds must be >= 0, got {rounds}')
  return _clip_conv_kernel_jit(jnp.asarray(kernel), jnp.asarray(max_sv, jnp.float32), pair(input_hw, 'input_hw'),
                               pair(stride, 'stride'), int(rounds), perm)


@jax.jit
def clip_dense_kernel(w: jax.Array, max_sv: float | jax.Array) -> jax.Array:
  """Clips the singular values of a dense kernel at ``max_sv`` (exact in one step; either orientation)."""
  chex.assert_rank(w, 2)
  return dense_clip_single(w, jnp.asarray(max_sv, jnp.float32))
