"""Per-example attack losses on logits z ∈ ℝ^{B×K}: cross-entropy, margin, DLR and targeted DLR.

DLR and targeted DLR are the "Difference of Logits Ratio" losses of Croce & Hein, "Reliable evaluation of
adversarial robustness with an ensemble of diverse parameter-free attacks" (ICML 2020), eqs. (6)–(7); π is the
permutation sorting z in decreasing order (z_π1 ≥ z_π2 ≥ …). Both are invariant to shifting the logits by a
constant and to scaling them by a positive factor, which CE is not. The margin z_y − max_{i≠y} z_i is the loss of
the Square Attack (Andriushchenko et al., ECCV 2020), minimized there. Every function returns shape (B,) in float32.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import optax

_DLR_EPS = 1e-12
LOSSES = ('ce', 'dlr', 'dlr_targeted')


def _assert_shapes(logits, labels):
  chex.assert_rank(logits, 2)
  chex.assert_rank(labels, 1)
  chex.assert_equal_shape_prefix([logits, labels], 1)
  chex.assert_type(labels, int)


def _need_classes(logits, k: int, name: str) -> None:
  if logits.shape[-1] < k:
    raise ValueError(f'the {name} loss needs logits of at least {k} classes (it reads the {k} largest), the model has '
                     f'{logits.shape[-1]}; use the cross-entropy (or margin) loss on this model')


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """CE(z, y) = −log softmax(z)_y per example."""
  _assert_shapes(logits, labels)
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)


def max_other(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """max_{i≠y} z_i per example."""
  z = logits.astype(jnp.float32)
  onehot = jax.nn.one_hot(labels, z.shape[-1], dtype=jnp.bool_)
  return jnp.max(jnp.where(onehot, -jnp.inf, z), axis=-1)


def _true_logit(logits, labels):
  return jnp.take_along_axis(logits.astype(jnp.float32), labels[:, None], axis=-1)[:, 0]


def margin(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """z_y − max_{i≠y} z_i per example: positive iff the example is classified correctly (ties aside)."""
  _assert_shapes(logits, labels)
  return _true_logit(logits, labels) - max_other(logits, labels)


def dlr(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """DLR(z, y) = −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12)  (Croce & Hein 2020, eq. 6); needs K ≥ 3."""
  _assert_shapes(logits, labels)
  _need_classes(logits, 3, 'dlr')
  top = jax.lax.top_k(logits.astype(jnp.float32), 3)[0]
  return -margin(logits, labels) / (top[:, 0] - top[:, 2] + _DLR_EPS)


def dlr_targeted(logits: jax.Array, labels: jax.Array, targets: jax.Array) -> jax.Array:
  """Targeted DLR = −(z_y − z_t) / (z_π1 − ½(z_π3 + z_π4) + 1e-12)  (Croce & Hein 2020, eq. 7); needs K ≥ 4.

  Maximizing it pushes the target logit z_t above the true one z_y.
  """
  _assert_shapes(logits, labels)
  chex.assert_equal_shape([labels, targets])
  _need_classes(logits, 4, 'dlr_targeted')
  top = jax.lax.top_k(logits.astype(jnp.float32), 4)[0]
  diff = _true_logit(logits, labels) - _true_logit(logits, targets)
  return -diff / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + _DLR_EPS)


def per_example_loss(name: str):
  """The loss ``name`` ∈ {'ce', 'dlr', 'dlr_targeted'} as a function ``(logits, labels, targets) -> (B,)``."""
  if name == 'ce':
    return lambda z, y, t: cross_entropy(z, y)
  if name == 'dlr':
    return lambda z, y, t: dlr(z, y)
  if name == 'dlr_targeted':
    return dlr_targeted
  raise ValueError(f'loss must be one of {LOSSES}, got {name!r}')
