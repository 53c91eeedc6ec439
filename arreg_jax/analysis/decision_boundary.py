"""Instance-space margins: the L2 distance from an example to the decision boundary (Definition 6, Theorem 3.1).

Theorem 3.1 lower-bounds the margin of every example near the training set by ``u_min``, whose last factor
``v_min`` is the **smallest instance-space margin** (IM): the smallest L2 distance ``v(x)`` from a point near a
training example to the decision boundary (Definition 6). ``v(x)`` cannot be computed exactly for a deep ReLU net;
any adversarial example ``x'`` (a point classified differently from ``x``) certifies ``v(x) ≤ ‖x' − x‖₂``.

**Estimator used here: per-example bisection on the radius of an L2 PGD attack, then a line search.**

1. *Screening* (cheap, all analyzed training examples): the first-order (linearized, DeepFool-style one-step)
   distance to the boundary between the predicted class ``ŷ`` and the runner-up,
   ``d̂(x) = M(f(x), ŷ) / ‖∇ₓ M(f(x), ŷ)‖₂`` — one forward-backward pass per example.
2. *Refinement* (the ``k`` examples with the smallest ``d̂``): bisection on the radius ``r`` in ``[0, r_max]``; at
   each radius an L2 PGD attack (no random start, ``steps`` normalized-gradient steps of ``2.5 r / steps``, Madry et
   al.) maximizes ``−M(f(x'), ŷ)`` inside the ball; if it flips the prediction the upper end moves to ``r``, else
   the lower end. Every adversarial point found is kept, and at the end a forward-only line search on
   ``x + t (x_adv − x)``, ``t ∈ [0, 1]``, moves the best one back to the boundary crossing along its direction.
   The result ``v̂(x) = ‖t*·(x_adv − x)‖₂`` is an **upper bound** on ``v(x)`` backed by an actual adversarial point
   (``+inf`` where no attack succeeded even at ``r_max``).

Why this and not DeepFool: DeepFool needs the gradient of every class-logit difference at each iteration (``L``
backward passes for ``L`` = 10…200 classes), while one PGD step costs one backward pass whatever ``L`` is; the
bisection measures exactly "the smallest L2 radius in which a first-order adversary flips the decision", reusing
the attack the models were trained against; and the certified upper bound never silently underestimates ``v``.
Caveats, said in every report: ``v̂_min = min_x v̂(x)`` over the refined subset is an upper bound on the minimum over
all training examples, which in turn upper-bounds Definition 6's ``v_min`` (a minimum over whole covering balls
around them); the screening can miss the true minimizer.

Labels are the model's predictions ``ŷ`` (robustness is w.r.t. the predicted class, Definition 2), so misclassified
training examples are handled like the others. :func:`first_order_distance` and :func:`bisect_boundary_distance` are
the pure batch kernels; :func:`boundary_distances` runs the whole estimator over a dataset for ``apply_fn(params, x)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from arreg_jax import attacks, sharding
from arreg_jax.analysis import inputs
from arreg_jax.attacks import losses


def _margin_loss_sum(logits_fn, x, labels):
  """Σ −M(f(x), y): ascending it pushes each example towards (and across) its decision boundary."""
  return -jnp.sum(losses.margin(logits_fn(x), labels))


def _norms(x: jax.Array) -> jax.Array:
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=tuple(range(1, x.ndim))))


def first_order_distance(logits_fn, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``d̂(x) = M(f(x), ŷ) / ‖∇ₓ M(f(x), ŷ)‖₂`` and ``ŷ`` (the screening step of the module docstring)."""
  chex.assert_rank(images, 4)
  x = images.astype(jnp.float32)
  pred = jnp.argmax(logits_fn(x), axis=-1)
  m_fn = lambda z: losses.margin(logits_fn(z), pred)
  m, vjp = jax.vjp(m_fn, x)
  (g,) = vjp(jnp.ones_like(m))  # rows are independent: the VJP with ones gives every example's own gradient
  return m / jnp.maximum(_norms(g), 1e-12), pred


