"""One data-parallel mesh over every device: batches sharded on ``'data'``, everything else replicated."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from arreg_jax.errors import ConfigError

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh ``('data',)`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
  """Raises a ConfigError unless ``batch_size`` splits evenly over the mesh's devices."""
  n = mesh.size
  if batch_size % n:
    lo, hi = (batch_size // n) * n, -(-batch_size // n) * n
    raise ConfigError(
        f'{what} = {batch_size} is not divisible by the number of devices ({n}); '
        f'set it to a multiple of {n}, e.g. {hi}' + (f' or {lo}' if lo else ''))


def to_host(tree):
  """``jax.device_get`` that also works when the arrays span several processes (hosts): then every process gets
  the whole global value (``multihost_utils.process_allgather``), e.g. per-example outputs sharded over ``'data'``."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)
