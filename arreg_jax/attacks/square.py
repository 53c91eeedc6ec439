"""Square Attack, L∞ and L2 (Andriushchenko, Croce, Flammarion, Hein, "Square Attack: a query-efficient black-box
adversarial attack via random search", ECCV 2020, Algorithms 1–3; the authors' ``square.py`` as AutoAttack runs it):
score-based, it only evaluates ``logits_fn``, never its gradient.

Per example, minimizing the margin L(x̂) = z_y − max_{i≠y} z_i (negative = misclassified), with the images NHWC:

* L∞ start: x̂⁽⁰⁾ = clip_[0,1](x + ε·s), s ∈ {−1, 1}^{1×W×C} uniform: vertical stripes;
  query i: a square of side h⁽ⁱ⁾ = clip(round(√(p⁽ⁱ⁾·H·W)), 1, min(H, W)) at a uniform position, with one uniform
  sign per channel: x_new = clip_[0,1](Π_ε(x̂ + 2ε·sign·1_square));
* L2 start: a grid of ⌊H/5⌋-sized windows, each holding the authors' "eta" profile (nested rectangles weighted 1/k²,
  positive on one half and negative on the other, randomly transposed) with a random sign per channel, rescaled to
  ‖δ‖₂ = ε; query i: a window of odd side s⁽ⁱ⁾ ≥ 3 takes a fresh eta profile plus its old content, the perturbation
  mass of a second window is moved into it (so that ‖δ‖₂ stays ε), x_new = clip_[0,1](x + ε·δ/‖δ‖₂);
* x̂ ← x_new where L decreased or the example is misclassified; examples already misclassified are no longer
  updated, and the query loop stops once all are;
* p⁽ⁱ⁾ = p_init / 2^m, m the number of the thresholds 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 that i
  exceeds, i rescaled to ⌊i/queries · 10000⌋ (the authors' ``resc_schedule``; AutoAttack's standard version turns
  the rescaling off and runs the 10000-query schedule on 5000 queries).

The query loop is one ``lax.while_loop`` with static shapes: L∞ squares are masks built from iota comparisons; the
L2 windows, whose side changes with p, are a ``lax.switch`` over the (at most ten) sides of the schedule, each a
dynamic slice of static size. Positions and signs are drawn per example (the authors draw one position per query for
the whole batch), so an example's attack does not depend on the others.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp
from jax import lax

from arreg_jax.attacks import input_checks, noise
from arreg_jax.attacks.compiled import compiled_once
from arreg_jax.attacks.losses import margin
from arreg_jax.attacks.norm_balls import l2_norms
from arreg_jax.attacks.pgd import LogitsFn

P_THRESHOLDS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def _schedule_step(i, queries: int, rescale: bool):
  """m⁽ⁱ⁾: how many thresholds query i (0-based, rescaled to 10000 queries if ``rescale``) has passed."""
  it = jnp.floor(jnp.asarray(i, jnp.float32) / queries * 10000).astype(jnp.int32) if rescale else i
  return sum((it > t).astype(jnp.int32) for t in P_THRESHOLDS)


def p_selection(i, queries: int, p_init: float = 0.8, rescale: bool = True):
  """p⁽ⁱ⁾: the fraction of the image a square covers at query i (0-based), halved at each threshold passed."""
  return p_init / jnp.exp2(_schedule_step(i, queries, rescale).astype(jnp.float32))


def _eta_rectangles(x: int, y: int) -> np.ndarray:
  """The authors' L2 profile on an x×y rectangle: nested rectangles around its centre, the k-th weighted 1/k²."""
  delta = np.zeros((x, y))
  x_c, y_c = x // 2 + 1, y // 2 + 1
  c0, c1 = x_c - 1, y_c - 1
  for k in range(max(x_c, y_c)):
    delta[max(c0, 0):min(c0 + 2 * k + 1, x), max(0, c1):min(c1 + 2 * k + 1, y)] += 1.0 / (k + 1) ** 2
    c0, c1 = c0 - 1, c1 - 1
  return delta / np.sqrt(np.sum(delta ** 2))


