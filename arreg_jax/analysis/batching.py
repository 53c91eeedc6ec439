"""Running a per-example kernel over a whole split in fixed-size, padded batches sharded over the device mesh.

Every analysis kernel is a jitted ``kernel(variables, images_uint8, labels, mask) -> {name: (B, ...) array}`` whose
outputs are per example. :func:`map_batches` feeds it batches of exactly ``batch_size`` examples (the last one padded
by wrapping around and masked out), placed with the leading axis split over the mesh's ``'data'`` axis and the
variables replicated — the same layout as training (``arreg_jax.sharding``) — so one compiled program serves every
batch of every model of a sweep that shares the architecture. The padded rows are dropped on the host.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np

from arreg_jax import sharding

Kernel = Callable[..., dict[str, jax.Array]]


def even_batch(n: int, max_batch: int, devices: int = 1) -> int:
  """The batch size ≤ ``max_batch`` (a multiple of ``devices``) that covers ``n`` examples in the fewest calls with
  the least padding: 300 examples at most 128 per call → 3 calls of 100, not 3 of 128."""
  calls = -(-n // max_batch)
  per_call = -(-n // calls)
  return min(max_batch, -(-per_call // devices) * devices)


def map_batches(kernel: Kernel, variables: Any, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                mesh: jax.sharding.Mesh, limit: int | None = None, extra: tuple = (),
                batch_key: jax.Array | None = None) -> dict[str, np.ndarray]:
  """Applies ``kernel`` to the first ``limit`` examples (all if None) and concatenates its per-example outputs.

  Args:
    kernel: jitted ``kernel(variables, images, labels, mask, *extra)``; outputs have a leading batch axis.
    variables: model variables (replicated over the mesh here).
    images: host uint8 ``(N, H, W, C)``; labels: host int ``(N,)``.
    batch_size: the most examples per call, rounded down to a multiple of the number of devices of ``mesh`` (at
      least one per device); the batch actually used is :func:`even_batch`, so a split is covered with the least
      padding.
    mesh: a mesh from :func:`arreg_jax.sharding.make_mesh`.
    limit: analyse only the first ``limit`` examples.
    extra: further (replicated) arguments passed to the kernel after ``mask`` (e.g. a traced ε).
    batch_key: if given, the kernel gets ``key_data(fold_in(batch_key, batch index))`` after ``mask`` (before
      ``extra``; ``jax.random.wrap_key_data`` turns it back into a key).

  Returns:
    ``{name: numpy array with leading axis n}`` with ``n = min(limit, N)``.
  """
  batch_size = max(int(batch_size) // mesh.size, 1) * mesh.size  # a multiple of the device count
  n_total = images.shape[0]
  n = n_total if limit is None else min(int(limit), n_total)
  if n == 0:
    raise ValueError('no examples to analyse')
  batch_size = even_batch(n, batch_size, mesh.size)
  rep = sharding.replicated(mesh)
  data = sharding.batch_sharding(mesh)
  variables = jax.device_put(variables, rep)
  extra = jax.device_put(extra, rep)
  labels = np.asarray(labels, np.int32)
  outs: list[dict[str, jax.Array]] = []
  window = sharding.DispatchWindow()  # never 32 programs in flight (arreg_jax.sharding)
  for start in range(0, n, batch_size):
    idx = np.arange(start, start + batch_size) % n_total
    mask = np.arange(start, start + batch_size) < n
    x, y, m = jax.device_put((images[idx], labels[idx], mask), data)
    keys = ()
    if batch_key is not None:  # as raw key data from the host: placeable on a mesh that spans several processes
      keys = (jax.device_put(np.asarray(jax.random.key_data(jax.random.fold_in(batch_key, start // batch_size))), rep),)
    outs.append(window.push(kernel(variables, x, y, m, *keys, *extra)))
  outs = sharding.to_host(outs)
  return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}
