"""Robust accuracy of a model under a list of named attacks, over a whole data set, in one compiled program.

A point counts as robust under an attack if the model classifies it correctly both clean and at the attack's output
(AutoAttack's convention); the robust accuracy is the share of robust points among all points. The PGD accuracy of
the paper (Wen, Li & Jia, appendix D.2: among the clean-correct test points only) is ``acc[name] / acc['clean']``.

:data:`ATTACKS` is the registry of named attacks (the runner's ``config.eval.robustness.attacks`` takes its names).
Every attack of the list runs on every point (not as a cascade), so the table shows each attack's own strength;
'autoattack' is the authors' standard cascade. Because every attack here acts per example, a point survives the
cascade exactly when it survives each of its stages run alone with the stage's key.

Compiled once: the batches go through :func:`arreg_jax.sharding.map_batches` (fixed-size padded batches sharded over
the mesh's ``'data'`` axis), and the per-batch program is one ``jax.jit`` keyed on the model function, the attack
list, the norm and the settings — ε, the key and a model pair's parameters are traced, so a second call, another ε
or new weights of the same architecture compile nothing (:mod:`arreg_jax.attacks.compiled` says how to keep the
model function the same object).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import sharding
from arreg_jax.attacks import gradient_masking, input_checks
from arreg_jax.attacks.apgd import apgd
from arreg_jax.attacks.cascade import autoattack
from arreg_jax.attacks.fab import fab
from arreg_jax.attacks.pgd import LogitsFn, fgsm, pgd
from arreg_jax.attacks.square import square

# name -> (what it runs, build(norm, n_targets, queries) -> attack(logits_fn, images, labels, key, eps)).
ATTACKS: dict[str, tuple[str, Callable[..., Callable]]] = {
    'fgsm': ('FGSM (Goodfellow et al. 2015), one step of ε',
             lambda norm, t, q: lambda f, x, y, k, e: fgsm(f, x, y, k, eps=e, norm=norm)),
    'pgd10': ('PGD-10, steps of ε/4 (2/255 at ε = 8/255, the paper\'s PGD), random start',
              lambda norm, t, q: lambda f, x, y, k, e: pgd(f, x, y, k, eps=e, step_size=e / 4, steps=10, norm=norm)),
    'pgd100': ('PGD-100, steps of 2.5ε/100 (Madry et al.), random start',
               lambda norm, t, q: lambda f, x, y, k, e: pgd(f, x, y, k, eps=e, step_size=2.5 * e / 100, steps=100,
                                                            norm=norm)),
    'apgd_ce': ('APGD-CE, 100 iterations',
                lambda norm, t, q: lambda f, x, y, k, e: apgd(f, x, y, k, eps=e, norm=norm, loss='ce')),
    'apgd_dlr': ('APGD-DLR, 100 iterations (K ≥ 3)',
                 lambda norm, t, q: lambda f, x, y, k, e: apgd(f, x, y, k, eps=e, norm=norm, loss='dlr')),
    'apgd_t': ('APGD-T, targeted DLR, 100 iterations per target (K ≥ 4)',
               lambda norm, t, q: lambda f, x, y, k, e: apgd(f, x, y, k, eps=e, norm=norm, loss='dlr_targeted',
                                                             n_targets=t)),
    'fab_t': ('FAB-T, 100 iterations per target',
              lambda norm, t, q: lambda f, x, y, k, e: fab(f, x, y, k, eps=e, norm=norm, n_targets=t)),
    'square': ('Square Attack, the p schedule of AutoAttack (not rescaled to the query budget)',
               lambda norm, t, q: lambda f, x, y, k, e: square(f, x, y, k, eps=e, norm=norm, queries=q,
                                                               rescale=False)),
    'autoattack': ('AutoAttack, standard version: APGD-CE → APGD-T → FAB-T → Square',
                   lambda norm, t, q: lambda f, x, y, k, e: autoattack(f, x, y, k, eps=e, norm=norm, n_targets=t,
                                                                       queries=q)),
}
ATTACK_NAMES = tuple(ATTACKS)
DEFAULT_ATTACKS = ('pgd10', 'autoattack')
# The stages of AutoAttack's standard version that run as attacks of their own here.
AUTOATTACK_STAGES = ('apgd_ce', 'apgd_t', 'fab_t', 'square')


def attack_fn(name: str, *, norm: str = 'linf', n_targets: int = 9, queries: int = 5000) -> Callable:
  """The attack ``name`` of :data:`ATTACKS` as ``(logits_fn, images, labels, key, eps) -> adversarial images``;
  ``n_targets`` for APGD-T, FAB-T and AutoAttack, ``queries`` for Square and AutoAttack."""
  if name not in ATTACKS:
    raise ValueError(f'attacks: unknown attack {name!r}; choose from {ATTACK_NAMES}')
  return ATTACKS[name][1](input_checks.norm_name(norm), n_targets, queries)


def robust_masks(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, eps, *,
                 attacks: Sequence[str], norm: str = 'linf', n_targets: int = 9,
                 queries: int = 5000) -> dict[str, jax.Array]:
  """Per-example robustness (B,) bool: 'clean' (correct) and, per attack, correct clean and at its output; attack j
  uses ``fold_in(key, j)``. Pure and jit-able (one batch)."""
  correct = lambda x: jnp.argmax(logits_fn(x), -1) == labels
  clean = correct(images)
  out = {'clean': clean}
  for j, name in enumerate(attacks):
    fn = attack_fn(name, norm=norm, n_targets=n_targets, queries=queries)
    out[name] = clean & correct(fn(logits_fn, images, labels, jax.random.fold_in(key, j), eps))
  return out


def _batch_masks(params, images, labels, mask, key_data, eps, *, apply_fn, attacks, norm, n_targets, queries):
  del mask  # padded rows are dropped by map_batches
  logits_fn = lambda x: apply_fn(params, x)
  return robust_masks(logits_fn, images, labels, jax.random.wrap_key_data(key_data), eps, attacks=attacks,
                      norm=norm, n_targets=n_targets, queries=queries)


_batch_masks_program = jax.jit(_batch_masks, static_argnames=('apply_fn', 'attacks', 'norm', 'n_targets', 'queries'))


def robust_accuracies(logits_fn: Any, images, labels, key: jax.Array, *, eps, attacks: Sequence[str] = DEFAULT_ATTACKS,
                      batch_size: int = 250, mesh: jax.sharding.Mesh | None = None, norm: str = 'linf',
                      n_targets: int = 9, queries: int = 5000, limit: int | None = None,
                      return_masks: bool = False, warn: bool = True) -> dict[str, Any]:
  """Robust accuracy (a share in [0, 1]) of the model under each attack, plus 'clean', over all ``images``.

  Args:
    logits_fn: ``images -> logits (N, K)``, or a model pair with ``apply_fn(params, images)`` and ``params`` (the
      parameters are then traced: other weights of the same architecture reuse the compiled program).
    images: float (N, ...) in [0, 1], NumPy or JAX (NHWC for Square and AutoAttack).
    labels: int (N,) true classes in [0, K).
    key: a ``jax.random.key``; batch i uses ``fold_in(key, i)``.
    eps: radius, in (0, 1] (L∞) or > 0 (L2); traced, so a sweep over ε compiles once.
    attacks: names from :data:`ATTACK_NAMES`.
    batch_size: the most examples per compiled call (rounded to the mesh's device count; the batches are sized to
      cover the data with the least padding, :func:`arreg_jax.sharding.map_batches`).
    mesh: the devices to shard the batches over (default: every device, :func:`arreg_jax.sharding.make_mesh`).
    norm: 'linf' or 'l2' (also 'Linf', 'L2').
    n_targets: targets of APGD-T, FAB-T and AutoAttack (at most K − 1); queries: Square's query budget.
    limit: evaluate only the first ``limit`` examples.
    return_masks: return the per-example robust masks (N,) bool instead of their means.
    warn: warn (:class:`arreg_jax.attacks.GradientMaskingWarning`) when accuracy rises from a weaker attack to a
      stronger one.

  Returns:
    ``{'clean': acc, name: acc, …}`` (or the masks).
  """
  attacks = tuple(attacks)
  for name in attacks:
    if name not in ATTACKS:
      raise ValueError(f'attacks: unknown attack {name!r}; choose from {ATTACK_NAMES}')
  norm = input_checks.norm_name(norm)
  apply_fn, params = input_checks.split_model(logits_fn)
  images = np.asarray(images) if not isinstance(images, jax.Array) else images
  input_checks.check_images(images)
  input_checks.check_eps(eps, norm)
  _, k = input_checks.logits_shape(lambda x: apply_fn(params, x), images[:1])
  input_checks.check_labels(labels, images.shape[0], k)
  if input_checks.is_local(params):
    input_checks.warn_if_probabilities(apply_fn(params, jnp.asarray(images[:8])))
  batch_size = input_checks.static_int(batch_size, 'batch_size')
  kernel = functools.partial(_batch_masks_program, apply_fn=apply_fn, attacks=attacks, norm=norm,
                             n_targets=input_checks.static_int(n_targets, 'n_targets'),
                             queries=input_checks.static_int(queries, 'queries'))
  out = sharding.map_batches(kernel, params, np.asarray(images), np.asarray(labels), batch_size=batch_size,
                             mesh=mesh or sharding.make_mesh(), limit=limit, extra=(np.float32(eps),), batch_key=key)
  out = {name: np.asarray(v, bool) for name, v in out.items()}
  acc = {name: float(np.mean(v)) for name, v in out.items()}
  if warn:
    gradient_masking.warn_failed({'attack_ordering': gradient_masking.attack_ordering(acc)}, 'robust_accuracies')
  return out if return_masks else acc
