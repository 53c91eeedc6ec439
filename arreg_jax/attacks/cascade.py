"""AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020): a cascade of attacks, each run only on the points every earlier attack left robust; the result
is per example the first adversarial point found, so its robust accuracy is that of the per-example worst case.

Versions, as the authors' ``set_version`` (L∞ and L2):

* 'standard': APGD-CE (100 iterations, 1 restart) → APGD-T (targeted DLR, 9 targets, 1 restart each) → FAB-T
  (9 targets, 100 iterations, 1 restart) → Square (5000 queries, the 10000-query p schedule not rescaled);
* 'plus': APGD-CE (5 restarts) → APGD-DLR (5 restarts) → FAB (untargeted, 5 restarts) → Square → APGD-T → FAB-T;
* 'custom': the attacks named in ``attacks``, in that order, with the standard settings.

Models with few classes (the authors' ``check_n_classes``): the DLR loss reads the 3 largest logits and the targeted
DLR the 4 largest, so APGD-DLR needs K ≥ 3 classes and APGD-T K ≥ 4; with fewer, :func:`plan` drops them (on a
two-class model 'standard' is APGD-CE → FAB-T → Square: no DLR loss) and says so. Targeted attacks take at most
K − 1 targets.

Design: one program, static shapes. The cascade carries a per-example ``robust`` mask (B,); every stage gets the whole
batch plus the mask and changes only the masked points, and is skipped (``lax.cond``) when no masked point is left
robust. Stage i draws from ``fold_in(key, i)`` (i its place in the version's list), so an attack run alone with that
key gives each point the attack it gets here. A point counts as broken only if the model misclassifies the image
the stage returns (FAB-T's also within ε): the authors' bookkeeping. The front end
(:class:`arreg_jax.attacks.AutoAttack`) runs the same stages one after another over a whole data set, each on the
points still robust.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence
import warnings

import jax
import jax.numpy as jnp
from jax import lax

from arreg_jax.attacks import input_checks, noise
from arreg_jax.attacks.apgd import apgd_runs
from arreg_jax.attacks.apgd import runs_of as apgd_runs_of
from arreg_jax.attacks.fab import fab_runs
from arreg_jax.attacks.fab import runs_of as fab_runs_of
from arreg_jax.attacks.compiled import compiled_once
from arreg_jax.attacks.pgd import LogitsFn
from arreg_jax.attacks.square import square_masked

VERSIONS = ('standard', 'plus', 'custom')
# The stages, with the authors' names in their progress lines.
STAGE_LABELS = {'apgd_ce': 'APGD-CE', 'apgd_dlr': 'APGD-DLR', 'apgd_t': 'APGD-T', 'fab': 'FAB', 'fab_t': 'FAB-T',
                'square': 'Square'}
STAGE_NAMES = tuple(STAGE_LABELS)
_MIN_CLASSES = {'apgd_dlr': 3, 'apgd_t': 4}


class ReducedCascadeWarning(UserWarning):
  """AutoAttack dropped a stage or reduced its targets because the model has too few classes."""


@dataclasses.dataclass(frozen=True)
class Stage:
  """One attack of the cascade and its settings (hashable: a static part of the compiled program)."""
  name: str
  restarts: int = 1
  n_targets: int = 9
  steps: int = 100
  queries: int = 5000

  @property
  def label(self) -> str:
    return STAGE_LABELS[self.name]


def version_stages(version: str, *, attacks: Sequence[str] | None = None, steps: int = 100, n_targets: int = 9,
                   queries: int = 5000) -> tuple[Stage, ...]:
  """The stages of AutoAttack's ``version`` ('standard', 'plus', or 'custom' with ``attacks``), in order."""
  if version not in VERSIONS:
    raise ValueError(f'version must be one of {VERSIONS}, got {version!r}')
  kw = dict(steps=steps, n_targets=n_targets, queries=queries)
  if version == 'custom':
    if not attacks:
      raise ValueError(f"attacks must name the stages of version='custom' (from {STAGE_NAMES}), got {attacks!r}")
    bad = [a for a in attacks if a not in STAGE_LABELS]
    if bad:
      raise ValueError(f'attacks: unknown stage(s) {bad}; choose from {STAGE_NAMES}')
    return tuple(Stage(a, **kw) for a in attacks)
  if attacks:
    raise ValueError(f"attacks is only used with version='custom' (version={version!r} fixes its own)")
  if version == 'standard':
    return tuple(Stage(a, **kw) for a in ('apgd_ce', 'apgd_t', 'fab_t', 'square'))
  return (Stage('apgd_ce', restarts=5, **kw), Stage('apgd_dlr', restarts=5, **kw), Stage('fab', restarts=5, **kw),
          Stage('square', **kw), Stage('apgd_t', **kw), Stage('fab_t', **kw))


