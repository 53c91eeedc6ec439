"""What every benchmark here records: the machine, the versions, the command, the CPU time other processes took,
and the JSON results file (merged by configuration). Imported by the benchmark scripts as ``machine``."""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from typing import Any

import jax
import numpy as np
import optax


def cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or 'unknown'


def device_info() -> dict[str, Any]:
  d = jax.devices()[0]
  info = {'jax_platform': d.platform, 'jax_device_kind': d.device_kind, 'jax_device_count': jax.device_count(),
          'cpu_model': cpu_model(), 'cpu_count': os.cpu_count(), 'hostname_platform': platform.platform()}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    info['torch_cuda'] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
  except ImportError:
    pass
  return info


def versions() -> dict[str, str | None]:
  import flax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  out = {'python': platform.python_version(), 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
         'flax': flax.__version__, 'optax': optax.__version__, 'numpy': np.__version__}
  for name in ('torch', 'torchattacks'):
    try:
      out[name] = __import__(name).__version__
    except ImportError:
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


def write_results(path: str, new: dict[str, Any], key_fields: tuple[str, ...], merge: bool) -> dict[str, Any]:
  """Writes ``new`` to ``path``; with ``merge``, keeps the old file's results for configurations not re-run."""
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
  with open(path, 'w') as f:
    json.dump(out, f, indent=1)
    f.write('\n')
  return out