def eta_profile(s: int) -> np.ndarray:
  """The authors' ``eta(s)`` (L2): an s×s window, +profile on its top half and −profile on the bottom, unit L2."""
  delta = np.zeros((s, s))
  delta[:s // 2] = _eta_rectangles(s // 2, s)
  delta[s // 2:] = -_eta_rectangles(s - s // 2, s)
  return (delta / np.sqrt(np.sum(delta ** 2))).astype(np.float32)


def _l2_sides(h: int, w: int, c: int, p_init: float) -> tuple[int, ...]:
  """The window side of each schedule step m = 0 … 9 (the authors' max(round(√(p·d/c)), 3), odd, ≤ min(H, W))."""
  sides = []
  for m in range(len(P_THRESHOLDS) + 1):
    s = max(int(round(np.sqrt(p_init / 2 ** m * h * w))), 3)
    s += 1 - s % 2
    sides.append(min(s, min(h, w)))
  return tuple(sides)


def _margin_fn(logits_fn, labels, dtype):
  return lambda x: margin(logits_fn(x.astype(dtype)), labels)


def _search(margin_of, x0, x_best, active, step, queries: int):
  """The query loop shared by both norms: ``step(i, x_best) -> x_new``; keeps x_new where the margin fell or the
  example is misclassified; examples inactive or already misclassified stay as they are."""
  m_best = jnp.where(active, margin_of(x_best), -1.0)  # inactive examples count as broken: never updated
  x_best = jnp.where(active[:, None, None, None], x_best, x0)

  def cond(s):
    i, _, m, _ = s
    return (i < queries) & jnp.any(m > 0)

  def body(s):
    i, x_b, m_b, l_b = s
    x_new = step(i, x_b)
    m_new = margin_of(x_new)
    todo = m_b > 0
    better = todo & (m_new < l_b)
    l_b = jnp.where(better, m_new, l_b)
    take = better | (todo & (m_new <= 0))
    return (i + 1, jnp.where(take[:, None, None, None], x_new, x_b), jnp.where(take, m_new, m_b), l_b)

  _, x_best, m_best, _ = lax.while_loop(cond, body, (jnp.int32(0), x_best, m_best, m_best))
  return lax.stop_gradient(x_best), active & (m_best <= 0)


def _linf_start_and_step(key, x0, eps, queries, p_init, rescale):
  b, h, w, c = x0.shape
  k0, key = jax.random.split(key)
  rows = jnp.arange(h)[None, :, None, None]
  cols = jnp.arange(w)[None, None, :, None]

  def step(i, x_b):
    kh, kw, ks = jax.random.split(jax.random.fold_in(key, i), 3)
    p = p_selection(i, queries, p_init, rescale)
    side = jnp.clip(jnp.round(jnp.sqrt(p * h * w)), 1, min(h, w)).astype(jnp.int32)
    vh = jnp.floor(noise.uniform(kh, (b, 1, 1, 1)) * (h - side)).astype(jnp.int32)
    vw = jnp.floor(noise.uniform(kw, (b, 1, 1, 1)) * (w - side)).astype(jnp.int32)
    inside = (rows >= vh) & (rows < vh + side) & (cols >= vw) & (cols < vw + side)
    delta = jnp.where(inside, 2.0 * eps * noise.sign(ks, (b, 1, 1, c)), 0.0)
    return jnp.clip(jnp.clip(x_b + delta, x0 - eps, x0 + eps), 0.0, 1.0)

  return jnp.clip(x0 + eps * noise.sign(k0, (b, 1, w, c)), 0.0, 1.0), step


def _normalized(delta):
  return delta / (l2_norms(delta) + 1e-12)


def _l2_start(key, x0, eps):
  """The authors' L2 start: eta windows of side ⌊H/5⌋ tiled from the centre, one random sign per window and channel
  (and a random transposition per window), rescaled to ‖δ‖₂ = ε."""
  b, h, w, c = x0.shape
  s = h // 5
  start = (h - s * 5) // 2
  nh, nw = h // s, w // s
  kt, ks = jax.random.split(key)
  base = jnp.asarray(eta_profile(s))
  flip = noise.uniform(kt, (b, nh, nw, 1, 1, 1)) > 0.5
  tiles = jnp.where(flip, base.T[:, :, None], base[:, :, None]) * noise.sign(ks, (b, nh, nw, 1, 1, c))
  grid = jnp.transpose(tiles, (0, 1, 3, 2, 4, 5)).reshape(b, nh * s, nw * s, c)  # (B, nh·s, nw·s, C)
  grid = grid[:, :h - start, :w - start]
  delta = jnp.pad(grid, ((0, 0), (start, h - start - grid.shape[1]), (start, w - start - grid.shape[2]), (0, 0)))
  return jnp.clip(x0 + _normalized(delta) * eps, 0.0, 1.0)


def _l2_window_step(x0, x_b, eps, key, s: int):
  """One L2 query with windows of side ``s`` (static), per example."""
  b, h, w, c = x0.shape
  kh, kw, kh2, kw2, kt, ks = jax.random.split(key, 6)
  pos = lambda k, n: jnp.floor(noise.uniform(k, (b,)) * (n - s)).astype(jnp.int32)
  vh, vw, vh2, vw2 = pos(kh, h), pos(kw, w), pos(kh2, h), pos(kw2, w)
  base = jnp.asarray(eta_profile(s))[:, :, None]
  flip = noise.uniform(kt, (b, 1, 1, 1)) > 0.5
  fresh = jnp.where(flip, jnp.swapaxes(base, 0, 1)[None], base[None]) * noise.sign(ks, (b, 1, 1, c))  # (B,s,s,C)
  rows, cols = jnp.arange(h)[None, :, None, None], jnp.arange(w)[None, None, :, None]
  box = lambda a, b_: (rows >= a[:, None, None, None]) & (rows < a[:, None, None, None] + s) & \
      (cols >= b_[:, None, None, None]) & (cols < b_[:, None, None, None] + s)
  in1, in2 = box(vh, vw), box(vh2, vw2)
  delta = x_b - x0
  window = jax.vmap(lambda d, i, j: lax.dynamic_slice(d, (i, j, 0), (s, s, c)))(delta, vh, vw)
  norm_window = jnp.sqrt(jnp.sum(window ** 2, axis=(1, 2), keepdims=True))  # per channel
  norm_image = l2_norms(delta)
  norm_windows = jnp.sqrt(jnp.sum(jnp.where(in1 | in2, delta, 0.0) ** 2, axis=(1, 2), keepdims=True))
  new = fresh + window / (1e-12 + norm_window)
  new = new / (1e-12 + jnp.sqrt(jnp.sum(new ** 2, axis=(1, 2), keepdims=True))) * jnp.sqrt(
      jnp.maximum(eps ** 2 - norm_image ** 2, 0.0) / c + norm_windows ** 2)
  delta = jnp.where(in2, 0.0, delta)
  delta = jax.vmap(lambda d, n, i, j: lax.dynamic_update_slice(d, n, (i, j, 0)))(delta, new, vh, vw)
  return jnp.clip(x0 + _normalized(delta) * eps, 0.0, 1.0)


def square_masked(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, active: jax.Array, *,
                  eps, norm: str = 'linf', queries: int = 5000, p_init: float = 0.8, rescale: bool = True):
  """:func:`square` on the NHWC ``images`` where ``active``; returns (images in float32, fooled (B,) bool)."""
  x0 = images.astype(jnp.float32)
  margin_of = _margin_fn(logits_fn, labels, images.dtype)
  if norm == 'linf':
    x_start, step = _linf_start_and_step(key, x0, eps, queries, p_init, rescale)
    return _search(margin_of, x0, x_start, active, step, queries)
  _, h, w, c = x0.shape
  if min(h, w) < 5:
    raise ValueError(f'images must be at least 5×5 pixels for the L2 Square Attack, got {h}×{w}')
  k0, key = jax.random.split(key)
  sides = _l2_sides(h, w, c, p_init)
  branches = [lambda x_b, k, s=s: _l2_window_step(x0, x_b, eps, k, s) for s in sides]

  def step(i, x_b):
    return lax.switch(_schedule_step(i, queries, rescale), branches, x_b, jax.random.fold_in(key, i))

  return _search(margin_of, x0, _l2_start(k0, x0, eps), active, step, queries)


def _square(apply_fn, params, images, labels, key, eps, *, norm, queries, p_init, rescale, layout):
  logits_fn = lambda x: apply_fn(params, x)
  if layout == 'NCHW':  # the attack works on NHWC; the model still sees its own layout
    nhwc_logits = lambda x: logits_fn(jnp.transpose(x, (0, 3, 1, 2)))
    out, _ = square_masked(nhwc_logits, jnp.transpose(images, (0, 2, 3, 1)), labels, key,
                           jnp.ones(labels.shape, bool), eps=eps, norm=norm, queries=queries, p_init=p_init,
                           rescale=rescale)
    return jnp.transpose(out, (0, 3, 1, 2)).astype(images.dtype)
  out, _ = square_masked(logits_fn, images, labels, key, jnp.ones(labels.shape, bool), eps=eps, norm=norm,
                         queries=queries, p_init=p_init, rescale=rescale)
  return out.astype(images.dtype)


_square_once = compiled_once(_square, ('apply_fn', 'norm', 'queries', 'p_init', 'rescale', 'layout'))


def square(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *, eps, norm: str = 'linf',
           queries: int = 5000, p_init: float = 0.8, rescale: bool = True, layout: str = 'NHWC') -> jax.Array:
  """Square Attack (Andriushchenko et al., ECCV 2020) with at most ``queries`` forward passes per example.

  Args:
    logits_fn: ``images -> logits (N, K)``, or a model pair with ``apply_fn(params, images)`` and ``params``; only
      evaluated, never differentiated.
    images: float (N, H, W, C) in [0, 1] (``layout='NCHW'``: (N, C, H, W)); H, W ≥ 5 for L2.
    labels: int (N,) true classes in [0, K).
    key: a ``jax.random.key``; example i draws from ``fold_in(·, i)``.
    eps: radius, a scalar in (0, 1] (L∞) or > 0 (L2); may be traced.
    norm: 'linf' or 'l2' (also 'Linf', 'L2').
    queries: the query budget per example (static), 5000 in AutoAttack.
    p_init: the initial fraction of the image a square covers (static).
    rescale: rescale the p schedule to ``queries`` (the paper) or not (AutoAttack's standard version) (static).
    layout: 'NHWC' or 'NCHW', the layout of ``images`` and of ``logits_fn``'s input (the attack reads it to place
      its squares).

  Returns:
    Images of the input's shape, layout and dtype inside the ε-ball and [0, 1]: per example the lowest-margin point
    found (the first misclassified one once the margin is ≤ 0).
  """
  norm, _ = input_checks.check_attack_inputs(logits_fn, images, labels, eps, norm, rank=4)
  layout = input_checks.check_layout(images, layout)
  if jnp.ndim(eps) != 0:
    raise ValueError(f'eps must be a scalar for square, got shape {jnp.shape(eps)}')
  queries = input_checks.static_int(queries, 'queries')
  apply_fn, params = input_checks.split_model(logits_fn)
  return _square_once(apply_fn, params, images, labels, key, eps, norm=norm, queries=queries, p_init=float(p_init),
                      rescale=bool(rescale), layout=layout)