def bisect_boundary_distance(logits_fn, images: jax.Array, labels: jax.Array, *, r_max: float, rounds: int,
                             steps: int, line_search: int = 10) -> dict[str, jax.Array]:
  """Per-example bisection on the radius of an L2 PGD attack, then a line search (see the module docstring).

  Args:
    logits_fn: images in [0, 1] -> logits.
    images: float ``(B, H, W, C)``.
    labels: the class whose boundary is measured, ``(B,)`` (pass the predictions ŷ).
    r_max: initial upper end of the bracket (e.g. √d, the L2 diameter of [0, 1]^d).
    rounds: bisection rounds (the bracket shrinks by 2^rounds); steps: PGD steps per round.
    line_search: forward-only bisection steps on ``t`` along the best adversarial direction.

  Returns:
    ``distance``: ``(B,)`` certified upper bound on the distance to the boundary (+inf if never crossed);
    ``bracket_lo`` / ``bracket_hi``: the final bisection bracket (``lo`` is where PGD last failed, a heuristic lower
    estimate); ``found``: bool, an adversarial point was found.
  """
  chex.assert_rank([images, labels], [4, 1])
  x0 = images.astype(jnp.float32)
  b = x0.shape[0]
  bshape = (b,) + (1,) * (x0.ndim - 1)

  def flipped(x):
    return jnp.argmax(logits_fn(x), axis=-1) != labels

  def body(_, carry):
    lo, hi, best_norm, best_delta = carry
    r = 0.5 * (lo + hi)
    x_adv = attacks.pgd(logits_fn, x0, labels, None, eps=r.reshape(bshape), step_size=(2.5 * r / steps).reshape(bshape),
                        steps=steps, norm='l2', random_start=False, loss_fn=_margin_loss_sum)
    ok = flipped(x_adv)
    delta = x_adv - x0
    norm = _norms(delta)
    better = ok & (norm < best_norm)
    best_norm = jnp.where(better, norm, best_norm)
    best_delta = jnp.where(better.reshape(bshape), delta, best_delta)
    hi = jnp.where(ok, r, hi)
    lo = jnp.where(ok, lo, r)
    return lo, hi, best_norm, best_delta

  init = (jnp.zeros((b,)), jnp.full((b,), r_max, jnp.float32), jnp.full((b,), jnp.inf), jnp.zeros_like(x0))
  lo, hi, best_norm, best_delta = lax.fori_loop(0, rounds, body, init)
  found = jnp.isfinite(best_norm)

  # Line search on t in [t_lo, t_hi]: x0 + t_hi·δ is adversarial (t_hi = 1 for every found δ).
  def ls_body(_, carry):
    t_lo, t_hi = carry
    t = 0.5 * (t_lo + t_hi)
    ok = flipped(x0 + t.reshape(bshape) * best_delta)
    return jnp.where(ok, t_lo, t), jnp.where(ok, t, t_hi)

  _, t_hi = lax.fori_loop(0, line_search, ls_body, (jnp.zeros((b,)), jnp.ones((b,))))
  distance = jnp.where(found, t_hi * best_norm, jnp.inf)
  return {'distance': lax.stop_gradient(distance), 'bracket_lo': lo, 'bracket_hi': hi, 'found': found}


@functools.partial(jax.jit, static_argnums=(0, 1))
def _screen_batch(apply_fn, preprocess, params, images, labels, mask):
  del labels, mask
  x = images if preprocess is None else preprocess(images)
  d, pred = first_order_distance(lambda z: apply_fn(params, z), x)
  return {'first_order': d, 'pred': pred.astype(jnp.int32)}


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _bisection_batch(apply_fn, preprocess, r_max, rounds, steps, params, images, labels, mask):
  del mask
  x = images if preprocess is None else preprocess(images)
  return bisect_boundary_distance(lambda z: apply_fn(params, z), x, labels, r_max=r_max, rounds=rounds, steps=steps)


def boundary_distances(apply_fn: Callable[[Any, jax.Array], jax.Array], params: Any, images: Any, *,
                       screen: int | None = None, refine: int = 64, rounds: int = 12, steps: int = 20,
                       r_max: float | None = None, batch_size: int = 128, mesh: jax.sharding.Mesh | None = None,
                       preprocess: Callable[[jax.Array], jax.Array] | None = None) -> dict[str, Any]:
  """v_min of Theorem 3.1: the smallest L2 distance to the decision boundary over ``images`` (module docstring).

  The first ``screen`` images are screened by their first-order distance d̂; the ``refine`` with the smallest d̂
  are refined by bisection on the radius of an L2 PGD attack (one compiled batch), then a line search.

  Args:
    apply_fn: ``apply_fn(params, x) -> logits (N, K)``; the boundary is that of its predicted class ŷ.
    params: the pytree ``apply_fn`` takes.
    images: ``(N, ...)`` float images in [0, 1] with 4 dimensions (training examples, for the bound).
    screen: how many of the first images to screen (default: all).
    refine: how many of them to refine.
    rounds: bisection rounds; steps: PGD steps per round.
    r_max: the bracket's upper end (default √d, the L2 diameter of [0, 1]^d for the model's input size d).
    batch_size: screening batch; mesh, preprocess: as :func:`arreg_jax.analysis.margins.confidence`.

  Returns:
    ``v_min`` (float; +inf when no refined example was flipped within ``r_max``), ``distance`` ``(k,)`` certified
    upper bounds of the refined examples, ``found`` ``(k,)`` bool, ``refined_indices`` ``(k,)``, ``first_order``
    ``(n,)`` d̂ and ``pred`` ``(n,)`` ŷ of the screened ones, ``r_max``.
  """
  inputs.check_model_inputs(apply_fn, params, images, preprocess=preprocess, limit=screen)
  for name, v in (('refine', refine), ('rounds', rounds), ('steps', steps)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise ValueError(f'{name} must be an int >= 1, got {v!r}')
  mesh = mesh or sharding.make_mesh()
  n = min(int(screen), images.shape[0]) if screen is not None else images.shape[0]
  dummy = np.zeros((images.shape[0],), np.int32)
  out = sharding.map_batches(functools.partial(_screen_batch, apply_fn, preprocess), params, images, dummy,
                             batch_size=batch_size, mesh=mesh, limit=n)
  k = min(int(refine), n)
  order = np.argsort(out['first_order'], kind='stable')[:k]
  if r_max is None:
    x_shape = jax.eval_shape(preprocess or (lambda x: x), jax.ShapeDtypeStruct((1, *images.shape[1:]),
                                                                               images.dtype)).shape
    r_max = math.sqrt(math.prod(x_shape[1:]))
  kernel = functools.partial(_bisection_batch, apply_fn, preprocess, float(r_max), int(rounds), int(steps))
  res = sharding.map_batches(kernel, params, images[order], out['pred'][order],
                             batch_size=-(-k // mesh.size) * mesh.size, mesh=mesh)
  found = res['found']
  return {'v_min': float(res['distance'].min()) if found.any() else float('inf'), 'distance': res['distance'],
          'found': found, 'refined_indices': order, 'first_order': out['first_order'], 'pred': out['pred'],
          'r_max': float(r_max)}
