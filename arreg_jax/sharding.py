"""One data-parallel mesh: batches sharded on ``'data'``, everything else replicated; a bound on how far the host runs
ahead of the devices; and the one padded batch mapper (:func:`map_batches`) that runs a per-example kernel over a
whole split in fixed-size batches (the last padded by wrapping around and masked), one compiled program for all.

**Why the bound** (:class:`DispatchWindow`): with several XLA:CPU devices (``--xla_force_host_platform_device_count``)
every program over the mesh is launched by one task per device on the PjRt CPU client's thread pool, which has only
``max(cores, devices)`` threads — "enough threads for one collective", in XLA's words. Each launch first takes a slot
of its device's in-flight limit (32 launched, unfinished programs per device) and *blocks its pool thread* while the
limit is full; the running program's per-device parts each hold a pool thread until the program ends, and its
all-reduce needs every device's part running. A host that dispatches more than 32 programs ahead therefore leaves a
launch task blocked on a thread that one device's part of the oldest program needs: the all-reduce waits for a part
that never starts, and after 40 s XLA aborts the process ("Expected 2 threads to join the rendezvous, but only 1 of
them arrived on time"). Keeping fewer than 32 programs in flight means no launch ever blocks, so that cannot happen;
8 keeps the devices fed as well as 32 does.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Sequence

from absl import logging
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from arreg_jax.errors import ConfigError

DATA_AXIS = 'data'

# Programs dispatched and not yet finished that a host loop may keep in flight (XLA:CPU's per-device limit is 32).
MAX_IN_FLIGHT = 8

Kernel = Callable[..., dict[str, jax.Array]]


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh ``('data',)`` over ``devices`` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_parallel_devices(batch_size: int, devices: Sequence | None = None) -> list:
  """The first ``n`` of ``devices`` (default: all), with ``n`` the largest device count that divides ``batch_size``
  (so a batch splits evenly): 8 devices and batch 60 → 6 devices, batch 128 → 8. On several processes (hosts) every
  device is kept — the mesh must span all hosts — and :func:`check_divisible` then reports a batch that does not
  split."""
  devices = list(jax.devices() if devices is None else devices)
  if len({d.process_index for d in devices}) > 1:
    return devices
  n = max(k for k in range(1, len(devices) + 1) if batch_size % k == 0)
  if n < len(devices):
    logging.warning('batch size %d splits evenly over %d of the %d devices; using %d (a multiple of %d would use '
                    'them all)', batch_size, n, len(devices), n, len(devices))
  return devices[:n]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over the mesh."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def round_up(batch_size: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh's device count that is ≥ ``batch_size``."""
  return -(-int(batch_size) // mesh.size) * mesh.size


def check_divisible(batch_size: int, mesh: Mesh, what: str) -> None:
  """Raises a ConfigError unless ``batch_size`` splits evenly over the mesh's devices."""
  n = mesh.size
  if batch_size % n:
    lo, hi = (batch_size // n) * n, -(-batch_size // n) * n
    raise ConfigError(
        f'{what} = {batch_size} is not divisible by the number of devices ({n}); '
        f'set it to a multiple of {n}, e.g. {hi}' + (f' or {lo}' if lo else ''))


class DispatchWindow:
  """Keeps at most ``size`` dispatched programs in flight: :meth:`push` each program's output; when more than
  ``size`` are pending, it waits for the oldest (see the module docstring for why; multi-device programs run one at a
  time in dispatch order, so once the oldest is done so is everything dispatched before it).

  Each pushed output may carry a ``tag`` (e.g. the steps done once it has finished): after a :meth:`push`,
  :attr:`finished` is the tag of the newest output that push waited for (None: it waited for none), and
  :meth:`wait_oldest` waits for the oldest pending one on demand (for a progress line).
  """

  def __init__(self, size: int = MAX_IN_FLIGHT):
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ValueError(f'size must be an int >= 1, got {size!r}')
    self.size = size
    self._pending: collections.deque = collections.deque()  # (tag, outputs), oldest first
    self.finished: Any = None

  def __len__(self) -> int:
    return len(self._pending)

  def push(self, outputs: Any, tag: Any = None) -> Any:
    """Records ``outputs`` as in flight, waiting for the oldest while more than ``size`` are; returns ``outputs``."""
    self._pending.append((tag, outputs))
    self.finished = None
    while len(self._pending) > self.size:
      self.wait_oldest()
    return outputs

  def wait_oldest(self) -> Any:
    """Waits for the oldest output in flight and returns its tag (also kept in :attr:`finished`)."""
    tag, outputs = self._pending.popleft()
    jax.block_until_ready(outputs)
    self.finished = tag
    return tag


def to_host(tree):
  """``jax.device_get`` that also works when the arrays span several processes (hosts): then every process gets
  the whole global value (``multihost_utils.process_allgather``), e.g. per-example outputs sharded over ``'data'``."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return multihost_utils.process_allgather(tree, tiled=True)


def even_batch(n: int, max_batch: int, devices: int = 1) -> int:
  """The batch size ≤ ``max_batch`` (a multiple of ``devices``) that covers ``n`` examples in the fewest calls with
  the least padding: 300 examples at most 128 per call → 3 calls of 100, not 3 of 128."""
  calls = -(-n // max_batch)
  per_call = -(-n // calls)
  return min(max_batch, -(-per_call // devices) * devices)


def padded_rows(start, size: int, num_examples: int, stop, *, xp=np):
  """``(index, valid)`` of one padded batch of a split of ``num_examples`` examples: rows at positions ``start``,
  …, ``start + size − 1``, wrapping around the split (a padded row repeats an example, so every batch of a split has
  the same shape: one compiled program), valid where the position is < ``stop``.

  ``xp`` is ``numpy`` for a batch gathered on the host or ``jax.numpy`` inside a program (``start``, ``stop`` traced).
  """
  pos = start + xp.arange(size, dtype=np.int32)
  return pos % num_examples, pos < stop


def map_batches(kernel: Kernel, variables: Any, images: np.ndarray, labels: np.ndarray, *, batch_size: int,
                mesh: jax.Mesh, limit: int | None = None, extra: tuple = (),
                batch_key: jax.Array | None = None, fixed_batch: bool = False) -> dict[str, np.ndarray]:
  """Applies ``kernel`` to the first ``limit`` examples (all if None) and concatenates its per-example outputs.

  Args:
    kernel: jitted ``kernel(variables, images, labels, mask, *extra)``; outputs have a leading batch axis.
    variables: model variables (replicated over the mesh here).
    images: host array ``(N, ...)`` of the kernel's inputs (uint8 images for the runner's kernels, float images
      for the library's); labels: host int ``(N,)``.
    batch_size: the most examples per call, rounded down to a multiple of the number of devices of ``mesh`` (at
      least one per device); the batch actually used is :func:`even_batch`, so a split is covered with the least
      padding.
    mesh: a mesh from :func:`make_mesh`.
    limit: analyze only the first ``limit`` examples.
    extra: further (replicated) arguments passed to the kernel after ``mask`` (e.g. a traced ε).
    batch_key: if given, the kernel gets ``key_data(fold_in(batch_key, batch index))`` after ``mask`` (before
      ``extra``; ``jax.random.wrap_key_data`` turns it back into a key).
    fixed_batch: use ``batch_size`` (rounded to the device count) as it is, instead of the least-padding
      :func:`even_batch`: for callers that feed splits of varying size to one compiled shape.

  Returns:
    ``{name: numpy array with leading axis n}`` with ``n = min(limit, N)``.
  """
  batch_size = max(int(batch_size) // mesh.size, 1) * mesh.size  # a multiple of the device count
  n_total = images.shape[0]
  n = n_total if limit is None else min(int(limit), n_total)
  if n == 0:
    raise ValueError('no examples to analyze')
  if not fixed_batch:
    batch_size = even_batch(n, batch_size, mesh.size)
  rep = replicated(mesh)
  data = batch_sharding(mesh)
  variables = jax.device_put(variables, rep)
  extra = jax.device_put(extra, rep)
  labels = np.asarray(labels, np.int32)
  outs: list[dict[str, jax.Array]] = []
  window = DispatchWindow()  # never 32 programs in flight (module docstring)
  for start in range(0, n, batch_size):
    idx, mask = padded_rows(start, batch_size, n_total, n)
    x, y, m = jax.device_put((images[idx], labels[idx], mask), data)
    keys = ()
    if batch_key is not None:  # as raw key data from the host: placeable on a mesh that spans several processes
      keys = (jax.device_put(np.asarray(jax.random.key_data(jax.random.fold_in(batch_key, start // batch_size))), rep),)
    outs.append(window.push(kernel(variables, x, y, m, *keys, *extra)))
  outs = to_host(outs)
  return {k: np.concatenate([o[k] for o in outs])[:n] for k in outs[0]}
