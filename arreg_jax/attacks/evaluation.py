"""Robust accuracy of a model under a list of named attacks, on test arrays, in fixed-size padded batches.

A point counts as robust under an attack if the model classifies it correctly both clean and at the attack's output
(AutoAttack's convention); the robust accuracy is the share of robust points among all points. The PGD accuracy of
the paper (Wen, Li & Jia, appendix D.2: among the clean-correct test points only) is ``acc[name] / acc['clean']``.

Every batch has ``batch_size`` examples (the last one padded with copies of the first example, which are weighted
out), so one compiled program serves the whole set; ``eps`` is an argument of that program, so a sweep over ε
compiles once. With a ``mesh`` the batch is split over its ``'data'`` axis (the attacks are per example, so this is
pure data parallelism).
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import sharding as sharding_lib
from arreg_jax.attacks.apgd import apgd
from arreg_jax.attacks.autoattack import autoattack
from arreg_jax.attacks.pgd import LogitsFn, fgsm, pgd
from arreg_jax.attacks.square import square

DEFAULT_ATTACKS = ('pgd10', 'apgd_ce', 'apgd_t', 'square', 'autoattack')


def attack_fn(name: str, *, norm: str = 'linf') -> Callable:
  """The attack ``name`` as ``(logits_fn, images, labels, key, eps) -> adversarial images``.

  'fgsm'; 'pgd10': 10 steps of ε/4 (2/255 at ε = 8/255, the paper's PGD); 'pgd100': 100 steps of 2.5ε/100 (Madry
  et al.); 'apgd_ce', 'apgd_dlr': APGD, 100 iterations; 'apgd_t': APGD on the targeted DLR, 9 targets; 'square':
  5000 queries (L∞ only); 'autoattack', 'autoattack_fast': AutoAttack's 'standard' and 'fast' versions.
  """
  table = {
      'fgsm': lambda f, x, y, k, e: fgsm(f, x, y, k, eps=e, norm=norm),
      'pgd10': lambda f, x, y, k, e: pgd(f, x, y, k, eps=e, step_size=e / 4, steps=10, norm=norm),
      'pgd100': lambda f, x, y, k, e: pgd(f, x, y, k, eps=e, step_size=2.5 * e / 100, steps=100, norm=norm),
      'apgd_ce': lambda f, x, y, k, e: apgd(f, x, y, k, eps=e, norm=norm, loss='ce'),
      'apgd_dlr': lambda f, x, y, k, e: apgd(f, x, y, k, eps=e, norm=norm, loss='dlr'),
      'apgd_t': lambda f, x, y, k, e: apgd(f, x, y, k, eps=e, norm=norm, loss='dlr_targeted'),
      'square': lambda f, x, y, k, e: square(f, x, y, k, eps=e),
      'autoattack': lambda f, x, y, k, e: autoattack(f, x, y, k, eps=e, norm=norm),
      'autoattack_fast': lambda f, x, y, k, e: autoattack(f, x, y, k, eps=e, norm=norm, version='fast'),
  }
  if name not in table:
    raise ValueError(f'unknown attack {name!r}; choose from {sorted(table)}')
  return table[name]


def robust_masks(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, eps, *,
                 attacks: Sequence[str], norm: str = 'linf', attack_fns=None) -> dict[str, jax.Array]:
  """Per-example robustness (B,) bool: 'clean' (correct) and, per attack, correct clean and at its output.

  ``attack_fns`` (optional) maps further names to callables of :func:`attack_fn`'s signature. Pure and jit-able.
  """
  correct = lambda x: jnp.argmax(logits_fn(x), -1) == labels
  clean = correct(images)
  out = {'clean': clean}
  for j, name in enumerate(attacks):
    fn = (attack_fns or {}).get(name) or attack_fn(name, norm=norm)
    out[name] = clean & correct(fn(logits_fn, images, labels, jax.random.fold_in(key, j), eps))
  return out


def robust_accuracies(logits_fn: LogitsFn, images, labels, key: jax.Array, *, eps, attacks=DEFAULT_ATTACKS,
                      batch_size: int, mesh=None, norm: str = 'linf', attack_fns=None) -> dict[str, float]:
  """Robust accuracy (a share in [0, 1]) of ``logits_fn`` under each attack, plus 'clean', over all ``images``.

  Batch i uses the key ``fold_in(key, i)``. ``images`` (N, H, W, C) in [0, 1] and ``labels`` (N,) may be NumPy.
  """
  images, labels = np.asarray(images), np.asarray(labels)
  n = len(labels)
  if n == 0:
    raise ValueError('robust_accuracies needs at least one example')
  kwargs = {}
  if mesh is not None:
    sharding_lib.check_divisible(batch_size, mesh, 'batch_size')
    data, rep = sharding_lib.batch_sharding(mesh), sharding_lib.replicated(mesh)
    kwargs = dict(in_shardings=(data, data, data, rep, rep), out_shardings=rep)

  @functools.partial(jax.jit, **kwargs)
  def batch_counts(x, y, weight, k, e):
    masks = robust_masks(logits_fn, x, y, k, e, attacks=attacks, norm=norm, attack_fns=attack_fns)
    return {name: jnp.sum(m * weight) for name, m in masks.items()}

  totals = None
  for i, start in enumerate(range(0, n, batch_size)):
    idx = np.arange(start, start + batch_size)
    weight = (idx < n).astype(np.float32)
    idx = np.where(idx < n, idx, 0)
    counts = batch_counts(images[idx], labels[idx], weight, jax.random.fold_in(key, i), jnp.float32(eps))
    counts = sharding_lib.to_host(counts)
    totals = counts if totals is None else {k: totals[k] + counts[k] for k in totals}
  return {k: float(v) / n for k, v in totals.items()}
