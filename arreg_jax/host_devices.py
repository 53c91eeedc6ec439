"""One XLA:CPU device per core: data parallelism over the cores of a CPU-only host.

XLA:CPU shows a host as a single device by default, and its intra-op threads barely use a second core on the small
convolutions of these models; split into one device per core, the batch is sharded over the cores like over
accelerators (:mod:`arreg_jax.sharding`). :func:`use_every_cpu_core` does that before JAX starts its backend:

    from arreg_jax import host_devices
    host_devices.use_every_cpu_core()          # or use_every_cpu_core(4); then use JAX as usual

It sets JAX's public option ``jax_num_cpu_devices`` (``jax.config.update``), which only affects the CPU platform, and
does nothing when the user already chose the CPU device count (``--xla_force_host_platform_device_count`` in
``XLA_FLAGS``, the ``JAX_NUM_CPU_DEVICES`` variable, or ``jax_num_cpu_devices`` set earlier), when ``JAX_PLATFORMS``
names another platform first, when a GPU/TPU plugin is installed (its devices are then the ones to use) or when the
backend has already started (JAX refuses the option then, and the device count stays as it is).
``python -m arreg_jax.main --cpu_devices=auto|N`` and ``python -m arreg_jax.analyze`` call it at start-up.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil

from absl import logging

FLAG = '--xla_force_host_platform_device_count'
OPTION = 'jax_num_cpu_devices'
_ACCELERATOR_MODULES = ('libtpu', 'jax_cuda12_plugin', 'jax_cuda13_plugin', 'jax_rocm60_plugin', 'jax_rocm7_plugin')


def cpu_cores() -> int:
  """The cores this process may run on (its CPU affinity, which containers and ``taskset`` restrict)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return os.cpu_count() or 1


def _accelerator_reason() -> str | None:
  platforms = os.environ.get('JAX_PLATFORMS', '').strip()
  if platforms:
    first = platforms.split(',')[0].strip().lower()
    return None if first == 'cpu' else f'JAX_PLATFORMS={platforms}'
  for name in _ACCELERATOR_MODULES:
    if importlib.util.find_spec(name) is not None:
      return f'{name} is installed'
  try:
    import jax_plugins  # pylint: disable=g-import-not-at-top  (the namespace package of PJRT plugins)
    plugins = [m.name for m in pkgutil.iter_modules(jax_plugins.__path__)]
  except ImportError:
    plugins = []
  return f'the PJRT plugin {plugins[0]} is installed' if plugins else None


def _user_choice(jax) -> str | None:
  """Where the user already chose the CPU device count, or None."""
  if FLAG in os.environ.get('XLA_FLAGS', ''):
    return f'XLA_FLAGS holds {FLAG}'
  if os.environ.get('JAX_NUM_CPU_DEVICES', '').strip():
    return 'JAX_NUM_CPU_DEVICES is set'
  if getattr(jax.config, OPTION) >= 0:
    return f'{OPTION} is already set'
  return None


def use_every_cpu_core(num_devices: int | str = 'auto') -> int | None:
  """Gives XLA:CPU ``num_devices`` devices (``'auto'``: one per core) if JAX will run on the CPU.

  Call it before the first JAX computation (``import jax`` alone is fine). Returns the device count it set, or
  None when it changed nothing: the user already chose the count (``XLA_FLAGS`` holds
  ``--xla_force_host_platform_device_count``, ``JAX_NUM_CPU_DEVICES`` is set, or ``jax_num_cpu_devices`` was set
  before), JAX will run on an accelerator (``JAX_PLATFORMS`` names one first, or a CUDA/ROCm/TPU plugin is
  installed), or the backend has already started (logged as a warning). ``num_devices`` is ``'auto'`` or an integer
  ≥ 1 (1: XLA's default of one device).
  """
  if num_devices != 'auto' and (isinstance(num_devices, bool) or not isinstance(num_devices, int)
                                or num_devices < 1):
    raise ValueError(f"num_devices must be 'auto' or an integer >= 1, got {num_devices!r}")
  import jax  # pylint: disable=g-import-not-at-top  (importing jax does not start its backend)
  chosen = _user_choice(jax)
  if chosen:
    logging.info('use_every_cpu_core: the CPU device count is the user\'s (%s)', chosen)
    return None
  reason = _accelerator_reason()
  if reason:
    logging.info('use_every_cpu_core: not splitting the CPU into devices (%s)', reason)
    return None
  n = cpu_cores() if num_devices == 'auto' else int(num_devices)
  try:
    jax.config.update(OPTION, n)
  except RuntimeError:  # JAX refuses the option once a backend has started
    logging.warning('use_every_cpu_core: the JAX backend has already started; the CPU device count stays as it is')
    return None
  return n
