"""Spectral toolkit: singular values of every layer, batched spectral clipping, power-iteration normalization.

Convolutions follow Sedghi, Gupta & Long, "The Singular Values of Convolutional Layers" (ICLR 2019): a convolution
with a ``(kh, kw, cin, cout)`` HWIO kernel acting on ``H × W`` inputs with **wrap-around (circular) padding** is a
doubly block-circulant operator, so the 2-D DFT block-diagonalizes it. Its singular values are the union, over the
``H·W`` frequencies ``(u, v)``, of the singular values of the ``cin × cout`` matrices
``F[u, v] = Σ_{a,b} K[a, b] exp(-2πi (a·u/H + b·v/W))``, i.e. of ``fft2`` of the kernel zero-padded to ``H × W``.
Wen, Li & Jia (ICML 2020, §4.2.2, Fig. 1a and 5c,d, appendix B.2) use these per-layer spectra, and clip them every
epoch (appendix B.4.2, D.3, Table 6) with Sedghi et al.'s projection. SPEC.md §4–5 has the summary.

Conventions used throughout this module:

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

Performance notes (XLA:CPU, jax/jaxlib 0.10.2; measured on 2 cores):

* The cost is the batched LAPACK SVD (``cgesdd``); the DFTs are small matrix products. Clipping all 55 conv layers of
  ResNet-56 (32×32) takes ≈ 1.3–2.6 s on 2 shared cores, all spectra ≈ 0.7–1.3 s (``benchmarks/spectral_clip.py``).
* Set ``OPENBLAS_NUM_THREADS=1`` in the environment of CPU runs (before numpy/scipy are imported). jaxlib's LAPACK
  kernels use scipy's OpenBLAS, whose own threads oversubscribe the cores already used by XLA's pool: batched SVDs
  were 3–30× slower and erratic without it.
* Two batched LAPACK calls running concurrently inside one XLA:CPU program can deadlock it; the batched functions
  here run their groups one after another (see ``_after``). Code elsewhere that puts several independent
  ``jnp.linalg.svd``/``eigh`` calls into one jitted CPU program needs the same care.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Iterable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

PyTree = Any
IntPair = tuple[int, int]

_HIGHEST = lax.Precision.HIGHEST
# Upper bound on the bytes of per-frequency matrices (and their SVD factors) that one vmapped chunk of a batched
# clip may hold; groups of equal layers bigger than this are processed in chunks with ``lax.map(batch_size=...)``.
_CHUNK_BYTES = 1 << 29


def _pair(value: int | Sequence[int] | None, name: str) -> IntPair:
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
class _ConvPlan:
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
def _make_plan(kernel_shape: tuple[int, ...], hw: IntPair, stride: IntPair) -> _ConvPlan:
  if len(kernel_shape) != 4:
    raise ValueError(f'a conv kernel must be HWIO (kh, kw, cin, cout), got shape {kernel_shape}')
  if hw[0] % stride[0] or hw[1] % stride[1]:
    raise ValueError(
        f'input size {hw} is not a multiple of the stride {stride}: the polyphase decomposition needs it '
        '(layer_specs rounds such sizes up and marks the layer exact=False)')
  kh, kw = kernel_shape[:2]
  pointwise = -(-kh // stride[0]) == 1 and -(-kw // stride[1]) == 1
  freq_hw = (hw[0] // stride[0], hw[1] // stride[1])
  return _ConvPlan(tuple(int(d) for d in kernel_shape), hw, stride, freq_hw, pointwise)  # type: ignore[arg-type]


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


def _freq_matrices(kernel: jax.Array, plan: _ConvPlan) -> jax.Array:
  """``F[u, v]`` for u ∈ [0, H/s), v ∈ [0, (W/s)//2]: shape ``(H/s, W/s//2 + 1, s_h·s_w·cin, cout)``, complex64."""
  kh, kw, cin, cout = plan.kernel_shape
  g_h, _ = _axis_dft(kh, plan.freq_hw[0], plan.stride[0])
  g_w, _ = _axis_dft(kw, plan.freq_hw[1], plan.stride[1])
  g_w = g_w[:plan.half_w]
  k = kernel.astype(jnp.complex64)
  f = jnp.einsum('ura,abco->urbco', jnp.asarray(g_h, jnp.complex64), k, precision=_HIGHEST)
  f = jnp.einsum('vqb,urbco->uvrqco', jnp.asarray(g_w, jnp.complex64), f, precision=_HIGHEST)
  return f.reshape(plan.freq_hw[0], plan.half_w, plan.rows, cout)


def _pointwise_matrix(kernel: jax.Array) -> jax.Array:
  kh, kw, cin, cout = kernel.shape
  return kernel.reshape(kh * kw * cin, cout)


def _conv_svs_single(kernel: jax.Array, plan: _ConvPlan) -> jax.Array:
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
  return -jnp.einsum('...ik,...k,...kj->...ij', u, excess, vh, precision=_HIGHEST)


def _dense_clip_single(w: jax.Array, max_sv: jax.Array) -> jax.Array:
  return (w + _shrink(w.astype(jnp.float32), max_sv)).astype(w.dtype)


def _conv_clip_single(kernel: jax.Array, max_sv: jax.Array, plan: _ConvPlan, rounds: int) -> jax.Array:
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
    dk = jnp.einsum('aur,uvrqco->avqco', p_h, delta, precision=_HIGHEST)
    dk = jnp.einsum('bvq,avqco->abco', p_w, dk, precision=_HIGHEST)
    return k + dk.real

  return lax.fori_loop(0, rounds, one_round, kernel.astype(jnp.float32)).astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# Public functions of a single kernel.
# ----------------------------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=('input_hw', 'stride'))
def _conv_singular_values_jit(kernel, input_hw, stride):
  return _conv_svs_single(kernel, _make_plan(kernel.shape, input_hw, stride))


def conv_singular_values(kernel: jax.Array, input_hw: int | Sequence[int], *,
                         stride: int | Sequence[int] = 1) -> jax.Array:
  """All singular values of a circular 2-D convolution (Sedghi, Gupta & Long 2019), sorted descending.

  Args:
    kernel: Flax HWIO kernel ``(kh, kw, cin, cout)``.
    input_hw: spatial size ``(H, W)`` (or one int for square inputs) of the inputs the layer sees.
    stride: the convolution's stride (int or pair); must divide ``input_hw``. Strided convolutions are exact
      (polyphase decomposition, see the module docstring).

  Returns:
    float32 array of length ``(H/s_h)·(W/s_w)·min(s_h·s_w·cin, cout)``: the operator's full multiset of singular
    values (for stride 1, ``H·W·min(cin, cout)``), descending. Frequencies computed once through conjugate
    symmetry are already repeated, and a frequency-independent kernel (1×1 conv) has its matrix's singular values
    repeated at every frequency, so plain statistics of the array are statistics of the operator.
  """
  chex.assert_rank(kernel, 4)
  return _conv_singular_values_jit(jnp.asarray(kernel), _pair(input_hw, 'input_hw'), _pair(stride, 'stride'))


@jax.jit
def dense_singular_values(w: jax.Array) -> jax.Array:
  """Singular values of a dense ``(in, out)`` kernel, descending (length ``min(in, out)``)."""
  chex.assert_rank(w, 2)
  return jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False)


