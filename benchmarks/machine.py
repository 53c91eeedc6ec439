"""What every benchmark here records: the machine, the versions, the command, the CPU time other processes took,
and the JSON results file (merged by configuration, written atomically). Imported by the benchmark scripts as
``machine``; :func:`write_results` is the one JSON writer of ``benchmarks/``."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from typing import Any

import jax
import numpy as np

# Distributions whose versions a result records (absent ones as None): the JAX stack, its GPU plugins, the PyTorch
# side of the comparisons and the wheels carried to a GPU machine.
DISTRIBUTIONS = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'jax-cuda12-plugin', 'jax-cuda12-pjrt',
                 'flax', 'optax', 'orbax-checkpoint', 'chex', 'ml-collections', 'absl-py', 'numpy', 'torch',
                 'torchattacks', 'tensorboardX', 'tensorflow-datasets')


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def nvidia_smi() -> list[dict[str, str]] | None:
  """Name, driver, memory and clocks of each NVIDIA GPU as ``nvidia-smi`` reports them; None without nvidia-smi."""
  exe = shutil.which('nvidia-smi')
  if exe is None:
    return None
  fields = ('name', 'driver_version', 'memory.total', 'clocks.max.sm', 'power.limit', 'compute_cap')
  try:
    out = subprocess.run([exe, f'--query-gpu={",".join(fields)}', '--format=csv,noheader'], capture_output=True,
                         text=True, timeout=30)
  except (OSError, subprocess.SubprocessError) as e:
    return [{'error': f'{type(e).__name__}: {e}'}]
  if out.returncode:
    return [{'error': (out.stderr or out.stdout).strip()[-300:]}]
  return [dict(zip(fields, (v.strip() for v in line.split(',')))) for line in out.stdout.strip().splitlines()]


def device_info() -> dict[str, Any]:
  """The JAX devices, the host and (where there is one) the NVIDIA driver's view of the GPU."""
  d = jax.devices()[0]
  info = {'jax_platform': d.platform, 'jax_device_kind': d.device_kind, 'jax_device_count': jax.device_count(),
          'cpu_model': cpu_model(), 'cpu_count': os.cpu_count(), 'hostname_platform': platform.platform()}
  try:
    from jax.extend import backend  # pylint: disable=g-import-not-at-top
    info['jax_platform_version'] = backend.get_backend().platform_version
  except Exception:  # pylint: disable=broad-except  # informative only
    info['jax_platform_version'] = None
  smi = nvidia_smi()
  if smi is not None:
    info['nvidia_smi'] = smi
  torch = sys.modules.get('torch')  # only where a benchmark already uses it: importing torch takes seconds
  if torch is not None:
    info['torch_cuda'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
  return info


def versions(extra: tuple[str, ...] = ()) -> dict[str, str | None]:
  """Python's version and those of :data:`DISTRIBUTIONS` (plus ``extra``) as installed, None where absent; read from
  the installed metadata, so nothing is imported."""
  out = {'python': platform.python_version()}
  for name in DISTRIBUTIONS + tuple(extra):
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def command_line() -> str:
  return ' '.join(['python'] + [a if ' ' not in a else repr(a) for a in sys.argv])


class CpuShare:
  """Share of the machine's CPU time used by *other* processes between ``__enter__`` and ``__exit__``.

  Busy jiffies of all CPUs (/proc/stat) minus this process's own CPU time, over cores × wall time. None where
  /proc/stat is missing.
  """

  def __enter__(self):
    self.t0, self.busy0, self.own0 = time.perf_counter(), _busy_seconds(), _own_seconds()
    self.load0 = os.getloadavg()
    return self

  def __exit__(self, *exc):
    wall = self.wall = time.perf_counter() - self.t0
    busy1 = _busy_seconds()
    self.loadavg = [round(x, 2) for x in os.getloadavg()]
    self.loadavg_start = [round(x, 2) for x in self.load0]
    if busy1 is None or self.busy0 is None or wall <= 0:
      self.others = None
    else:
      others = (busy1 - self.busy0) - (_own_seconds() - self.own0)
      self.others = round(max(others, 0.0) / (wall * (os.cpu_count() or 1)), 3)
    return False


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25, window_s: float = 2.0) -> float:
  """Waits (at most ``max_wait_s``) until other processes use < ``threshold`` of the CPU over ``window_s``.

  Returns the seconds waited. On a shared machine this keeps the timed calls out of other jobs' busy spells, as far
  as they allow; the share measured during timing is recorded either way.
  """
  t_start = time.perf_counter()
  while time.perf_counter() - t_start < max_wait_s:
    with CpuShare() as share:
      time.sleep(window_s)
    if share.others is None or share.others < threshold:
      break
  return time.perf_counter() - t_start


def _busy_seconds() -> float | None:
  try:
    with open('/proc/stat') as f:
      fields = [int(v) for v in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
  return (sum(fields[:8]) - idle) / os.sysconf('SC_CLK_TCK')


def _own_seconds() -> float:
  t = os.times()
  return t.user + t.system


def write_results(path: str, new: dict[str, Any], key_fields: tuple[str, ...] = (), merge: bool = False
                  ) -> dict[str, Any]:
  """Writes ``new`` to ``path`` as JSON, atomically (a temporary file renamed over it: a reader, or a run killed
  meanwhile, sees the old file or the new one, never half of one); with ``merge``, keeps the old file's
  ``results`` for configurations (``key_fields``) not re-run and appends ``runs``. Returns what was written."""
  if not isinstance(new, dict):
    raise TypeError(f'write_results writes a dict, got {type(new).__name__}')
  if merge and not key_fields:
    raise ValueError('merging needs the key_fields that identify a configuration')
  out = new
  if merge and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    key = lambda r: tuple(r.get(k) for k in key_fields)
    fresh = {key(r) for r in new['results']}
    out = dict(old)
    out.update({k: v for k, v in new.items() if k not in ('results', 'runs', 'equivalence')})
    out['runs'] = old.get('runs', []) + new['runs']
    out['results'] = [r for r in old.get('results', []) if key(r) not in fresh] + new['results']
    if 'equivalence' in new:
      out['equivalence'] = {**old.get('equivalence', {}), **new['equivalence']}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(out, f, indent=1, default=_json_default)
    f.write('\n')
  os.replace(tmp, path)
  return out


def _json_default(value: Any) -> Any:
  """numpy scalars and arrays, and anything else, as JSON can hold them."""
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def git_commit(folder: str) -> str | None:
  """The commit checked out in ``folder`` (e.g. the authors' code a benchmark compares with), or None."""
  try:
    return subprocess.run(['git', '-C', folder, 'rev-parse', 'HEAD'], capture_output=True, text=True,
                          timeout=10).stdout.strip() or None
  except (OSError, subprocess.SubprocessError):
    return None
