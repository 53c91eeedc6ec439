"""Gradient-masking checks, as pure functions returning ``{check: {'value', 'passed', 'detail'}}``; the evaluations
(:class:`arreg_jax.attacks.AutoAttack`, :func:`arreg_jax.attacks.robust_accuracies`, the runner's analysis) run them
and warn (:class:`GradientMaskingWarning`) with the reason when one fails.

From Carlini et al., "On evaluating adversarial robustness" (2019), §5 "Basic sanity tests", and the checks the
AutoAttack authors run (Croce & Hein, ICML 2020; their ``checks.py``):

* ``attack_ordering`` — accuracy does not rise along FGSM → PGD-10 → PGD-100 → APGD-CE → AutoAttack (stronger
  attacks find at least what weaker ones find);
* ``eps_monotone`` — accuracy vs ε is non-increasing and reaches ≈ 0 at a large ε (an unbounded attack must win);
* ``square_vs_whitebox`` — the black-box Square Attack is not more than 0.2 points (0.002) below the best
  white-box accuracy (if it is, gradients mislead the white-box attacks);
* ``deterministic`` — repeated forward passes give the same normalized logits (no randomized defense);
* ``zero_gradients`` — the share of examples whose input gradient of the cross-entropy is exactly zero at the clean
  point (masked or shattered gradients, e.g. through rounding or ``stop_gradient``).

Accuracies are the dicts of :func:`arreg_jax.attacks.robust_accuracies` (shares in [0, 1]).
"""

from __future__ import annotations

from typing import Mapping, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from arreg_jax.attacks import input_checks
from arreg_jax.attacks.pgd import LogitsFn, cross_entropy_sum

ORDER = ('fgsm', 'pgd10', 'pgd100', 'apgd_ce', 'autoattack')
WHITE_BOX = ('fgsm', 'pgd10', 'pgd100', 'apgd_ce', 'apgd_dlr', 'apgd_t', 'fab_t')


class GradientMaskingWarning(UserWarning):
  """A cheap check suggests the gradients mislead the attacks: the robust accuracy may be overestimated."""


def _result(value, passed, detail):
  return {'value': value, 'passed': bool(passed), 'detail': detail}


def attack_ordering(accuracies: Mapping[str, float], order: Sequence[str] = ORDER, tol: float = 0.0) -> dict:
  """Passed iff acc[a_{i+1}] ≤ acc[a_i] + tol along ``order`` (names missing from ``accuracies`` are skipped);
  value: the largest rise."""
  seq = [(k, accuracies[k]) for k in order if k in accuracies]
  rises = [(b[1] - a[1], a[0], b[0]) for a, b in zip(seq, seq[1:])]
  worst = max(rises, default=(0.0, None, None))
  detail = ' → '.join(f'{k} {v:.4f}' for k, v in seq)
  if worst[0] > tol:
    detail += f'; accuracy rises by {worst[0]:.4f} from {worst[1]} to {worst[2]}'
  return _result(float(max(worst[0], 0.0)), worst[0] <= tol, detail)


def eps_monotone(accuracy_vs_eps: Mapping[float, float], tol: float = 0.0, zero_at_max: float = 0.01) -> dict:
  """Passed iff accuracy is non-increasing in ε (up to ``tol``) and ≤ ``zero_at_max`` at the largest ε;
  value: the accuracy at the largest ε."""
  eps = sorted(accuracy_vs_eps)
  accs = [accuracy_vs_eps[e] for e in eps]
  rise = max((b - a for a, b in zip(accs, accs[1:])), default=0.0)
  detail = ', '.join(f'ε={e:.4g}: {a:.4f}' for e, a in zip(eps, accs))
  ok_mono, ok_zero = rise <= tol, accs[-1] <= zero_at_max
  if not ok_mono:
    detail += f'; accuracy rises by {rise:.4f} with ε'
  if not ok_zero:
    detail += f'; accuracy at the largest ε is {accs[-1]:.4f} > {zero_at_max}'
  return _result(float(accs[-1]), ok_mono and ok_zero, detail)