def plan(stages: Sequence[Stage], num_classes: int) -> tuple[tuple[tuple[int, Stage], ...], dict[str, str]]:
  """The stages a model with ``num_classes`` outputs can run: ``((index in the version, stage), …)`` and, per stage
  dropped or reduced, the reason."""
  kept, notes = [], {}
  for i, s in enumerate(stages):
    need = _MIN_CLASSES.get(s.name)
    if need and num_classes < need:
      loss = 'targeted DLR loss reads the 4' if s.name == 'apgd_t' else 'DLR loss reads the 3'
      notes[s.name] = f'not run: the {loss} largest logits and the model has {num_classes} classes'
      continue
    if s.name in ('apgd_t', 'fab_t') and s.n_targets > num_classes - 1:
      notes[s.name] = f'{num_classes - 1} target(s) instead of {s.n_targets}: the model has {num_classes} classes'
      s = dataclasses.replace(s, n_targets=num_classes - 1)
    kept.append((i, s))
  return tuple(kept), notes


def stage_runs(stage: Stage) -> tuple[tuple[bool, int], ...]:
  """The runs of ``stage`` as the authors' code makes them, each on the points every earlier run left robust:
  ``(random start, target index)`` per run — restarts (FAB's with a random start from the second on), then for the
  targeted stages one run per target (index j: the (j+2)-th largest clean logit) and restart."""
  if stage.name in ('apgd_t', 'fab_t'):
    return tuple((stage.name == 'fab_t' and r > 0, j) for j in range(stage.n_targets) for r in range(stage.restarts))
  if stage.name == 'square':
    return ((False, 0),)
  return tuple((stage.name == 'fab' and r > 0, 0) for r in range(stage.restarts))


def run_stage(stage: Stage, logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, eps,
              norm: str, active: jax.Array, layout: str = 'NHWC', *, one_run: bool | None = None,
              target=0) -> tuple[jax.Array, jax.Array]:
  """``stage`` on the points where ``active``: (images in float32, broken (B,) — active and misclassified at the
  returned image, which lies in the ε-ball).

  All of its runs one after another, or with ``one_run`` set (its random start) only the run of target index
  ``target`` (may be traced: one compiled run serves every target; :func:`stage_runs`).
  """
  x0 = images.astype(jnp.float32)
  targeted = stage.name in ('apgd_t', 'fab_t')
  part = {} if one_run is None else dict(n_ranks=stage.n_targets if targeted else 0, rank_shift=target)
  if stage.name.startswith('apgd'):
    loss = {'apgd_ce': 'ce', 'apgd_dlr': 'dlr', 'apgd_t': 'dlr_targeted'}[stage.name]
    runs = apgd_runs_of(loss, stage.restarts, stage.n_targets) if one_run is None else ((loss, int(targeted)),)
    out, _ = apgd_runs(logits_fn, images, labels, noise.example_keys(key, len(runs)), active, eps=eps, runs=runs,
                       norm=norm, steps=stage.steps, **part)
  elif stage.name.startswith('fab'):
    runs = (fab_runs_of(targeted, stage.n_targets, stage.restarts) if one_run is None
            else ((int(targeted), bool(one_run)),))
    out, broken, _ = fab_runs(logits_fn, images, labels, noise.example_keys(key, len(runs)), active, eps=eps,
                              runs=runs, norm=norm, steps=stage.steps, **part)
    return out, broken
  elif layout == 'NCHW':
    nhwc = lambda x: logits_fn(jnp.transpose(x, (0, 3, 1, 2)))
    out, _ = square_masked(nhwc, jnp.transpose(images, (0, 2, 3, 1)), labels, key, active, eps=eps, norm=norm,
                           queries=stage.queries, rescale=False)
    out = jnp.transpose(out, (0, 3, 1, 2))
  else:
    out, _ = square_masked(logits_fn, images, labels, key, active, eps=eps, norm=norm, queries=stage.queries,
                           rescale=False)
  broken = active & (jnp.argmax(logits_fn(out.astype(images.dtype)), -1) != labels)
  return jnp.where(broken.reshape((-1,) + (1,) * (x0.ndim - 1)), out, x0), broken


