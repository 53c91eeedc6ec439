"""What a sweep is: its members, each member's config, the run names, and the runs found in a sweep directory.

A config's sweep is the product of up to three dimensions, AR-major:

* ``config.sweep`` — AR strengths s (ε = s × ``attack.strength_unit``; 0 is standard training);
* ``config.spectral.sweep`` — spectral-clipping thresholds c (appendix B.4.2; None = uncontrolled);
* ``config.regularizer.sweep`` — (margin_lambda, ortho_beta) pairs of the average-margin regularizer (poster 004).

Each member trains into ``WORKDIR/<run_name>``: ``ar4``, ``ar0.1``; ``ar4_sp1`` / ``ar4_spnone`` when clipping is a
dimension; ``ar0_ml0.5_ob0.001`` when the regularizer is. A run directory is recognized by its ``config.json``
(:func:`arreg_jax.rundir.run_dirs`), and what distinguishes it is read from that config, never from its name;
:func:`parse_run_name` reads a name back for users' scripts.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

import ml_collections

from arreg_jax import config_json, rundir


@dataclasses.dataclass(frozen=True)
class Member:
  """One member of a sweep: its AR strength, clip threshold, regularizer pair (None: the config's own), name."""
  strength: float
  clip_to: float | None
  regularizer: tuple[float, float] | None
  name: str


def run_name(strength: float, clip_to: float | None = None, *, clip_sweep: bool = False,
             regularizer: tuple[float, float] | None = None) -> str:
  """The run directory name of one member (module docstring)."""
  name = f'ar{strength:g}'
  if clip_sweep:
    name += '_sp' + ('none' if clip_to is None else f'{clip_to:g}')
  if regularizer is not None:
    name += f'_ml{regularizer[0]:g}_ob{regularizer[1]:g}'
  return name


_NAME = re.compile(r'^ar(?P<s>[^_]+)(?:_sp(?P<c>[^_]+))?(?:_ml(?P<ml>[^_]+)_ob(?P<ob>[^_]+))?$')


def parse_run_name(name: str) -> tuple[float, float | None, tuple[float, float] | None] | None:
  """``(strength, clip_to, regularizer)`` of a name made by :func:`run_name`, or None for any other name."""
  m = _NAME.match(name)
  if not m:
    return None
  try:
    clip = None if m['c'] in (None, 'none') else float(m['c'])
    reg = None if m['ml'] is None else (float(m['ml']), float(m['ob']))
    return float(m['s']), clip, reg
  except ValueError:
    return None


def members(config: ml_collections.ConfigDict) -> list[Member]:
  """Every member of ``config``'s sweep, AR-major, then clip threshold, then regularizer pair."""
  clips = list(config.spectral.sweep) or [config.spectral.clip_to]
  regs = [(float(a), float(b)) for a, b in config.regularizer.sweep] or [None]
  clip_sweep = bool(config.spectral.sweep)
  out = []
  for s in config.sweep:
    for c in clips:
      c = None if c is None else float(c)
      for r in regs:
        out.append(Member(float(s), c, r, run_name(float(s), c, clip_sweep=clip_sweep, regularizer=r)))
  return out


def member_config(config: ml_collections.ConfigDict, member: Member) -> ml_collections.ConfigDict:
  """The config one member trains with: the sweep dimensions resolved to the member's values."""
  c = config.copy_and_resolve_references()
  c.spectral.clip_to = member.clip_to
  c.spectral.sweep = ()
  if member.regularizer is not None:
    c.regularizer.margin_lambda, c.regularizer.ortho_beta = member.regularizer
    c.regularizer.sweep = ()
  return c


def member_config_dict(config: ml_collections.ConfigDict, member: Member) -> dict:
  """The member's ``config.json``: :func:`member_config` as JSON, with its ``strength``."""
  d = config_json.to_dict(member_config(config, member))
  d['strength'] = member.strength
  return d


def clip_of(cfg: dict) -> float | None:
  """The spectral-clipping threshold of a run's config dict (None when uncontrolled)."""
  spec = cfg.get('spectral')
  if isinstance(spec, dict):
    c = spec.get('clip_to')
    if c is not None and not (isinstance(c, float) and math.isnan(c)):
      return float(c)
  return None


def regularizer_of(cfg: dict) -> dict[str, float]:
  """``{'margin_lambda', 'margin_gamma', 'ortho_beta'}`` of a run's config dict (the defaults for runs made before
  the regularizer existed)."""
  reg = cfg.get('regularizer') or {}
  return {k: float(reg.get(k, d) or 0.0) for k, d in (('margin_lambda', 0.0), ('margin_gamma', 1.0),
                                                      ('ortho_beta', 0.0))}


def is_regularized(cfg: dict) -> bool:
  r = regularizer_of(cfg)
  return bool(r['margin_lambda'] or r['ortho_beta'])


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """One run found in a sweep directory.

  Attributes:
    path: the run directory.
    name: its base name.
    strength: AR strength s (ε = s × ``attack.strength_unit``).
    clip: the spectral-clipping threshold c of the run (``spectral.clip_to``), None when uncontrolled.
    regularized: the average-margin regularizer is on (λ or β > 0).
    finished: ``final.json`` exists.
    config: the run's ``config.json``.
  """
  path: str
  name: str
  strength: float
  clip: float | None
  regularized: bool
  finished: bool
  config: dict = dataclasses.field(repr=False, compare=False)


def find_runs(workdir: str) -> list[RunInfo]:
  """All runs directly under ``workdir``, sorted by (clip — uncontrolled last —, strength)."""
  runs = [RunInfo(path, os.path.basename(path), float(cfg['strength']), clip_of(cfg), is_regularized(cfg),
                  rundir.is_finished(path), cfg) for path, cfg in rundir.run_dirs(workdir)]
  return sorted(runs, key=lambda r: (r.clip is None, r.clip or 0.0, r.strength))

