"""Several processes (hosts) as one JAX system: start-up from the config, and which process writes files.

With ``config.distributed.enabled``, :func:`initialize` calls ``jax.distributed.initialize`` before any computation;
afterwards ``jax.devices()`` lists the devices of every process, so the one data-parallel mesh of
:mod:`arreg_jax.sharding` spans all hosts, and every compiled step runs as one program over all of them. Every
process runs the same command (the same config, the same ``--workdir`` on a file system all hosts share):

* every process loads the dataset and places it, replicated, on its own devices;
* orbax checkpoints are written by all processes together (each saves what it holds);
* files that are not checkpoints (``config.json``, ``metrics.jsonl``, ``final.json``, ``summary.json``, the analysis
  and the report) and the per-epoch lines on stdout come from process 0 only (:func:`is_main_process`).

Left as None, the coordinator address, process count and process id are detected by JAX on Cloud TPU, Slurm and
Open MPI; elsewhere give all three (the coordinator is ``host:port`` of process 0).
"""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils
import ml_collections

from arreg_jax.errors import ConfigError


def initialize(cfg: ml_collections.ConfigDict) -> None:
  """Starts the multi-process JAX runtime when ``cfg.enabled`` (``config.distributed``); a no-op otherwise."""
  if not cfg.enabled:
    return
  given = {k: cfg[k] for k in ('coordinator_address', 'num_processes', 'process_id') if cfg[k] is not None}
  if given and len(given) != 3:
    raise ConfigError('config.distributed: give coordinator_address, num_processes and process_id together, or '
                      f'none of them (auto-detection on TPU, Slurm, Open MPI); got only {", ".join(sorted(given))}')
  try:
    jax.distributed.initialize(**given)
  except (RuntimeError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f'jax.distributed.initialize failed ({first}). Outside TPU, Slurm and Open MPI set '
                      'config.distributed.coordinator_address (host:port of process 0), .num_processes and '
                      '.process_id, and start the same command on every host') from None


def is_main_process() -> bool:
  """True in the process that writes the run's files and prints progress (process 0; always true on one host)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached the barrier ``name`` (a no-op with one process): the files process 0
  wrote before it are then there for every process to read (e.g. ``final.json``, which marks a run finished)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