def _cascade(apply_fn, params, images, labels, key, eps, *, stages, norm, layout):
  logits_fn = lambda x: apply_fn(params, x)
  x_adv = images.astype(jnp.float32)
  robust = jnp.argmax(logits_fn(images), -1) == labels
  history = {'clean': robust}
  for i, stage in stages:

    def attack(carry, stage=stage, i=i):
      x_adv, robust = carry
      x_st, broken = run_stage(stage, logits_fn, images, labels, jax.random.fold_in(key, i), eps, norm, robust,
                               layout)
      return jnp.where(broken.reshape((-1,) + (1,) * (images.ndim - 1)), x_st, x_adv), robust & ~broken

    x_adv, robust = lax.cond(jnp.any(robust), attack, lambda c: c, (x_adv, robust))
    history[stage.name] = robust
  return lax.stop_gradient(x_adv).astype(images.dtype), history


_cascade_once = compiled_once(_cascade, ('apply_fn', 'stages', 'norm', 'layout'))


def autoattack(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *, eps,
               norm: str = 'linf', version: str = 'standard', return_history: bool = False, steps: int = 100,
               n_targets: int = 9, queries: int = 5000, attacks: Sequence[str] | None = None,
               layout: str = 'NHWC'):
  """AutoAttack's adversarial images on one batch, in one compiled program: per example the first stage's success.

  For whole data sets, with progress lines and a result, use :class:`arreg_jax.attacks.AutoAttack`.

  Args:
    logits_fn: ``images -> logits (N, K)``, or a model pair with ``apply_fn(params, images)`` and ``params``.
    images: float (N, H, W, C) in [0, 1] (``layout='NCHW'``: (N, C, H, W)).
    labels: int (N,) true classes in [0, K).
    key: a ``jax.random.key``; stage i uses ``fold_in(key, i)``.
    eps: radius, a scalar in (0, 1] (L∞) or > 0 (L2); may be traced.
    norm: 'linf' or 'l2' (also 'Linf', 'L2').
    version: 'standard', 'plus' or 'custom' (then ``attacks`` names the stages, from ``STAGE_NAMES``).
    return_history: also return ``{'clean', stage…: (N,) bool}``, the robust mask after each stage (in cascade
      order; the mean of a mask is the robust accuracy after that stage).
    steps, n_targets, queries: iterations of APGD and FAB, targets of APGD-T and FAB-T, queries of Square; the
      authors' 100, 9 and 5000 by default (static).
    layout: 'NHWC' or 'NCHW' (Square reads the spatial layout).

  Returns:
    Adversarial images (input shape and dtype), and with ``return_history`` the dict above. Stages the model's
    class count rules out are dropped with a :class:`ReducedCascadeWarning` (:func:`plan`).
  """
  norm, k = input_checks.check_attack_inputs(logits_fn, images, labels, eps, norm, rank=4)
  layout = input_checks.check_layout(images, layout)
  if jnp.ndim(eps) != 0:
    raise ValueError(f'eps must be a scalar for autoattack, got shape {jnp.shape(eps)}')
  stages = version_stages(version, attacks=attacks, steps=input_checks.static_int(steps, 'steps'),
                          n_targets=input_checks.static_int(n_targets, 'n_targets'),
                          queries=input_checks.static_int(queries, 'queries'))
  kept, notes = plan(stages, k)
  for name, why in notes.items():
    warnings.warn(f'AutoAttack on a {k}-class model: {STAGE_LABELS[name]} {why}', ReducedCascadeWarning,
                  stacklevel=2)
  apply_fn, params = input_checks.split_model(logits_fn)
  x_adv, history = _cascade_once(apply_fn, params, images, labels, key, eps, stages=kept, norm=norm, layout=layout)
  return (x_adv, history) if return_history else x_adv
