"""Per-example random draws: example i of a batch draws from ``fold_in(key, i)``, so its noise depends only on the
key and its position, not on the batch size or on the other examples (padded batches, sharded batches and a
sub-batch all see the same noise)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def example_keys(key: jax.Array, n: int) -> jax.Array:
  """(n,) keys: fold_in(key, i) for i = 0 … n−1."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def uniform(key: jax.Array, shape, minval=0.0, maxval=1.0) -> jax.Array:
  """U[minval, maxval) of ``shape`` (leading axis = examples), float32."""
  return jax.vmap(lambda k: jax.random.uniform(k, shape[1:], jnp.float32, minval, maxval))(
      example_keys(key, shape[0]))


def normal(key: jax.Array, shape) -> jax.Array:
  """N(0, 1) of ``shape`` (leading axis = examples), float32."""
  return jax.vmap(lambda k: jax.random.normal(k, shape[1:], jnp.float32))(example_keys(key, shape[0]))


def sign(key: jax.Array, shape) -> jax.Array:
  """Uniform ±1 of ``shape`` (leading axis = examples), float32."""
  return jnp.where(uniform(key, shape) < 0.5, -1.0, 1.0).astype(jnp.float32)
