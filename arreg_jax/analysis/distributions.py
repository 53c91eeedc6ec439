"""Summaries of a per-example distribution (margins, probabilities, losses) with FIXED histogram bin edges.

The paper compares distributions across AR strengths (Fig. 1b, 4, 5a,b): that is only meaningful when every model's
histogram uses the same bins, so the bins are an argument (``edges``), never derived from the data. The summaries are
computed on the host with numpy (nothing here needs compiling), in float64 from float32 values.

Conventions (chosen once, tested in ``tests/test_analysis.py``):

* Bins are ``[e_0, e_1), [e_1, e_2), …, [e_{B−1}, e_B]`` — half-open except the last, which is closed.
* **Out-of-range values are clipped into the end bins**: ``v < e_0`` counts in the first bin, ``v > e_B`` in the
  last, so the counts always sum to the number of non-NaN values. How many were clipped is reported separately
  (``below`` / ``above``), so a histogram whose end bins are inflated by clipping can be recognized.
* NaN values are excluded from everything and counted in ``nan``.
* ``std`` is the population standard deviation (ddof = 0); ``skewness`` is the population moment coefficient
  ``E[(v − μ)³] / σ³`` (0 when σ = 0); quantiles interpolate linearly between order statistics (numpy's default).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def _values(values) -> np.ndarray:
  return np.asarray(values, np.float32).reshape(-1)


def _edges(edges) -> np.ndarray:
  e = np.asarray(edges, np.float32).reshape(-1)
  if e.size < 2 or not np.all(np.diff(e) > 0):
    raise ValueError(f'edges must be at least two increasing bin edges, got {e.tolist()}')
  return e


def histogram(values, edges) -> np.ndarray:
  """Counts of ``values`` in the ``B = len(edges) − 1`` fixed bins; out-of-range values clipped into the end bins.

  Args:
    values: ``(N,)`` floats (NaN are not counted).
    edges: ``(B + 1,)`` increasing bin edges.

  Returns:
    int64 ``(B,)`` counts summing to the number of non-NaN values.
  """
  v, e = _values(values), _edges(edges)
  v = v[~np.isnan(v)]
  idx = np.clip(np.searchsorted(e, v, side='right') - 1, 0, e.size - 2)
  return np.bincount(idx, minlength=e.size - 1)


def summarize(values, edges, *, tau: float = 0.0, qs: Sequence[float] = QUANTILES) -> dict:
  """Histogram and moments of one per-example distribution, JSON-ready (lists, floats and ints).

  Args:
    values: ``(N,)`` floats.
    edges: ``(B + 1,)`` increasing bin edges (see the module docstring for the bins' conventions).
    tau: the half-width of the band around 0 counted by ``frac_abs_below_tau`` (for margins: how many examples lie
      within ``tau`` of the decision boundary).
    qs: the quantiles to report, in [0, 1].

  Returns:
    ``counts`` (B ints), ``edges``, ``n``, ``nan``, ``below`` / ``above`` (values outside ``[e_0, e_B]``, clipped
    into the end bins), ``mean``, ``std``, ``skewness``, ``min``, ``max``, ``quantiles`` (``{'q01': …, 'q50': …}``),
    ``mode`` (centre of the fullest bin), ``frac_abs_below_tau``, ``tau``. With no valid value the moments are NaN.
  """
  v, e = _values(values), _edges(edges)
  nan = np.isnan(v)
  valid = v[~nan].astype(np.float64)
  n = valid.size
  counts = histogram(v, e)
  centres = np.float32(0.5) * (e[1:] + e[:-1])
  out = {'counts': [int(c) for c in counts], 'edges': [float(x) for x in e], 'n': int(n), 'nan': int(nan.sum()),
         'below': int(np.sum(valid < e[0])), 'above': int(np.sum(valid > e[-1])), 'tau': float(tau),
         'mode': float(centres[int(np.argmax(counts))])}
  if n == 0:
    return {**out, 'mean': float('nan'), 'std': float('nan'), 'skewness': float('nan'), 'min': float('nan'),
            'max': float('nan'), 'frac_abs_below_tau': float('nan'),
            'quantiles': {f'q{round(100 * q):02d}': float('nan') for q in qs}}
  mean = valid.mean()
  centered = valid - mean
  std = np.sqrt(np.mean(centered ** 2))
  skew = np.mean(centered ** 3) / std ** 3 if std > 0 else 0.0
  quantiles = np.quantile(valid, qs)
  return {**out, 'mean': float(mean), 'std': float(std), 'skewness': float(skew), 'min': float(valid.min()),
          'max': float(valid.max()), 'frac_abs_below_tau': float(np.mean(np.abs(valid) < tau)),
          'quantiles': {f'q{round(100 * q):02d}': float(x) for q, x in zip(qs, quantiles)}}


def uniform_edges(lo: float, hi: float, bins: int) -> np.ndarray:
  """``bins + 1`` equally spaced edges on ``[lo, hi]`` (float32)."""
  if not hi > lo or bins < 1:
    raise ValueError(f'need lo < hi and bins >= 1, got ({lo}, {hi}) and {bins}')
  return np.linspace(lo, hi, bins + 1, dtype=np.float32)
