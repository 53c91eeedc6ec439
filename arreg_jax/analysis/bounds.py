"""The terms of the generalization bound of Theorem 3.1 (eq. 4–5), evaluated on a trained network.

Theorem 3.1: for an ε₀-adversarially robust ReLU/max-pool network T with L weight layers, an ε-cover (ε ≤ ε₀) of a
k-dimensional instance space with covering number (C_X/ε)^k, and m training examples, with probability ≥ 1 − η

    GE(l_γ ∘ T) ≤ max{0, 1 − u_min/γ} + sqrt( 2 log(2) C_X^k / (ε^k m) + 2 log(1/η) / m ),          (4)

    u_min = min_{y ≠ ŷ} ‖w_y − w_ŷ‖₂ · ∏_{i=1}^{L−1} σ_min(W_i) · v_min,                              (5)

where w_y are the rows of the last layer's weight matrix W_L (the columns of a Flax ``Dense`` kernel, which is
stored ``(in, out)``; the bias plays no part in eq. 5), σ_min(W_i) the smallest singular value of layer i (for a
convolution: of the operator, :mod:`arreg_jax.spectral`), and v_min the smallest instance-space margin
(:mod:`arreg_jax.analysis.boundary`).

Products of many σ's over- or underflow, so everything is also returned in log space (natural log). A layer with a
zero singular value (e.g. a stride-2 1×1 convolution with more outputs than inputs has structural zeros) makes
``u_min = 0`` exactly: then the margin term is 1 whatever γ is. The covering term is astronomically large for any
realistic k (the paper notes the bound is a worst-case guide, not a tight estimate, §3 footnote 3): it is reported
through its log10.
"""

from __future__ import annotations

import math
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np


@jax.jit
def min_class_weight_distance(w_last: jax.Array) -> jax.Array:
  """``min_{y≠ŷ} ‖w_y − w_ŷ‖₂`` for a Flax ``(in, out)`` last-layer kernel (w_y = column y)."""
  chex.assert_rank(w_last, 2)
  w = jnp.asarray(w_last, jnp.float32).T  # (classes, in): row y is w_y
  # Row by row (exact differences, no Gram-matrix cancellation; memory classes × in per row).
  d2 = jax.lax.map(lambda wy: jnp.sum(jnp.square(w - wy), axis=-1), w)
  d2 = jnp.where(jnp.eye(w.shape[0], dtype=bool), jnp.inf, d2)
  return jnp.sqrt(jnp.min(d2))


def log_u_min(w_distance: float, sigma_mins: Sequence[float], v_min: float) -> float:
  """``log u_min = log min‖w_y − w_ŷ‖ + Σ_{i<L} log σ_min(W_i) + log v_min`` (eq. 5); −inf if a factor is 0."""
  with np.errstate(divide='ignore'):
    terms = [np.log(float(w_distance)), float(np.sum(np.log(np.asarray(sigma_mins, np.float64)))),
             np.log(float(v_min))]
  return float(sum(terms))


def generalization_bound(log_u: float, *, gamma: float, c_x: float, k: float, eps: float, eta: float,
                         m: int) -> dict[str, float]:
  """The right-hand side of eq. (4) for ``u_min = exp(log_u)``.

  Returns ``margin_term = max{0, 1 − u_min/γ}``, ``log10_covering_term`` (log10 of the square root),
  ``covering_term`` (inf when it overflows a float) and ``bound`` = their sum.
  """
  if gamma <= 0 or c_x <= 0 or eps <= 0 or not 0 < eta < 1 or m < 1:
    raise ValueError(f'need γ, C_X, ε > 0, 0 < η < 1, m ≥ 1; got γ={gamma}, C_X={c_x}, ε={eps}, η={eta}, m={m}')
  u = math.exp(log_u) if log_u < 700 else math.inf
  margin_term = max(0.0, 1.0 - u / gamma)
  a = math.log(2 * math.log(2)) + k * (math.log(c_x) - math.log(eps)) - math.log(m)
  b = math.log(2 * math.log(1 / eta)) - math.log(m)
  log_sq = float(np.logaddexp(a, b))  # log of the expression under the square root
  log10_cov = 0.5 * log_sq / math.log(10)
  cov = math.exp(0.5 * log_sq) if 0.5 * log_sq < 700 else math.inf
  return {'u_min': u, 'gamma': gamma, 'margin_term': margin_term, 'covering_term': cov,
          'log10_covering_term': log10_cov, 'bound': margin_term + cov, 'c_x': c_x, 'k': k, 'eps': eps,
          'eta': eta, 'm': int(m)}
