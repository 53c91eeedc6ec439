"""Square Attack, L∞ (Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box adversarial
attack via random search", ECCV 2020, Algorithm 1 with the L∞ sampling of Algorithm 2), score-based: it only
evaluates ``logits_fn``, never its gradient.

Per example, minimizing the margin L(x̂) = z_y − max_{i≠y} z_i (negative = misclassified):

* x̂⁽⁰⁾ = clip_[0,1](x + ε·s), s ∈ {−1, 1}^{1×W×C} uniform: vertical stripes (one sign per column and channel);
* query i: a square of side h⁽ⁱ⁾ = clip(round(√(p⁽ⁱ⁾·H·W)), 1, min(H, W)) at a uniform position (per example), with
  one uniform sign ±1 per channel: x_new = clip_[0,1](Π_ε(x̂ + 2ε·sign·1_square)); x̂ ← x_new where L decreased or
  the example is misclassified. Examples already misclassified are no longer updated; the loop stops once all are;
* p⁽ⁱ⁾ = p_init / 2^m, m the number of the thresholds 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 that i
  exceeds, i rescaled to ⌊i/queries · 10000⌋ (the authors' ``resc_schedule``; AutoAttack's standard version turns
  the rescaling off and runs the 10000-query schedule on 5000 queries).

The query loop is one ``lax.while_loop`` with static shapes: square masks are built from iota comparisons.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

from arreg_jax.attacks import noise
from arreg_jax.attacks.losses import margin
from arreg_jax.attacks.pgd import LogitsFn, _check

P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_selection(i, queries: int, p_init: float = 0.8, rescale: bool = True):
  """p⁽ⁱ⁾: the fraction of the image a square covers at query i (0-based), halved at each threshold passed."""
  it = jnp.floor(jnp.asarray(i, jnp.float32) / queries * 10000).astype(jnp.int32) if rescale else i
  m = sum((it > t).astype(jnp.int32) for t in P_THRESHOLDS)
  return p_init / jnp.exp2(m.astype(jnp.float32))


def square_masked(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, active: jax.Array, *,
                  eps, queries: int = 5000, p_init: float = 0.8, rescale: bool = True):
  """:func:`square` on the examples where ``active``; returns (images in float32, fooled (B,) bool)."""
  x0 = images.astype(jnp.float32)
  b, h, w, c = x0.shape
  k0, key = jax.random.split(key)

  def margin_of(x):
    return margin(logits_fn(x.astype(images.dtype)), labels)

  x_best = jnp.clip(x0 + eps * noise.sign(k0, (b, 1, w, c)), 0.0, 1.0)
  m_best = margin_of(x_best)
  # Inactive examples count as already broken: never updated, and they do not keep the loop running.
  m_best = jnp.where(active, m_best, -1.0)
  x_best = jnp.where(active[:, None, None, None], x_best, x0)
  rows = jnp.arange(h)[None, :, None, None]
  cols = jnp.arange(w)[None, None, :, None]

  def cond(s):
    i, _, m, _ = s
    return (i < queries) & jnp.any(m > 0)

  def body(s):
    i, x_b, m_b, l_b = s
    kh, kw, ks = jax.random.split(jax.random.fold_in(key, i), 3)
    p = p_selection(i, queries, p_init, rescale)
    side = jnp.clip(jnp.round(jnp.sqrt(p * h * w)), 1, min(h, w)).astype(jnp.int32)
    vh = jnp.floor(noise.uniform(kh, (b, 1, 1, 1)) * (h - side)).astype(jnp.int32)
    vw = jnp.floor(noise.uniform(kw, (b, 1, 1, 1)) * (w - side)).astype(jnp.int32)
    inside = (rows >= vh) & (rows < vh + side) & (cols >= vw) & (cols < vw + side)
    delta = jnp.where(inside, 2.0 * eps * noise.sign(ks, (b, 1, 1, c)), 0.0)
    x_new = jnp.clip(jnp.clip(x_b + delta, x0 - eps, x0 + eps), 0.0, 1.0)
    m_new = margin_of(x_new)
    todo = m_b > 0
    better = todo & (m_new < l_b)
    l_b = jnp.where(better, m_new, l_b)
    take = better | (todo & (m_new <= 0))
    return (i + 1, jnp.where(take[:, None, None, None], x_new, x_b), jnp.where(take, m_new, m_b), l_b)

  _, x_best, m_best, _ = lax.while_loop(cond, body, (jnp.int32(0), x_best, m_best, m_best))
  return lax.stop_gradient(x_best), active & (m_best <= 0)


def square(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *, eps, queries: int = 5000,
           p_init: float = 0.8, rescale: bool = True) -> jax.Array:
  """Square Attack L∞ (Andriushchenko et al., ECCV 2020) with ``queries`` forward passes at most per example.

  ``eps`` may be a traced scalar; images are NHWC in [0, 1]. Returns images of the input's shape and dtype inside
  the ε-ball: per example the lowest-margin point found (the first misclassified one once the margin is ≤ 0).
  """
  _check(images, labels, 'linf')
  chex.assert_rank(jnp.asarray(eps), 0)
  out, _ = square_masked(logits_fn, images, labels, key, jnp.ones(labels.shape, bool), eps=eps, queries=queries,
                         p_init=p_init, rescale=rescale)
  return out.astype(images.dtype)
