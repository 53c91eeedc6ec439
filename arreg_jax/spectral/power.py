"""Power-iteration spectral normalization (Miyato et al. 2018), the spectral complexity ∏‖W_l‖₂, and summary
statistics of a layer's spectrum (:mod:`arreg_jax.spectral.model` gives the spectra)."""

from __future__ import annotations

from typing import Iterable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from arreg_jax.spectral.conv import HIGHEST, pair
from arreg_jax.spectral.layer import LayerSingularValues

# ----------------------------------------------------------------------------------------------------------------
# Power iteration (Miyato et al. 2018).
# ----------------------------------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
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
    v = l2_normalize(w_const.T @ u)
    return l2_normalize(w_const @ v)

  u = lax.stop_gradient(lax.fori_loop(0, n_iter, body, l2_normalize(u)))
  v = lax.stop_gradient(l2_normalize(w_const.T @ u))
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
  s = pair(stride, 'stride')
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
                                  precision=HIGHEST)


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
    return l2_normalize(vjp(y)[0])

  x = lax.stop_gradient(lax.fori_loop(0, n_iter, body, l2_normalize(x)))
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
