"""Summaries of a per-example distribution (margins, probabilities, losses) with FIXED histogram bin edges.

The paper compares distributions across AR strengths (Fig. 1b, 4, 5a,b): that is only meaningful when every model's
histogram uses the same bins, so the bins are an argument (``edges``), never derived from the data.

Conventions (chosen once, tested in ``tests/test_analysis.py``):

* Bins are ``[e_0, e_1), [e_1, e_2), …, [e_{B−1}, e_B]`` — half-open except the last, which is closed.
* **Out-of-range values are clipped into the end bins**: ``v < e_0`` counts in the first bin, ``v > e_B`` in the
  last, so the counts always sum to the number of (unmasked, non-NaN) values. How many were clipped is reported
  separately (``below`` / ``above``), so a histogram whose end bins are inflated by clipping can be recognized.
* NaN values are excluded from everything and counted in ``nan``.
* ``std`` is the population standard deviation (ddof = 0); ``skewness`` is the population moment coefficient
  ``E[(v − μ)³] / σ³`` (0 when σ = 0); quantiles interpolate linearly between order statistics (numpy's default).
* Every function takes an optional boolean ``mask`` (False = padding, ignored), so it runs on fixed-shape padded
  batches under ``jit``.
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _valid(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  ok = ~jnp.isnan(values)
  return ok if mask is None else ok & mask


def histogram(values: jax.Array, edges: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Counts of ``values`` in the ``B = len(edges) − 1`` fixed bins; out-of-range values clipped into the end bins.

  Args:
    values: ``(N,)`` float.
    edges: ``(B + 1,)`` increasing bin edges.
    mask: optional ``(N,)`` bool; False entries are not counted.

  Returns:
    float32 ``(B,)`` counts summing to the number of valid values.
  """
  chex.assert_rank([values, edges], [1, 1])
  values = values.astype(jnp.float32)
  edges = jnp.asarray(edges, jnp.float32)
  nbins = edges.shape[0] - 1
  idx = jnp.clip(jnp.searchsorted(edges, values, side='right') - 1, 0, nbins - 1)
  weight = _valid(values, mask).astype(jnp.float32)
  return jnp.zeros((nbins,), jnp.float32).at[idx].add(weight)


def masked_quantiles(values: jax.Array, qs: Sequence[float], mask: jax.Array | None = None) -> jax.Array:
  """Quantiles of the valid entries (linear interpolation, as ``np.quantile``); NaN if there are none."""
  chex.assert_rank(values, 1)
  values = values.astype(jnp.float32)
  valid = _valid(values, mask)
  n = jnp.sum(valid)
  s = jnp.sort(jnp.where(valid, values, jnp.inf))
  pos = jnp.asarray(qs, jnp.float32) * jnp.maximum(n - 1, 0).astype(jnp.float32)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(n - 1, 0))
  frac = pos - lo.astype(jnp.float32)
  out = s[lo] * (1.0 - frac) + s[hi] * frac
  out = jnp.where(frac == 0, s[lo], out)  # avoid inf·0 when hi points past the valid values
  return jnp.where(n > 0, out, jnp.nan)


def summarize(values: jax.Array, edges: jax.Array, *, tau: float = 0.0, mask: jax.Array | None = None,
              qs: Sequence[float] = QUANTILES) -> dict[str, jax.Array]:
  """Histogram and moments of one per-example distribution (jit-able; ``tau`` may be traced).

  Returns a dict of arrays: ``counts`` ``(B,)``, ``edges`` ``(B+1,)``, ``n``, ``nan``, ``below``/``above`` (how many
  values fell outside ``[e_0, e_B]`` and were clipped into the end bins), ``mean``, ``std``, ``skewness``, ``min``,
  ``max``, ``quantiles`` ``(len(qs),)`` at ``qs``, ``mode`` (centre of the fullest bin), ``frac_abs_below_tau``
  (fraction with ``|v| < tau``; for margins: how many examples lie within ``tau`` of the decision boundary).
  """
  chex.assert_rank(values, 1)
  values = values.astype(jnp.float32)
  edges = jnp.asarray(edges, jnp.float32)
  valid = _valid(values, mask)
  w = valid.astype(jnp.float32)
  n = jnp.sum(w)
  safe_n = jnp.maximum(n, 1.0)
  v0 = jnp.where(valid, values, 0.0)
  mean = jnp.sum(v0) / safe_n
  centered = jnp.where(valid, values - mean, 0.0)
  var = jnp.sum(centered ** 2) / safe_n
  std = jnp.sqrt(var)
  third = jnp.sum(centered ** 3) / safe_n
  skew = jnp.where(std > 0, third / jnp.maximum(std, 1e-30) ** 3, 0.0)
  counts = histogram(values, edges, valid)
  centres = 0.5 * (edges[1:] + edges[:-1])
  return {
      'counts': counts,
      'edges': edges,
      'n': n,
      'nan': jnp.sum(jnp.isnan(values) & (True if mask is None else mask)).astype(jnp.float32),
      'below': jnp.sum(valid & (values < edges[0])).astype(jnp.float32),
      'above': jnp.sum(valid & (values > edges[-1])).astype(jnp.float32),
      'mean': mean,
      'std': std,
      'skewness': skew,
      'min': jnp.min(jnp.where(valid, values, jnp.inf)),
      'max': jnp.max(jnp.where(valid, values, -jnp.inf)),
      'quantiles': masked_quantiles(values, qs, valid),
      'mode': centres[jnp.argmax(counts)],
      'frac_abs_below_tau': jnp.sum(valid & (jnp.abs(values) < tau)) / safe_n,
  }


_summarize_jit = jax.jit(summarize, static_argnames=('qs',))


def summary_to_json(values: np.ndarray | jax.Array, edges: np.ndarray, *, tau: float = 0.0,
                    qs: Sequence[float] = QUANTILES, pad_to: int | None = None) -> dict:
  """:func:`summarize` on host values, as a JSON-ready dict (lists and floats; quantiles keyed ``q01``, ``q50``…).

  ``pad_to`` pads the values (masked out) to a fixed length, so that summaries of samples of different sizes share
  one compiled program (the sort and scatter of :func:`summarize` take seconds to compile on a CPU).
  """
  v = np.asarray(values, np.float32).reshape(-1)
  n = v.shape[0]
  size = max(n, pad_to or n)
  mask = np.arange(size) < n
  v = np.concatenate([v, np.zeros(size - n, np.float32)])
  s = jax.device_get(_summarize_jit(jnp.asarray(v), jnp.asarray(edges, jnp.float32), tau=jnp.float32(tau),
                                    mask=jnp.asarray(mask), qs=tuple(qs)))
  out = {k: float(v) for k, v in s.items() if np.ndim(v) == 0}
  for k in ('n', 'nan', 'below', 'above'):
    out[k] = int(out[k])
  out['tau'] = float(tau)
  out['counts'] = [int(c) for c in s['counts']]
  out['edges'] = [float(e) for e in s['edges']]
  out['quantiles'] = {f'q{round(100 * q):02d}': float(v) for q, v in zip(qs, s['quantiles'])}
  return out


def uniform_edges(lo: float, hi: float, bins: int) -> np.ndarray:
  """``bins + 1`` equally spaced edges on ``[lo, hi]`` (float32)."""
  if not hi > lo or bins < 1:
    raise ValueError(f'need lo < hi and bins >= 1, got ({lo}, {hi}) and {bins}')
  return np.linspace(lo, hi, bins + 1, dtype=np.float32)