@functools.partial(jax.jit, static_argnames=('input_hw', 'stride', 'rounds'))
def _clip_conv_kernel_jit(kernel, max_sv, input_hw, stride, rounds):
  return _conv_clip_single(kernel, max_sv, _make_plan(kernel.shape, input_hw, stride), rounds)


def clip_conv_kernel(kernel: jax.Array, input_hw: int | Sequence[int], max_sv: float | jax.Array, *,
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
    kernel: Flax HWIO kernel ``(kh, kw, cin, cout)``.
    input_hw: spatial size of the layer's inputs, ``(H, W)`` or an int.
    max_sv: the clipping threshold ``c`` (may be traced).
    rounds: number of project-and-clip rounds (static).
    stride: the convolution's stride; must divide ``input_hw``.

  Returns:
    The clipped kernel, same shape and dtype.
  """
  chex.assert_rank(kernel, 4)
  if rounds < 0:
    raise ValueError(f'rounds must be >= 0, got {rounds}')
  return _clip_conv_kernel_jit(jnp.asarray(kernel), jnp.asarray(max_sv, jnp.float32), _pair(input_hw, 'input_hw'),
                               _pair(stride, 'stride'), int(rounds))


@jax.jit
def clip_dense_kernel(w: jax.Array, max_sv: float | jax.Array) -> jax.Array:
  """Clips the singular values of a dense ``(in, out)`` kernel at ``max_sv`` (exact in one step)."""
  chex.assert_rank(w, 2)
  return _dense_clip_single(w, jnp.asarray(max_sv, jnp.float32))


# ----------------------------------------------------------------------------------------------------------------
# Layers of a model.
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """One weight layer of a model as the spectral functions see it (hashable: it is a static jit argument).

  Attributes:
    path: module path inside ``params``; the kernel is ``params[path[0]]...[path[-1]]['kernel']``.
    kind: ``'conv'`` or ``'dense'``.
    kernel_shape: HWIO ``(kh, kw, cin, cout)`` for convs, ``(in, out)`` for dense layers.
    stride: the conv's stride ``(s_h, s_w)``; ``None`` for dense layers.
    input_hw: spatial size of the inputs the conv really sees in the model; ``None`` for dense layers.
  """
  path: tuple[str, ...]
  kind: str
  kernel_shape: tuple[int, ...]
  stride: IntPair | None = None
  input_hw: IntPair | None = None

  @property
  def name(self) -> str:
    return '/'.join(self.path)

  @property
  def exact(self) -> bool:
    """False when the stride does not divide the input size (then the size is rounded up, see operator_hw)."""
    if self.kind != 'conv':
      return True
    return self.input_hw[0] % self.stride[0] == 0 and self.input_hw[1] % self.stride[1] == 0

  @property
  def operator_hw(self) -> IntPair | None:
    """Input size of the circular operator analysed: ``input_hw`` rounded up to a multiple of the stride."""
    if self.kind != 'conv':
      return None
    return tuple(-(-n // s) * s for n, s in zip(self.input_hw, self.stride))  # type: ignore[return-value]

  def plan(self) -> _ConvPlan:
    return _make_plan(self.kernel_shape, self.operator_hw, self.stride)

  @property
  def num_singular_values(self) -> int:
    return self.plan().count if self.kind == 'conv' else min(self.kernel_shape)


@dataclasses.dataclass(frozen=True)
class LayerSingularValues:
  """The spectrum of one weight layer (see the module docstring for the conventions).

  Attributes:
    name: ``'/'``-joined module path.
    path: module path inside ``params``.
    kind: ``'conv'`` or ``'dense'``.
    kernel_shape: the kernel's shape.
    stride: conv stride, ``None`` for dense layers.
    input_hw: spatial input size the conv sees in the model, ``None`` for dense layers.
    singular_values: float32 numpy array, descending, the operator's full multiset (multiplicities included).
    exact: False when the stride does not divide ``input_hw`` and the spectrum is that of the rounded-up size.
  """
  name: str
  path: tuple[str, ...]
  kind: str
  kernel_shape: tuple[int, ...]
  stride: IntPair | None
  input_hw: IntPair | None
  singular_values: np.ndarray
  exact: bool


def _is_conv_module(module: nn.Module) -> bool:
  return all(hasattr(module, a) for a in ('features', 'kernel_size', 'strides'))


def _check_plain_conv(module: nn.Module) -> None:
  for attr in ('kernel_dilation', 'input_dilation'):
    if _pair(getattr(module, attr, None), attr) != (1, 1):
      raise NotImplementedError(f'{type(module).__name__} at {module.path}: {attr} != 1 is not supported')
  if getattr(module, 'feature_group_count', 1) != 1:
    raise NotImplementedError(f'{type(module).__name__} at {module.path}: grouped convolutions are not supported')


def _unwrap(fn: Callable[..., Any]) -> Callable[..., Any]:
  """A jitted function may not re-run its Python (cached trace), which interceptors need: call the wrapped one."""
  while hasattr(fn, 'lower') and hasattr(fn, '__wrapped__'):
    fn = fn.__wrapped__
  return fn


def _get_subtree(tree: Mapping[str, Any], path: Sequence[str]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def layer_specs(model: nn.Module | Callable[..., Any], variables: Mapping[str, Any],
                input_shape: Sequence[int], *, dtype: Any = jnp.float32,
                **apply_kwargs: Any) -> tuple[LayerSpec, ...]:
  """The weight layers of a model in forward order, each conv with the spatial size it really sees.

  The model runs once under ``jax.eval_shape`` inside ``flax.linen.intercept_methods``: every ``__call__`` of a
  conv-like module (one with ``features``, ``kernel_size`` and ``strides`` attributes, e.g.
  ``arreg_jax.models.layers.Conv`` or ``flax.linen.Conv``) or of a ``flax.linen.Dense`` records the module path,
  the input shape and the stride. Nothing else about the model is assumed. A module called again with the same
  input size is listed once; called at two different sizes it is listed twice (and ``clip_params`` refuses it).

  Args:
    model: a linen ``Module`` (called as ``model.apply(variables, x, **apply_kwargs)``) or an
      ``apply_fn(variables, x, **apply_kwargs)`` such as the one ``arreg_jax.models.create`` returns.
    variables: the model's variables; kernels are read from ``variables['params']``.
    input_shape: shape of one input batch, NHWC, e.g. ``(1, 32, 32, 3)``.
    dtype: dtype of the abstract input.
    **apply_kwargs: forwarded to the model (e.g. ``train=False``).

  Returns:
    A tuple of :class:`LayerSpec`, in the order the layers are called.
  """
  fn = model.apply if isinstance(model, nn.Module) else _unwrap(model)
  params = variables['params']
  records: list[LayerSpec] = []
  depth = [0]

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or depth[0] > 0:
      return next_fun(*args, **kwargs)
    if isinstance(module, nn.Dense):
      kind = 'dense'
    elif _is_conv_module(module):
      kind = 'conv'
      _check_plain_conv(module)
    else:
      return next_fun(*args, **kwargs)
    depth[0] += 1
    try:
      out = next_fun(*args, **kwargs)
    finally:
      depth[0] -= 1
    path = tuple(str(p) for p in module.path)
    try:
      kernel = _get_subtree(params, path)['kernel']
    except (KeyError, TypeError) as e:
      raise ValueError(f'{type(module).__name__} at {"/".join(path)} has no params[...]["kernel"]') from e
    if kind == 'conv':
      x_shape = args[0].shape
      spec = LayerSpec(path, 'conv', tuple(kernel.shape), _pair(module.strides, 'strides'),
                       (int(x_shape[-3]), int(x_shape[-2])))
    else:
      spec = LayerSpec(path, 'dense', tuple(kernel.shape))
    if spec not in records:
      records.append(spec)
    return out

  x = jax.ShapeDtypeStruct(tuple(input_shape), dtype)
  with nn.intercept_methods(interceptor):
    jax.eval_shape(lambda v, xx: fn(v, xx, **apply_kwargs), variables, x)
  if not records:
    raise ValueError('no conv or dense layer was called: is the model a flax.linen model, and is its apply '
                     'function not a cached jax.jit?')
  return tuple(records)


def _group_specs(specs: Sequence[LayerSpec]) -> dict[tuple[Any, ...], list[int]]:
  """Indices of specs that share (kind, kernel shape, operator size, stride): one vmapped computation each."""
  groups: dict[tuple[Any, ...], list[int]] = collections.OrderedDict()
  for i, spec in enumerate(specs):
    groups.setdefault((spec.kind, spec.kernel_shape, spec.operator_hw, spec.stride), []).append(i)
  return groups


def _after(x: jax.Array, dep: PyTree | None) -> jax.Array:
  """``x``, made to wait for ``dep`` through a real data dependency; ``x`` itself if ``dep`` is None.

  Why: on XLA:CPU (jax/jaxlib 0.10.2) a batched LAPACK custom call (``svd``, ``eigh``) splits its batch over the
  intra-op thread pool (``jax::ParallelBatchMap``) and blocks its worker until the pieces are done. Two such calls
  that XLA runs concurrently can park every worker of the pool (both, on a 2-core machine) and the program hangs
  with idle CPUs: seen with the 6 groups of ResNet-56 in one program, native stacks in ``lapack_cgesdd_ffi`` →
  ``BlockingCounter::Wait`` on both workers. Chaining the groups keeps one batched decomposition in flight at a
  time; each still uses every core through its own batch split. ``lax.optimization_barrier`` is not enough: the
  CPU thunk executor orders thunks by the buffers they touch, and a barrier only aliases buffers. So ``x`` gets
  ``+ 0·nan_to_num(one element of dep)``, which XLA does not fold for floats (NaN/Inf semantics) and which leaves
  ``x`` unchanged (``x + -0.0 == x``, ``nan_to_num`` keeps it finite).
  """
  if dep is None:
    return x
  leaf = jax.tree_util.tree_leaves(dep)[0]
  element = jnp.real(leaf.reshape(-1)[0]).astype(jnp.float32)
  tie = jnp.nan_to_num(element) * -0.0
  return x + tie.astype(x.dtype)


def _batched(fn: Callable[[jax.Array], jax.Array], stacked: jax.Array, bytes_per_item: int) -> jax.Array:
  """vmap ``fn`` over the leading axis, in chunks that keep the per-frequency matrices under ``_CHUNK_BYTES``."""
  n = stacked.shape[0]
  per_chunk = max(1, _CHUNK_BYTES // max(bytes_per_item, 1))
  if per_chunk >= n:
    return jax.vmap(fn)(stacked)
  return lax.map(fn, stacked, batch_size=per_chunk)


@functools.lru_cache(maxsize=64)
def _compiled_svs(specs: tuple[LayerSpec, ...]) -> Callable[[PyTree], tuple[jax.Array, ...]]:

  def run(params):
    out: list[jax.Array | None] = [None] * len(specs)
    svs = None
    for key, idx in _group_specs(specs).items():
      stacked = jnp.stack([_get_subtree(params, specs[i].path)['kernel'] for i in idx])
      stacked = _after(stacked, svs)  # one batched SVD in flight at a time (see _after)
      if key[0] == 'dense':
        svs = jax.vmap(lambda w: jnp.linalg.svd(w.astype(jnp.float32), compute_uv=False))(stacked)
      else:
        plan = specs[idx[0]].plan()
        svs = _batched(lambda k, plan=plan: _conv_svs_single(k, plan), stacked, plan.freq_bytes())
      for j, i in enumerate(idx):
        out[i] = svs[j]
    return tuple(out)

  return jax.jit(run)


def layer_singular_values(model: nn.Module | Callable[..., Any], variables: Mapping[str, Any],
                          input_shape: Sequence[int], *, specs: Sequence[LayerSpec] | None = None,
                          **apply_kwargs: Any) -> list[LayerSingularValues]:
  """Singular values of every weight layer of a model, in forward order (one compiled call for all layers).

  Convs are analysed at the spatial size they really see (found by :func:`layer_specs`), strided convs exactly by
  the polyphase decomposition, 1×1 convs as their matrix repeated at every frequency, dense layers as matrices; see
  the module docstring for the conventions.

  Args:
    model: linen ``Module`` or ``apply_fn(variables, x, **apply_kwargs)``.
    variables: the model's variables (``{'params': ..., ...}``).
    input_shape: NHWC shape of an input batch, e.g. ``(1, 32, 32, 3)``.
    specs: precomputed :func:`layer_specs` (skips tracing the model).
    **apply_kwargs: forwarded to the model when tracing it.

  Returns:
    A list of :class:`LayerSingularValues`, in forward order.
  """
  if specs is None:
    specs = layer_specs(model, variables, input_shape, **apply_kwargs)
  specs = tuple(specs)
  svs = jax.device_get(_compiled_svs(specs)(variables['params']))
  return [
      LayerSingularValues(s.name, s.path, s.kind, s.kernel_shape, s.stride, s.input_hw, np.asarray(v), s.exact)
      for s, v in zip(specs, svs)
  ]


def _check_specs(specs: Sequence[LayerSpec]) -> tuple[LayerSpec, ...]:
  seen: dict[tuple[str, ...], LayerSpec] = {}
  for spec in specs:
    if spec.path in seen and seen[spec.path] != spec:
      raise ValueError(f'layer {spec.name} is used at two input sizes ({seen[spec.path].input_hw} and '
                       f'{spec.input_hw}); one kernel cannot be clipped for both operators')
    seen[spec.path] = spec
  return tuple(seen.values())


@functools.lru_cache(maxsize=64)
def _compiled_clip(specs: tuple[LayerSpec, ...], rounds: int) -> Callable[[PyTree, jax.Array], PyTree]:

  def run(params, max_sv):
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    leaves = [leaf for _, leaf in leaves_with_path]
    index = {tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in kp): i
             for i, (kp, _) in enumerate(leaves_with_path)}
    clipped = None
    for key, idx in _group_specs(specs).items():
      leaf_ids = []
      for i in idx:
        spec = specs[i]
        leaf_id = index.get(spec.path + ('kernel',))
        if leaf_id is None:
          raise ValueError(f'params have no kernel at {spec.name}/kernel')
        if tuple(leaves[leaf_id].shape) != spec.kernel_shape:
          raise ValueError(f'{spec.name}/kernel has shape {leaves[leaf_id].shape}, the spec says '
                           f'{spec.kernel_shape}')
        leaf_ids.append(leaf_id)
      stacked = _after(jnp.stack([leaves[j] for j in leaf_ids]), clipped)  # one group at a time (see _after)
      if key[0] == 'dense':
        clipped = jax.vmap(lambda w: _dense_clip_single(w, max_sv))(stacked)
      else:
        plan = specs[idx[0]].plan()
        clipped = _batched(lambda k, plan=plan: _conv_clip_single(k, max_sv, plan, rounds), stacked,
                           plan.freq_bytes())
      for j, leaf_id in enumerate(leaf_ids):
        leaves[leaf_id] = clipped[j]
    return jax.tree_util.tree_unflatten(treedef, leaves)

  return jax.jit(run)


def clip_params(params: PyTree, layer_specs: Sequence[LayerSpec], max_sv: float | jax.Array, *,
                rounds: int = 1) -> PyTree:
  """Clips the singular values of every listed layer at ``max_sv``, all layers in one compiled call.

  Layers that share (kind, kernel shape, input size, stride) are stacked and clipped together with ``vmap``
  (chunked with ``lax.map`` when a group's per-frequency matrices would exceed ~0.5 GiB). Conv kernels get
  :func:`clip_conv_kernel` (``rounds`` rounds, strided ones through their polyphase form), dense kernels and 1×1
  convs an exact matrix clip. The compiled function is cached per (specs, rounds); ``max_sv`` is a traced argument,
  so changing it does not recompile. Kernels not listed in ``layer_specs`` and all other leaves are returned as is.

  Args:
    params: the model's parameters (``variables['params']``); this is the traced argument.
    layer_specs: from :func:`layer_specs` (static).
    max_sv: the clipping threshold ``c``.
    rounds: project-and-clip rounds for conv kernels (see :func:`clip_conv_kernel` on why one is inexact).

  Returns:
    The clipped params, same pytree structure, shapes and dtypes.
  """
  if rounds < 0:
    raise ValueError(f'rounds must be >= 0, got {rounds}')
  specs = _check_specs(layer_specs)
  return _compiled_clip(specs, int(rounds))(params, jnp.asarray(max_sv, jnp.float32))


# ----------------------------------------------------------------------------------------------------------------
# Power iteration (Miyato et al. 2018).
# ----------------------------------------------------------------------------------------------------------------


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  return x / (jnp.linalg.norm(x) + eps)


def power_iteration(w_matrix: jax.Array, u: jax.Array, n_iter: int = 1) -> tuple[jax.Array, jax.Array]:
  """Estimates the largest singular value of ``w_matrix`` (Miyato, Kataoka, Koyama & Yoshida, ICLR 2018, Alg. 1).

  ``n_iter`` rounds of ``v ← Wᵀu/‖Wᵀu‖, u ← Wv/‖Wv‖``; then ``σ = uᵀWv``. ``u`` and ``v`` are treated as
  constants (``stop_gradient``), as in Miyato et al., so ``σ`` is differentiable in ``W`` only.

  Args:
    w_matrix: ``(m, n)`` matrix.
    u: ``(m,)`` current estimate of the top left singular vector (persist it between calls; start random).
    n_iter: power-iteration rounds (Miyato et al. use 1 per training step).

  Returns:
    ``(sigma, u_new)``: the estimate (scalar) and the updated vector.
  """
  chex.assert_rank(w_matrix, 2)
  chex.assert_shape(u, (w_matrix.shape[0],))
  w_const = lax.stop_gradient(w_matrix)

  def body(_, u):
    v = _l2_normalize(w_const.T @ u)
    return _l2_normalize(w_const @ v)

  u = lax.stop_gradient(lax.fori_loop(0, n_iter, body, _l2_normalize(u)))
  v = lax.stop_gradient(_l2_normalize(w_const.T @ u))
  sigma = u @ (w_matrix @ v)
  return sigma, u


def miyato_matrix(kernel: jax.Array) -> jax.Array:
  """The matrix Miyato et al. normalize: a kernel reshaped to ``(out, everything else)``.

  Dense ``(in, out)`` → ``(out, in)``; conv HWIO ``(kh, kw, cin, cout)`` → ``(cout, kh·kw·cin)``. For a conv this
  is **not** the operator: with stride 1 and ``k ≤ n``, ``‖R‖₂ ≤ ‖conv‖₂ ≤ √(kh·kw)·‖R‖₂`` (Parseval and the
  triangle inequality), so Miyato-normalized convs can still amplify by up to ``√(kh·kw)``. Use
  :func:`conv_power_iteration` for the operator norm.
  """
  return kernel.reshape(-1, kernel.shape[-1]).T


def spectral_normalize(kernel: jax.Array, u: jax.Array, *, n_iter: int = 1, target: float = 1.0,
                       only_shrink: bool = False) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Miyato et al. (2018) spectral normalization of a dense or conv kernel by its power-iteration estimate.

  ``kernel · target / σ(miyato_matrix(kernel))`` (or ``kernel · min(1, target/σ)`` with ``only_shrink``). For conv
  kernels this is Miyato's reshaped-matrix normalization, not the operator norm (see :func:`miyato_matrix`).

  Args:
    kernel: ``(in, out)`` dense or ``(kh, kw, cin, cout)`` conv kernel.
    u: ``(out,)`` persistent power-iteration vector.
    n_iter: power-iteration rounds.
    target: the spectral norm to normalize to (1 in Miyato et al.).
    only_shrink: scale down only when ``σ > target``.

  Returns:
    ``(normalized_kernel, u_new, sigma)``.
  """
  if kernel.ndim not in (2, 4):
    raise ValueError(f'expected a dense (in, out) or HWIO conv kernel, got shape {kernel.shape}')
  chex.assert_shape(u, (kernel.shape[-1],))
  sigma, u_new = power_iteration(miyato_matrix(kernel), u, n_iter)
  scale = target / sigma
  if only_shrink:
    scale = jnp.minimum(1.0, scale)
  return kernel * scale, u_new, sigma


def circular_conv(x: jax.Array, kernel: jax.Array, stride: int | Sequence[int] = 1) -> jax.Array:
  """Wrap-around-padded convolution of NHWC ``x`` (same cross-correlation as Flax), output ``ceil(n/s)`` pixels."""
  chex.assert_rank([x, kernel], [4, 4])
  s = _pair(stride, 'stride')
  pads = [(0, 0)]
  for i in range(2):
    n, k = x.shape[1 + i], kernel.shape[i]
    out = -(-n // s[i])
    total = (out - 1) * s[i] + k - n
    lo = max(total, 0) // 2
    pads.append((lo, total - lo))
  pads.append((0, 0))
  xp = jnp.pad(x, pads, mode='wrap')
  return lax.conv_general_dilated(xp, kernel, s, 'VALID', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                  precision=_HIGHEST)


def conv_power_iteration(kernel: jax.Array, x: jax.Array, n_iter: int = 1, *,
                         stride: int | Sequence[int] = 1) -> tuple[jax.Array, jax.Array]:
  """Power iteration on the circular conv operator itself (its norm, not Miyato's reshaped matrix).

  Alternates the convolution and its transpose (``jax.vjp``): ``x ← AᵀA x / ‖AᵀA x‖``; ``σ = ‖A x‖``.

  Args:
    kernel: HWIO kernel.
    x: ``(H, W, cin)`` current estimate of the top right singular vector (persist it; start random).
    n_iter: rounds.
    stride: the conv's stride.

  Returns:
    ``(sigma, x_new)``; ``sigma`` is a lower bound of the operator norm that converges to it.
  """
  chex.assert_rank([kernel, x], [4, 3])
  chex.assert_equal(x.shape[-1], kernel.shape[2])
  k_const = lax.stop_gradient(kernel)
  apply = lambda z: circular_conv(z[None], k_const, stride)[0]

  def body(_, z):
    y, vjp = jax.vjp(apply, z)
    return _l2_normalize(vjp(y)[0])

  x = lax.stop_gradient(lax.fori_loop(0, n_iter, body, _l2_normalize(x)))
  sigma = jnp.linalg.norm(circular_conv(x[None], kernel, stride))
  return sigma, x


# ----------------------------------------------------------------------------------------------------------------
# Summaries.
# ----------------------------------------------------------------------------------------------------------------


def _as_array(svs: LayerSingularValues | np.ndarray | jax.Array) -> np.ndarray:
  if isinstance(svs, LayerSingularValues):
    svs = svs.singular_values
  return np.asarray(svs, np.float64).reshape(-1)


def spectral_complexity(layer_svs: Iterable[LayerSingularValues | np.ndarray | jax.Array]) -> float:
  """Spectral complexity SC(T) = ∏ᵢ ‖Wᵢ‖₂ (paper, Definition 7; Bartlett et al. 2017).

  Overflows (or underflows to 0) easily for deep nets: prefer :func:`log_spectral_complexity`.
  """
  return float(np.exp(log_spectral_complexity(layer_svs)))


def log_spectral_complexity(layer_svs: Iterable[LayerSingularValues | np.ndarray | jax.Array]) -> float:
  """``Σᵢ log ‖Wᵢ‖₂`` (natural log): the log of :func:`spectral_complexity`, safe for deep nets.

  ``-inf`` if a layer is all zeros (e.g. Fixup's zero-initialized branch convs and head before training).
  """
  with np.errstate(divide='ignore'):
    return float(sum(np.log(_as_array(s).max()) for s in layer_svs))


def sv_statistics(svs: LayerSingularValues | np.ndarray | jax.Array) -> dict[str, float | int]:
  """Summary of one layer's spectrum: ``std`` (population, ddof=0), ``mean``, ``min``, ``max``, ``count``.

  The spectra of this module carry their multiplicities, so these are statistics of the operator.
  """
  s = _as_array(svs)
  return {'std': float(s.std()), 'mean': float(s.mean()), 'min': float(s.min()), 'max': float(s.max()),
          'count': int(s.size)}
