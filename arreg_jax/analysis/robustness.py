"""Robust accuracy of a trained model under a list of attacks, and the checks that the robustness is real.

For a model, a test subset and ε (``config.eval.robustness``):

* robust accuracy under each attack of :mod:`arreg_jax.attacks.evaluation` (``fgsm``, ``pgd10``, ``pgd100``,
  ``apgd_ce``, ``apgd_t``, ``square``, …): the share of examples classified correctly both clean and at the attack's
  output (AutoAttack's convention), and ``autoattack`` — the per-example worst case of APGD-CE, APGD-T and Square
  (Croce & Hein, ICML 2020: the cascade's result, each attack run on every point; with FAB-T not built, that is
  AutoAttack's 'standard' version); the paper's PGD accuracy over clean-correct points is ``acc / acc['clean']``;
* accuracy under PGD-10 at multiples of ε (monotone, ≈ 0 at a large ε);
* the gradient-masking checks of :mod:`arreg_jax.attacks.sanity_checks` (Carlini et al. 2019, §5) and a verdict.

Every attack of the list runs in one compiled program per batch (:func:`make_kernel`), with ε traced: the same
program serves every model of a sweep that shares the architecture, and every ε of the grid.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax import attacks as attacks_lib
from arreg_jax import sharding
from arreg_jax.attacks import evaluation, sanity_checks
from arreg_jax.data import augment

AUTOATTACK_PARTS = ('apgd_ce', 'apgd_t', 'square')


def _attack_fns(n_targets: int, square_queries: int, norm: str) -> dict:
  return {
      'apgd_t': lambda f, x, y, k, e: attacks_lib.apgd(f, x, y, k, eps=e, norm=norm, loss='dlr_targeted',
                                                       n_targets=n_targets),
      'square': lambda f, x, y, k, e: attacks_lib.square(f, x, y, k, eps=e, queries=square_queries),
  }


@functools.lru_cache(maxsize=None)
def make_kernel(module, augment_kind: str, attack_names: tuple[str, ...], *, norm: str = 'linf', n_targets: int = 9,
                square_queries: int = 5000):
  """Jitted ``(variables, images_uint8, labels, mask, key_data, eps) -> {'clean': (B,) bool, name: (B,) bool}``."""
  fns = _attack_fns(n_targets, square_queries, norm)

  def kernel(variables, images, labels, mask, key_data, eps):
    del mask
    key = jax.random.wrap_key_data(key_data)
    x = augment.preprocess(None, images, kind=augment_kind, train=False)
    logits_fn = lambda z: module.apply(variables, z, train=False)
    return evaluation.robust_masks(logits_fn, x, labels, key, eps, attacks=attack_names, norm=norm, attack_fns=fns)

  return jax.jit(kernel)


def robust_accuracies(module, variables, images, labels, *, augment_kind: str, attack_names: Sequence[str], eps: float,
                      key, batch_size: int, mesh, limit: int | None, **kernel_kw) -> dict[str, float]:
  """``{'clean', name…, ['autoattack']}`` robust accuracies (shares) over the first ``limit`` examples."""
  kernel = make_kernel(module, augment_kind, tuple(attack_names), **kernel_kw)
  out = sharding.map_batches(kernel, variables, images, labels, batch_size=batch_size, mesh=mesh, limit=limit,
                             extra=(np.float32(eps),), batch_key=key)
  if all(p in out for p in AUTOATTACK_PARTS):
    out['autoattack'] = np.logical_and.reduce([out[p] for p in AUTOATTACK_PARTS])
  return {k: float(np.mean(v)) for k, v in out.items()}


def evaluate(module, variables, images, labels, *, settings: dict, augment_kind: str, key, mesh) -> dict[str, Any]:
  """The robustness section of one run's analysis (``settings``: the resolved ``config.eval.robustness``)."""
  s = settings
  common = dict(augment_kind=augment_kind, batch_size=s['batch_size'], mesh=mesh, limit=s['examples'])
  acc = robust_accuracies(module, variables, images, labels, attack_names=s['attacks'], eps=s['eps'],
                          key=jax.random.fold_in(key, 0), n_targets=s['n_targets'],
                          square_queries=s['square_queries'], **common)
  grid = {}
  for i, e in enumerate(s['eps_grid']):
    grid[e] = robust_accuracies(module, variables, images, labels, attack_names=('pgd10',), eps=e,
                                key=jax.random.fold_in(key, 1 + i), **common)['pgd10']
  n = min(s['examples'] or len(labels), len(labels), s['check_examples'])
  x = augment.preprocess(None, jnp.asarray(images[:n]), kind=augment_kind, train=False)
  logits_fn = jax.jit(lambda z: module.apply(variables, z, train=False))
  checks = sanity_checks.sanity_checks(logits_fn, x, jnp.asarray(labels[:n], jnp.int32), accuracies=acc,
                                       accuracy_vs_eps=grid)
  checks = {k: {'value': float(v['value']), 'passed': bool(v['passed']), 'detail': v['detail']}
            for k, v in checks.items()}
  failed = sorted(k for k, v in checks.items() if not v['passed'])
  strongest = min((k for k in acc if k != 'clean'), key=lambda k: acc[k])
  return {
      'eps': s['eps'], 'examples': int(min(s['examples'] or len(labels), len(labels))), 'accuracy': acc,
      'accuracy_vs_eps': [[float(e), float(a)] for e, a in grid.items()], 'checks': checks,
      'strongest': strongest, 'verdict': 'no sign of gradient masking' if not failed else
      'suspicious: ' + ', '.join(failed), 'real': not failed,
  }