def square_vs_whitebox(accuracies: Mapping[str, float], tol: float = 0.002, white_box=WHITE_BOX) -> dict:
  """Passed iff acc[square] ≥ min over white-box attacks − ``tol``; value: that minimum − acc[square]."""
  wb = {k: accuracies[k] for k in white_box if k in accuracies}
  if 'square' not in accuracies or not wb:
    return _result(None, True, 'not run: needs square and at least one white-box accuracy')
  best = min(wb, key=wb.get)
  gap = wb[best] - accuracies['square']
  return _result(float(gap), gap <= tol,
                 f'square {accuracies["square"]:.4f} vs best white-box {best} {wb[best]:.4f}')


def deterministic(logits_fn: LogitsFn, images: jax.Array, n: int = 5, tol: float = 1e-4) -> dict:
  """Passed iff ``n`` forward passes agree: predictions equal and ‖z/‖z‖ − z'/‖z'‖‖₂ ≤ ``tol`` per example;
  value: the largest such distance. The model is called as given (not jitted here), as the user calls it."""
  apply_fn, params = input_checks.split_model(logits_fn)
  outs = [np.asarray(apply_fn(params, images), np.float64) for _ in range(n)]
  outs = [o / (np.linalg.norm(o, axis=-1, keepdims=True) + 1e-10) for o in outs]
  diff = max((float(np.linalg.norm(a - b, axis=-1).max()) for i, a in enumerate(outs) for b in outs[i + 1:]),
             default=0.0)
  same_pred = all((np.argmax(o, -1) == np.argmax(outs[0], -1)).all() for o in outs)
  return _result(diff, same_pred and diff <= tol, f'{n} forward passes; largest normalized-logit distance {diff:.3g}')


def _zero_gradient_rows(params, images, labels, *, apply_fn):
  g = jax.grad(lambda x: cross_entropy_sum(lambda z: apply_fn(params, z), x, labels))(images)
  return jnp.all(g.reshape(g.shape[0], -1) == 0, axis=-1)


_zero_gradient_program = jax.jit(_zero_gradient_rows, static_argnames=('apply_fn',))


def zero_gradients(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, max_share: float = 0.0) -> dict:
  """Passed iff the share of examples with ∇ₓ CE(f(x), y) = 0 (all entries) is ≤ ``max_share``; value: the share.
  One compiled program per model function (the parameters of a model pair are traced)."""
  apply_fn, params = input_checks.split_model(logits_fn)
  zero = np.asarray(_zero_gradient_program(params, jnp.asarray(images), jnp.asarray(labels), apply_fn=apply_fn))
  share = float(zero.mean())
  return _result(share, share <= max_share, f'{int(zero.sum())} of {len(zero)} examples have a zero input gradient')


def run_checks(logits_fn: LogitsFn, images: jax.Array, labels: jax.Array, *,
               accuracies: Mapping[str, float] | None = None,
               accuracy_vs_eps: Mapping[float, float] | None = None) -> dict:
  """All checks whose inputs are given: the model checks always, the accuracy checks from the dicts given."""
  out = {'deterministic': deterministic(logits_fn, images),
         'zero_gradients': zero_gradients(logits_fn, images, labels)}
  if accuracies is not None:
    out['attack_ordering'] = attack_ordering(accuracies)
    out['square_vs_whitebox'] = square_vs_whitebox(accuracies)
  if accuracy_vs_eps is not None:
    out['eps_monotone'] = eps_monotone(accuracy_vs_eps)
  return out


WHAT_FAILED = {'attack_ordering': 'robust accuracy rises from a weaker to a stronger attack',
               'eps_monotone': 'robust accuracy does not fall to ≈ 0 as ε grows',
               'square_vs_whitebox': 'the gradient-free Square Attack beats the gradient-based attacks',
               'deterministic': 'the forward pass is random (use an attack with expectation over transformation)',
               'zero_gradients': 'some examples have a zero input gradient (masked or shattered gradients)'}


def warn_failed(checks: Mapping[str, dict], where: str = 'evaluation') -> list[str]:
  """Warns (:class:`GradientMaskingWarning`) once per failed check, naming the reason; returns the messages."""
  out = []
  for name, c in checks.items():
    if not c['passed']:
      msg = (f'{where}: possible gradient masking — {WHAT_FAILED.get(name, name)} ({c["detail"]}); the robust '
             'accuracy may be overestimated (Carlini et al. 2019, §5)')
      warnings.warn(msg, GradientMaskingWarning, stacklevel=2)
      out.append(msg)
  return out
