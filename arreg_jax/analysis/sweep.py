"""Finding the members of a sweep directory and what distinguishes them (AR strength, spectral clipping).

A sweep directory (``arreg_jax.experiment``) holds one run directory per member. Run directories are recognized by
their ``config.json`` carrying a ``strength`` key, never by their names: a sweep may have one dimension (``ar4``)
or two (AR strength × spectral clipping, issue 3), named in any way.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """One member of a sweep.

  Attributes:
    path: the run directory.
    name: its base name.
    strength: AR strength s (ε = s × ``attack.strength_unit``).
    clip: the spectral-clipping threshold c of the run (``spectral.clip_to``), None when uncontrolled.
    finished: ``final.json`` exists.
  """
  path: str
  name: str
  strength: float
  clip: float | None
  finished: bool


def clip_of(cfg: dict) -> float | None:
  spec = cfg.get('spectral')
  if isinstance(spec, dict):
    c = spec.get('clip_to')
    if c is not None and not (isinstance(c, float) and math.isnan(c)):
      return float(c)
  return None


def find_runs(workdir: str) -> list[RunInfo]:
  """All run directories directly under ``workdir``, sorted by (clip — uncontrolled last —, strength)."""
  runs = []
  if not os.path.isdir(workdir):
    return runs
  for name in sorted(os.listdir(workdir)):
    path = os.path.join(workdir, name)
    cfg_path = os.path.join(path, 'config.json')
    if not os.path.isfile(cfg_path):
      continue
    try:
      with open(cfg_path) as f:
        cfg = json.load(f)
    except (OSError, ValueError):
      continue
    if not isinstance(cfg, dict) or 'strength' not in cfg:
      continue
    runs.append(RunInfo(path, name, float(cfg['strength']), clip_of(cfg),
                        os.path.isfile(os.path.join(path, 'final.json'))))
  return sorted(runs, key=lambda r: (r.clip is None, r.clip or 0.0, r.strength))


def clip_label(clip: float | None) -> str:
  """``'SP c'`` as in Table 6, or ``'uncontrolled'``."""
  return 'uncontrolled' if clip is None else f'SP {clip:g}'
