"""Robust accuracy of a trained model under a list of attacks, AutoAttack, and the checks that the robustness is real.

For any model (a ``logits_fn`` or a model pair ``apply_fn``/``params``), float test images in [0, 1] and ε:

* robust accuracy under each attack of :data:`arreg_jax.attacks.robust_accuracy.ATTACKS` (``fgsm``, ``pgd10``,
  ``pgd100``, ``apgd_ce``, ``apgd_t``, ``fab_t``, ``square``, …): the share of examples classified correctly both
  clean and at the attack's output (AutoAttack's convention); the paper's PGD accuracy over clean-correct points is
  ``acc / acc['clean']``;
* ``autoattack``: the authors' standard version (Croce & Hein, ICML 2020), APGD-CE → APGD-T → FAB-T → Square, run
  whenever the list names it or any of its stages (the missing stages are added). Each stage runs on every point
  and a point is robust when it survives all four — what the cascade computes, since every attack acts per example;
  the settings (targets, queries, examples) are recorded, and so is every reduction from the authors' (fewer targets
  or queries, a subset of the test set, stages a model with few classes cannot run);
* accuracy under PGD-10 at multiples of ε (monotone, ≈ 0 at a large ε);
* the gradient-masking checks of :mod:`arreg_jax.attacks.gradient_masking` (Carlini et al. 2019, §5), a verdict,
  and a :class:`~arreg_jax.attacks.GradientMaskingWarning` for each check that fails.

All attacks of the list run in one compiled program per batch, with ε traced: the same program serves every model
of a sweep that shares the architecture (pass a model pair whose ``apply_fn`` is the same object), and every ε.
The library part only: the experiment runner turns its uint8 data into float images before calling :func:`analyze`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np

from arreg_jax.attacks import cascade, gradient_masking, input_checks, robust_accuracy

AUTHORS = {'n_targets': 9, 'square_queries': 5000, 'iterations': 100}


def attack_plan(names: Sequence[str], num_classes: int, n_targets: int) -> tuple[tuple[str, ...], bool, dict]:
  """(the attacks to run, whether AutoAttack is computed from its stages, {attack: why not run or reduced}).

  AutoAttack is computed when ``names`` holds 'autoattack' or any of its stages; its missing stages are then run
  too. Stages a model with ``num_classes`` outputs cannot run are left out (:func:`arreg_jax.attacks.cascade.plan`).
  """
  wants_aa = 'autoattack' in names or any(n in robust_accuracy.AUTOATTACK_STAGES for n in names)
  run = [n for n in names if n != 'autoattack']
  run += [st for st in robust_accuracy.AUTOATTACK_STAGES if st not in run] if wants_aa else []
  kept, notes = cascade.plan([cascade.Stage(n, n_targets=n_targets) for n in run if n in cascade.STAGE_LABELS],
                             num_classes)
  kept_names = {st.name for _, st in kept}
  return tuple(n for n in run if n not in cascade.STAGE_LABELS or n in kept_names), wants_aa, notes


def analyze(model: Any, images, labels, *, settings: dict, key: jax.Array, mesh: jax.sharding.Mesh | None = None,
            population: int | None = None) -> dict[str, Any]:
  """The robustness section of one model's analysis.

  Args:
    model: ``logits_fn(images) -> logits``, or a model pair with ``apply_fn(params, images)`` and ``params``.
    images: float (N, H, W, C) test images in [0, 1] (NumPy); the first ``settings['examples']`` are evaluated.
    labels: int (N,) their classes.
    settings: ``attacks`` (names), ``eps``, ``examples`` (None: all), ``n_targets``, ``square_queries``,
      ``eps_grid`` (radii of the PGD-10 accuracy curve), ``check_examples``, ``batch_size`` (the runner's resolved
      ``config.eval.robustness``).
    key: a ``jax.random.key``.
    mesh: the devices to shard the batches over (default: every device).
    population: the size of the split ``images`` were taken from (recorded when only a subset is evaluated).

  Returns:
    ``{'eps', 'examples', 'accuracy': {'clean', attack…, 'autoattack'}, 'autoattack': {…settings, reductions},
    'attacks_not_run', 'accuracy_vs_eps', 'checks', 'strongest', 'verdict', 'real'}``.
  """
  s = settings
  n = int(min(s['examples'] or len(labels), len(labels)))
  total = max(int(population or 0), n)
  images, labels = np.asarray(images)[:n], np.asarray(labels)[:n]
  apply_fn, params = input_checks.split_model(model)
  _, k = input_checks.logits_shape(lambda x: apply_fn(params, x), images[:1])
  n_targets = int(s['n_targets'])
  run, wants_aa, notes = attack_plan([str(a) for a in s['attacks']], k, n_targets)
  common = dict(batch_size=s['batch_size'], mesh=mesh, n_targets=min(n_targets, k - 1),
                queries=int(s['square_queries']), warn=False)
  masks = robust_accuracy.robust_accuracies(model, images, labels, jax.random.fold_in(key, 0), eps=s['eps'],
                                            attacks=run, return_masks=True, **common)
  acc = {name: float(np.mean(m)) for name, m in masks.items()}
  aa = None
  if wants_aa:
    stages = [st for st in robust_accuracy.AUTOATTACK_STAGES if st in masks]
    acc['autoattack'] = float(np.mean(np.logical_and.reduce([masks[st] for st in stages])))
    aa = _autoattack_block(stages, notes, n_targets=min(n_targets, k - 1), queries=int(s['square_queries']),
                           examples=n, total=total)
  grid = {}
  for i, e in enumerate(s['eps_grid']):
    grid[e] = robust_accuracy.robust_accuracies(model, images, labels, jax.random.fold_in(key, 1 + i), eps=e,
                                                attacks=('pgd10',), **common)['pgd10']
  m = min(n, int(s['check_examples']))
  checks = gradient_masking.run_checks(model, images[:m], labels[:m].astype(np.int32), accuracies=acc,
                                       accuracy_vs_eps=grid)
  checks = {c: {'value': None if v['value'] is None else float(v['value']), 'passed': bool(v['passed']),
                'detail': v['detail']} for c, v in checks.items()}
  gradient_masking.warn_failed(checks, 'robustness analysis')
  failed = sorted(c for c, v in checks.items() if not v['passed'])
  strongest = min((a for a in acc if a != 'clean'), key=lambda a: acc[a])
  return {
      'eps': s['eps'], 'examples': n, 'accuracy': acc, 'autoattack': aa, 'attacks_not_run': notes,
      'accuracy_vs_eps': [[float(e), float(a)] for e, a in grid.items()], 'checks': checks,
      'strongest': strongest, 'verdict': 'no sign of gradient masking' if not failed else
      'suspicious: ' + ', '.join(failed), 'real': not failed,
  }


def _autoattack_block(stages, notes, *, n_targets, queries, examples, total) -> dict[str, Any]:
  """What 'autoattack' ran, and how it differs from the authors' standard version."""
  reduced = []
  targeted = ' and '.join(cascade.STAGE_LABELS[st] for st in stages if st in ('apgd_t', 'fab_t'))
  if targeted and n_targets < AUTHORS['n_targets']:
    reduced.append(f'{targeted} with {n_targets} target(s) instead of {AUTHORS["n_targets"]}')
  if queries < AUTHORS['square_queries']:
    reduced.append(f'Square with {queries} queries instead of {AUTHORS["square_queries"]}')
  if examples < total:
    reduced.append(f'the first {examples} of {total} test examples')
  reduced += [f'{cascade.STAGE_LABELS[k]} {v}' for k, v in notes.items() if k in cascade.STAGE_LABELS]
  return {'version': 'standard', 'stages': list(stages), 'n_targets': n_targets, 'square_queries': queries,
          'iterations': AUTHORS['iterations'], 'reduced': reduced}
