"""Untargeted white-box attacks as pure functions of ``(logits_fn, images, labels, key)``.

* :func:`pgd` — projected gradient descent (Madry et al. 2018), L∞ or L2, optional uniform random start; the
  attack used for adversarial training at AR strength s (SPEC §1: ε = s/255, 10 steps of 2/255) and for the PGD
  accuracy of SPEC §5.
* :func:`fgsm` — the fast gradient sign method (Goodfellow et al. 2015), with an optional random start (Wong et al.
  2020), used by appendix B.6's FGSM adversarial training.

Every step ascends the gradient of the **batch-summed** cross-entropy, so each example's step is independent of the
batch size and of the other examples (for models without batch statistics); perturbations are always projected
around the clean input and clipped to the image domain [0, 1]; L2 norms are per example. The step loop is a
``lax.fori_loop`` inside whatever program calls the attack (the training step, the evaluation step); it is fast on
XLA:CPU because every convolution of the models carries an explicit VJP (``arreg_jax.models.layers``).
The result is under ``stop_gradient``: gradients never flow through the attack into the parameters.
"""

from __future__ import annotations

from typing import Callable

import chex
import jax
import jax.numpy as jnp
from jax import lax

from arreg_jax.attacks import input_checks
from arreg_jax.attacks.compiled import compiled_once
from arreg_jax.attacks.losses import cross_entropy
from arreg_jax.attacks.norm_balls import ascent_direction, l2_norms, project_delta

LogitsFn = Callable[[jax.Array], jax.Array]


def cross_entropy_sum(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Σ_i CE(f(x_i), y_i) over the batch, in float32."""
  return jnp.sum(cross_entropy(logits_fn(images).astype(jnp.float32), labels))


def pgd_random_start(key: jax.Array, shape, eps, norm: str = 'linf') -> jax.Array:
  """The random start δ⁰ that :func:`pgd` draws from ``key`` for images of ``shape``: uniform in the ``norm`` ball
  of radius ``eps`` (before clipping x + δ⁰ to [0, 1]). Drawn once for a whole batch, it lets the batch be attacked
  in chunks (``pgd(..., init_delta=chunk of δ⁰)``) with exactly the starting points of one attack on the batch."""
  if norm == 'linf':
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) * eps
  # Uniform in the L2 ball: a Gaussian direction scaled by eps · U^(1/d).
  k1, k2 = jax.random.split(key)
  direction = jax.random.normal(k1, shape, jnp.float32)
  direction = direction / jnp.maximum(l2_norms(direction), 1e-12)
  d = 1
  for s in shape[1:]:
    d *= s
  radius = jax.random.uniform(k2, (shape[0],) + (1,) * (len(shape) - 1)) ** (1.0 / d)
  return direction * radius * eps


def _pgd(apply_fn, params, images, labels, key, eps, step_size, init_delta, *, steps, norm, random_start, loss_fn):
  logits_fn = lambda x: apply_fn(params, x)
  x0 = images.astype(jnp.float32)
  grad_fn = jax.grad(lambda x: loss_fn(logits_fn, x.astype(images.dtype), labels))
  if init_delta is not None:
    chex.assert_equal_shape([init_delta, x0])
    delta = init_delta.astype(jnp.float32)
  else:
    delta = pgd_random_start(key, x0.shape, eps, norm) if random_start else jnp.zeros_like(x0)
  delta = jnp.clip(x0 + delta, 0.0, 1.0) - x0

  def body(_, delta):
    g = grad_fn(x0 + delta).astype(jnp.float32)
    delta = project_delta(delta + step_size * ascent_direction(g, norm), eps, norm)
    return jnp.clip(x0 + delta, 0.0, 1.0) - x0

  delta = lax.fori_loop(0, steps, body, delta)
  return lax.stop_gradient((x0 + delta).astype(images.dtype))


_pgd_once = compiled_once(_pgd, ('apply_fn', 'steps', 'norm', 'random_start', 'loss_fn'))


def pgd(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array | None, *, eps, step_size,
        steps: int, norm: str = 'linf', random_start: bool = True,
        loss_fn: Callable[[LogitsFn, jax.Array, jax.Array], jax.Array] = cross_entropy_sum,
        init_delta: jax.Array | None = None) -> jax.Array:
  """Projected gradient ascent on ``loss_fn`` inside the ``norm`` ball of radius ``eps`` around ``images``.

  x⁰ = x (+ uniform noise in the ball if ``random_start``), then ``steps`` times
  xᵗ⁺¹ = clip_[0,1]( x + Π_ε( xᵗ + α·d(∇ₓ L(xᵗ)) − x ) ),  d = sign (L∞) or g/‖g‖₂ per example (L2)
  (Madry et al. 2018; :mod:`arreg_jax.attacks.norm_balls`).

  Args:
    logits_fn: ``images -> logits (N, K)``, or a model pair with ``apply_fn(params, images)`` and ``params``
      (then the parameters are a traced argument: new weights reuse the compiled program).
    images: float (N, ...) in [0, 1] (any layout ``logits_fn`` reads; our models take NHWC).
    labels: int (N,) true classes in [0, K).
    key: a ``jax.random.key`` for the random start (None when ``random_start=False`` or ``init_delta`` is given).
    eps: radius of the ball: in (0, 1] for L∞, > 0 for L2; a scalar or per example ``(N, 1, …)``; may be traced.
    step_size: α, in the units of ``eps`` (may be traced).
    steps: number of steps, a Python int (static).
    norm: 'linf' or 'l2' (also 'Linf', 'L2').
    random_start: start from a uniform draw in the ball (:func:`pgd_random_start`).
    loss_fn: ``loss_fn(logits_fn, images, labels) -> scalar`` to ascend; default the batch-summed cross-entropy.
    init_delta: the starting perturbation (images' shape) instead of a draw from ``key``.

  Returns:
    Adversarial images with the input's shape and dtype, inside the ball and [0, 1]; under ``stop_gradient``.
  """
  norm, _ = input_checks.check_attack_inputs(logits_fn, images, labels, eps, norm)
  steps = input_checks.static_int(steps, 'steps', minimum=0)
  apply_fn, params = input_checks.split_model(logits_fn)
  return _pgd_once(apply_fn, params, images, labels, key, eps, step_size, init_delta, steps=steps, norm=norm,
                   random_start=bool(random_start), loss_fn=loss_fn)


def fgsm(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array | None, *, eps,
         random_start: bool = False, step_size=None, norm: str = 'linf') -> jax.Array:
  """One signed-gradient step: x' = clip_[0,1](x + Π_ε(δ₀ + α·sign(∇ₓ L(x + δ₀)))).

  Without a random start δ₀ = 0 and α = ε (Goodfellow et al.); with one, δ₀ ~ U(−ε, ε) and α defaults to 1.25 ε
  (Wong, Rice, Kolter 2020). Arguments as :func:`pgd`.
  """
  if step_size is None:
    step_size = 1.25 * eps if random_start else eps
  return pgd(logits_fn, images, labels, key, eps=eps, step_size=step_size, steps=1, norm=norm,
             random_start=random_start)
