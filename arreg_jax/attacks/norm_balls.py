"""The geometry every attack shares: per-example L∞/L2 norms, the projection onto the ε-ball around the clean input
intersected with the image box [0, 1]ᵈ, and the steepest-ascent direction of each norm.

Written once here and used by PGD/FGSM (:mod:`.pgd`), APGD (:mod:`.apgd`), FAB (:mod:`.fab`) and Square
(:mod:`.square`). For a perturbation δ of an image x₀ (norms per example, over all of its pixels):

* L∞: Π_ε(δ) = clip(δ, −ε, ε);             steepest ascent d(g) = sign(g);
* L2: Π_ε(δ) = δ · min(1, ε / ‖δ‖₂);        steepest ascent d(g) = g / ‖g‖₂;

and the feasible point is clip_[0,1](x₀ + Π_ε(δ)) (the ball first, then the box: what PGD (Madry et al. 2018) and the
AutoAttack authors' code do; for L2 it is not the exact projection onto the intersection, as theirs is not).
``eps`` may be a scalar or a per-example array shaped to broadcast against the images (e.g. ``(B, 1, 1, 1)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

NORMS = ('linf', 'l2')


def l2_norms(x: jax.Array) -> jax.Array:
  """‖x_i‖₂ for each example i (leading axis), in float32, shaped ``(B, 1, …, 1)`` to broadcast against ``x``."""
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)), keepdims=True))


def norms(x: jax.Array, norm: str) -> jax.Array:
  """‖x_i‖ (``norm`` 'linf' or 'l2') for each example i, shape ``(B,)``, float32."""
  x = x.astype(jnp.float32).reshape(x.shape[0], -1)
  if norm == 'linf':
    return jnp.max(jnp.abs(x), axis=1)
  return jnp.sqrt(jnp.sum(jnp.square(x), axis=1))


def project_delta(delta: jax.Array, eps, norm: str) -> jax.Array:
  """Π_ε(δ): the perturbation ``delta`` (B, …) moved into the ``norm`` ball of radius ``eps``."""
  if norm == 'linf':
    return jnp.clip(delta, -eps, eps)
  n = l2_norms(delta)
  return delta * jnp.minimum(1.0, eps / jnp.maximum(n, 1e-12))


def project(x: jax.Array, x0: jax.Array, eps, norm: str) -> jax.Array:
  """clip_[0,1](x₀ + Π_ε(x − x₀)): the point ``x`` moved into the ε-ball around ``x0`` and into [0, 1]ᵈ."""
  return jnp.clip(x0 + project_delta(x - x0, eps, norm), 0.0, 1.0)


def ascent_direction(grad: jax.Array, norm: str) -> jax.Array:
  """The unit-norm steepest-ascent direction of ``grad`` per example: sign(g) (L∞) or g / ‖g‖₂ (L2)."""
  if norm == 'linf':
    return jnp.sign(grad)
  return grad / jnp.maximum(l2_norms(grad), 1e-12)
