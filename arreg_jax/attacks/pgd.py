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
import optax

LogitsFn = Callable[[jax.Array], jax.Array]
_NORMS = ('linf', 'l2')


def cross_entropy_sum(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array) -> jax.Array:
  """Σ_i CE(f(x_i), y_i) over the batch, in float32."""
  logits = logits_fn(images).astype(jnp.float32)
  return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def _per_example_norm(x: jax.Array) -> jax.Array:
  """‖x_i‖₂ for each example, shaped to broadcast against x."""
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)), keepdims=True))


def _project(delta: jax.Array, eps, norm: str) -> jax.Array:
  if norm == 'linf':
    return jnp.clip(delta, -eps, eps)
  n = _per_example_norm(delta)
  return delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))


def _ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  if norm == 'linf':
    return jnp.sign(grad)
  return grad / jnp.maximum(_per_example_norm(grad), 1e-12)


def random_start_delta(key: jax.Array, shape, eps, norm: str = 'linf') -> jax.Array:
  """The random start δ⁰ that :func:`pgd` draws from ``key`` for images of ``shape``: uniform in the ``norm`` ball
  of radius ``eps`` (before clipping x + δ⁰ to [0, 1]). Drawn once for a whole batch, it lets the batch be attacked
  in chunks (``pgd(..., init_delta=chunk of δ⁰)``) with exactly the starting points of one attack on the batch."""
  if norm == 'linf':
    return jax.random.uniform(key, shape, jnp.float32, -1.0, 1.0) * eps
  # Uniform in the L2 ball: a Gaussian direction scaled by eps · U^(1/d).
  k1, k2 = jax.random.split(key)
  direction = jax.random.normal(k1, shape, jnp.float32)
  direction = direction / jnp.maximum(_per_example_norm(direction), 1e-12)
  d = 1
  for s in shape[1:]:
    d *= s
  radius = jax.random.uniform(k2, (shape[0],) + (1,) * (len(shape) - 1)) ** (1.0 / d)
  return direction * radius * eps


def _check(images, labels, norm):
  chex.assert_rank(images, 4)
  chex.assert_rank(labels, 1)
  chex.assert_equal_shape_prefix([images, labels], 1)
  chex.assert_type(labels, int)
  if norm not in _NORMS:
    raise ValueError(f'unknown attack norm {norm!r}; choose one of {_NORMS}')


def pgd(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *, eps, step_size, steps: int,
        norm: str = 'linf', random_start: bool = True,
        loss_fn: Callable[[LogitsFn, jax.Array, jax.Array], jax.Array] = cross_entropy_sum,
        init_delta: jax.Array | None = None) -> jax.Array:
  """Projected gradient ascent on ``loss_fn`` inside the ``norm`` ball of radius ``eps`` around ``images``.

  x⁰ = x (+ uniform noise in the ball if ``random_start``), then ``steps`` times
  xᵗ⁺¹ = clip_[0,1]( x + Π_ε( xᵗ + α·d(∇ₓ L(xᵗ)) − x ) ),  d = sign (L∞) or g/‖g‖₂ per example (L2).
  ``eps`` and ``step_size`` may be traced scalars (e.g. an ε ramp); ``steps`` and ``norm`` are static.
  ``init_delta`` (images' shape), when given, is the starting perturbation instead of a draw from ``key`` (see
  :func:`random_start_delta`). Returns adversarial images with the input's shape and dtype.
  """
  _check(images, labels, norm)
  x0 = images.astype(jnp.float32)
  grad_fn = jax.grad(lambda x: loss_fn(logits_fn, x.astype(images.dtype), labels))
  if init_delta is not None:
    chex.assert_equal_shape([init_delta, x0])
    delta = init_delta.astype(jnp.float32)
  else:
    delta = random_start_delta(key, x0.shape, eps, norm) if random_start else jnp.zeros_like(x0)
  delta = jnp.clip(x0 + delta, 0.0, 1.0) - x0

  def body(_, delta):
    g = grad_fn(x0 + delta).astype(jnp.float32)
    delta = _project(delta + step_size * _ascent_direction(g, norm), eps, norm)
    return jnp.clip(x0 + delta, 0.0, 1.0) - x0

  delta = lax.fori_loop(0, steps, body, delta)
  return lax.stop_gradient((x0 + delta).astype(images.dtype))


def fgsm(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *, eps,
         random_start: bool = False, step_size=None, norm: str = 'linf') -> jax.Array:
  """One signed-gradient step: x' = clip_[0,1](x + Π_ε(δ₀ + α·sign(∇ₓ L(x + δ₀)))).

  Without a random start δ₀ = 0 and α = ε (Goodfellow et al.); with one, δ₀ ~ U(−ε, ε) and α defaults to 1.25 ε
  (Wong, Rice, Kolter 2020).
  """
  if step_size is None:
    step_size = 1.25 * eps if random_start else eps
  return pgd(logits_fn, images, labels, key, eps=eps, step_size=step_size, steps=1, norm=norm,
             random_start=random_start)
