"""The projection step of FAB: the smallest move, in L∞ or L2, from a point onto a hyperplane within the box.

For rows t ∈ [0, 1]ᵈ, w ∈ ℝᵈ, b ∈ ℝ, :func:`project_linf` and :func:`project_l2` return δ solving

    min ‖δ‖_p   subject to   ⟨w, t + δ⟩ = b,   0 ≤ t + δ ≤ 1

(Croce & Hein, "Minimally distorted adversarial examples with a fast adaptive boundary attack", ICML 2020, §3.1 and
appendix; the authors' ``fab_projections.py``). When the box makes the hyperplane unreachable, δ is the box corner
that moves ⟨w, t + δ⟩ furthest toward b (as theirs). Coordinates with w = 0 do not move.

Both reduce the problem to one scalar λ: after orienting w so that ⟨w, t⟩ ≥ b, every coordinate moves against w by
min(λ, its room to the box) (L∞: δᵢ = −sign(wᵢ)·min(λ, pᵢ)), or by −λwᵢ until it hits the box (L2). The constraint
g(λ) = ⟨w, δ(λ)⟩ is piecewise linear and monotone in λ with breakpoints at the coordinates' box limits. The authors
find the segment holding g(λ*) = b − ⟨w, t⟩ with a per-row binary search; here one sort of the breakpoints, cumulative
sums over them and a masked count of the breakpoints passed give every row's segment at once (static shapes, no
loop), then λ* in closed form on that segment. The result is the authors' up to float rounding
(``tests/test_fab.py`` checks both against a brute-force solver).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _segment(values: jax.Array, target: jax.Array) -> jax.Array:
  """Per row, the last index k ∈ [0, d − 2] with target − values[k] > 0 (0 if none), for ``values`` decreasing along
  the row: the masked count of the breakpoints passed, which is what the authors' binary search converges to."""
  passed = jnp.sum((target[:, None] - values > 0).astype(jnp.int32), axis=1)
  return jnp.clip(passed - 1, 0, values.shape[1] - 2)


def project_linf(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """δ (N, d) of least ‖δ‖∞ with ⟨w, t + δ⟩ = b and t + δ ∈ [0, 1]ᵈ, for rows ``t``, ``w`` (N, d), ``b`` (N,)."""
  t, w, b = t.astype(jnp.float32), w.astype(jnp.float32), b.astype(jnp.float32)
  sign = jnp.where(jnp.sum(w * t, axis=1) - b >= 0, 1.0, -1.0)
  w, b = w * sign[:, None], b * sign
  a = (w < 0).astype(jnp.float32)
  moves = w != 0
  full = (a - t) * moves  # each coordinate at the box face that lowers ⟨w, ·⟩
  room = a - t * (2 * a - 1)  # p: how far each coordinate may move that way
  order = jnp.argsort(-room, axis=1)  # breakpoints, largest room first
  w_sorted = jnp.take_along_axis(w, order, axis=1)
  room_sorted = jnp.take_along_axis(room, order, axis=1)
  need = b - jnp.sum(w * t, axis=1)  # ≤ 0: the change of ⟨w, ·⟩ to reach the hyperplane
  most = jnp.sum(w * full, axis=1)  # the change with every coordinate at its face
  slope = jnp.cumsum(jnp.abs(w_sorted), axis=1)
  offset = jnp.cumsum(-w_sorted * jnp.take_along_axis(full, order, axis=1), axis=1) + most[:, None]
  # g(λ) at each breakpoint λ = room_sorted[k]: the first k + 1 coordinates move by λ, the others by their room.
  at_break = offset - slope * room_sorted
  first = need - (offset[:, -1] - slope[:, -1] * room_sorted[:, -1]) > 0  # λ* below every breakpoint
  inside = (need - most > 0) & ~first  # reachable inside the box, on a later segment
  k = _segment(at_break, need)
  lam_first = jnp.maximum((need - offset[:, -1]) / (-slope[:, -1]), 0.0)
  off_k = jnp.take_along_axis(offset, k[:, None], axis=1)[:, 0]
  slope_k = jnp.take_along_axis(slope, k[:, None], axis=1)[:, 0]
  lam = jnp.maximum((need - off_k) / (-slope_k), 0.0)[:, None]
  delta = jnp.where(first[:, None], (2 * a - 1) * lam_first[:, None], full)
  delta = jnp.where(inside[:, None], jnp.minimum(lam, full) * a + jnp.maximum(-lam, full) * (1 - a), delta)
  return delta * moves


def project_l2(t: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """δ (N, d) of least ‖δ‖₂ with ⟨w, t + δ⟩ = b and t + δ ∈ [0, 1]ᵈ, for rows ``t``, ``w`` (N, d), ``b`` (N,)."""
  t, w, b = t.astype(jnp.float32), w.astype(jnp.float32), b.astype(jnp.float32)
  c = jnp.sum(w * t, axis=1) - b
  sign = jnp.where(c >= 0, 1.0, -1.0)
  w, c = w * sign[:, None], c * sign  # c ≥ 0: the excess of ⟨w, t⟩ over b
  moves = jnp.abs(w) > 1e-8
  # r_i: the λ at which t_i − λ w_i reaches the box (∞ → 1e12 for coordinates that do not move).
  r = jnp.clip(jnp.maximum(t / w, (t - 1) / w), -1e12, 1e12)
  r = jnp.where(moves, r, 1e12)
  r = jnp.where(r == -1e12, 1e12, r)
  order = jnp.argsort(r, axis=1)
  r_sorted = jnp.take_along_axis(r, order, axis=1)
  r_next = jnp.pad(r_sorted[:, 1:], ((0, 0), (0, 1)))
  r_sorted = jnp.where(r_sorted == 1e12, 0.0, r_sorted)
  r_next = jnp.where(r_next == 1e12, 0.0, r_next)
  w2_sorted = jnp.take_along_axis(w * w, order, axis=1)
  w2_total = jnp.sum(w2_sorted, axis=1, keepdims=True)
  w2_free = w2_total - jnp.cumsum(w2_sorted, axis=1)  # Σ w² of the coordinates not yet at the box
  full = -(r * w) * moves  # every coordinate at the box
  # g(λ) = −Σ w_i² min(λ, r_i) at λ = r_sorted[0], r_sorted[1], …
  at_break = jnp.concatenate([-w2_total * r_sorted[:, :1],
                              jnp.cumsum((r_sorted - r_next) * w2_free, axis=1) - w2_total * r_sorted[:, :1]], axis=1)
  before = at_break[:, 0] + c < 0  # the hyperplane is met before any coordinate reaches the box
  beyond = jnp.sum(full * w, axis=1) + c > 0  # not even the box corner reaches it
  inside = ~(before | beyond)
  k = _segment(-at_break[:, :-1], c)  # last k with at_break[k] + c > 0
  s_k = jnp.take_along_axis(at_break, k[:, None], axis=1)[:, 0]
  free_k = jnp.take_along_axis(w2_free, k[:, None], axis=1)[:, 0]
  r_k = jnp.take_along_axis(r_sorted, k[:, None], axis=1)[:, 0]
  lam = jnp.where(free_k == 0, 0.0, (s_k + c) / jnp.where(free_k == 0, 1.0, free_k) + r_k)[:, None]
  at_box = (lam > r).astype(jnp.float32)
  delta = jnp.where(before[:, None], -(c / w2_total[:, 0])[:, None] * w, full)
  delta = jnp.where(inside[:, None], full * at_box - lam * w * (1 - at_box), delta)
  return delta * moves
