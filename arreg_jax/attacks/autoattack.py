"""AutoAttack (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse parameter-free
attacks", ICML 2020): a cascade of attacks, each run only on the points every earlier attack left robust; the result
is per example the first adversarial point found, so its robust accuracy is that of the per-example worst case.

Versions (as the authors' ``set_version``, L∞ / L2):
* 'standard': APGD-CE (100 iterations, 1 restart), APGD-T (targeted DLR, 9 targets, 1 restart each), Square (5000
  queries, the 10000-query p-schedule not rescaled, L∞ only). FAB-T of the authors' standard version is not
  implemented here, so 'standard' is the authors' cascade without FAB-T.
* 'fast': APGD-CE + APGD-T.

Design: one program, static shapes. The cascade carries a per-example ``robust`` mask (B,); every attack gets the
whole batch plus the mask and changes only the masked points. APGD-CE and APGD-T are one sequence of 1 + 9 APGD runs
(one compiled loop; the loss is chosen per run), each run skipped (``lax.cond``) when no masked point is left robust;
Square is skipped the same way and its query loop stops once every masked point is broken. Robustness after each
attack is "correct when clean and not broken by any attack so far", the authors' bookkeeping (``robust_flags``);
running an attack on the whole batch instead of gathering the robust points costs compute on broken points but keeps
one compiled shape (and batches sharded over a mesh stay as they are).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jax import lax

from arreg_jax.attacks.apgd import apgd_runs, run_keys, runs_of
from arreg_jax.attacks.pgd import LogitsFn, _check
from arreg_jax.attacks.square import square_masked

VERSIONS = ('standard', 'fast')


def autoattack(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, key: jax.Array, *, eps,
               norm: str = 'linf', version: str = 'standard', return_history: bool = False, steps: int = 100,
               n_targets: int = 9, queries: int = 5000):
  """AutoAttack's adversarial images (input shape and dtype): per example the first attack's success, else clean.

  With ``return_history`` also a dict name → robust mask (B,) bool after that stage, in cascade order:
  'clean' (correctly classified), then 'apgd_ce', 'apgd_t' and (standard, L∞) 'square'; the mean of a mask is the
  robust accuracy after that attack. ``steps``, ``n_targets``, ``queries`` default to the authors' values.
  The stages use the keys fold_in(key, 0), fold_in(key, 1), fold_in(key, 2): with those keys, ``apgd(loss='ce')``,
  ``apgd(loss='dlr_targeted')`` and ``square(rescale=False)`` run alone give each point the same attack as here.
  """
  _check(images, labels, norm)
  chex.assert_rank(jnp.asarray(eps), 0)
  if version not in VERSIONS:
    raise ValueError(f'unknown AutoAttack version {version!r}; choose one of {VERSIONS}')
  x0 = images.astype(jnp.float32)
  misclassified = lambda x: jnp.argmax(logits_fn(x.astype(images.dtype)), -1) != labels
  robust = ~misclassified(images)
  history = {'clean': robust}
  # APGD-CE and APGD-T are one sequence of 1 + n_targets APGD runs (one compiled loop, the loss chosen per run).
  runs = runs_of('ce') + runs_of('dlr_targeted', 1, n_targets)
  keys = jnp.concatenate([run_keys(jax.random.fold_in(key, 0), 1), run_keys(jax.random.fold_in(key, 1), n_targets)])
  x_apgd, done = apgd_runs(logits_fn, images, labels, keys, robust, eps=eps, runs=runs, norm=norm, steps=steps)
  history['apgd_ce'] = robust & ~done[0]
  # As the authors: a point counts as broken only if the model misclassifies the returned image.
  broken = robust & done[-1] & misclassified(x_apgd)
  x_adv = jnp.where(broken[:, None, None, None], x_apgd, x0)
  robust = robust & ~broken
  history['apgd_t'] = robust
  if version == 'standard' and norm == 'linf':

    def run_square(carry):
      x_adv, robust = carry
      x_sq, _ = square_masked(logits_fn, images, labels, jax.random.fold_in(key, 2), robust, eps=eps,
                              queries=queries, rescale=False)
      broken = robust & misclassified(x_sq)
      return jnp.where(broken[:, None, None, None], x_sq, x_adv), robust & ~broken

    x_adv, robust = lax.cond(jnp.any(robust), run_square, lambda c: c, (x_adv, robust))
    history['square'] = robust
  x_adv = lax.stop_gradient(x_adv).astype(images.dtype)
  return (x_adv, history) if return_history else x_adv
