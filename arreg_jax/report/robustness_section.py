"""The report's robustness sections: robust accuracy under every attack run, claim 2 under the strongest attack,
and "Is the robustness real?" — a verdict per model from the gradient-masking checks.

Reads the ``robustness`` entry of each run's ``analysis.json`` (:mod:`arreg_jax.analysis.robustness`).
"""

from __future__ import annotations

from typing import Sequence

from arreg_jax.report import claims as claims_lib
from arreg_jax.report import tables

COLUMNS = (('clean', 'clean'), ('fgsm', 'FGSM'), ('pgd10', 'PGD-10'), ('pgd100', 'PGD-100'), ('apgd_ce', 'APGD-CE'),
           ('apgd_dlr', 'APGD-DLR'), ('apgd_t', 'APGD-T'), ('fab_t', 'FAB-T'), ('square', 'Square'),
           ('autoattack', 'AutoAttack'))
CHECKS = {'attack_ordering': 'accuracy does not rise from weaker to stronger attacks',
          'eps_monotone': 'accuracy falls with ε and reaches ≈ 0 at a large ε',
          'square_vs_whitebox': 'gradient-free Square not > 0.2 points below the white-box attacks',
          'deterministic': 'the forward pass is deterministic',
          'zero_gradients': 'no example has a zero input gradient at the clean point'}


def section(analyses: Sequence[dict]) -> str:
  """Markdown for the runs (sorted by AR strength) whose analysis has a ``robustness`` entry; '' if none has."""
  runs = sorted((a for a in analyses if a.get('robustness')), key=lambda a: a['strength'])
  if not runs:
    return ''
  r0 = runs[0]['robustness']
  cols = [(k, label) for k, label in COLUMNS if all(k in a['robustness']['accuracy'] for a in runs)]
  out = ['## Robust accuracy — PGD-10 and AutoAttack\n',
         f'Accuracy (%) on the first {r0["examples"]} test examples at L∞ ε = {r0["eps"]:g}: a point counts when it is '
         'classified correctly both clean and after the attack (AutoAttack\'s convention; the paper\'s PGD accuracy '
         'above is over clean-correct points only).' + _autoattack_text(r0) + '\n']
  rows = [[f'{a["strength"]:g}'] + [f'{100 * a["robustness"]["accuracy"][k]:.2f}' for k, _ in cols] for a in runs]
  out.append(tables.md_table(['AR'] + [label for _, label in cols], rows))
  attacked = [k for k, _ in reversed(cols) if k != 'clean']  # ties go to the stronger attack
  strongest = min(attacked, key=lambda k: sum(a['robustness']['accuracy'][k] for a in runs))
  t = claims_lib.trend([a['strength'] for a in runs], [a['robustness']['accuracy'][strongest] for a in runs])
  verdict = 'holds' if t['direction'] == 'rises' else 'does not hold'
  rho = 'ρ undefined (constant)' if t['rho'] != t['rho'] else f'ρ = {t["rho"]:+.2f}'
  out.append(f'\n**Claim 2 under the strongest attack** ({dict(COLUMNS)[strongest]}): {verdict} — robust accuracy '
             f'over AR strength {rho}, {100 * t["first"]:.2f} % → {100 * t["last"]:.2f} %.\n')
  out.append('\n## Is the robustness real?\n')
  out.append('Cheap checks for gradient masking (Carlini et al. 2019, §5; the checks AutoAttack runs): '
             + '; '.join(CHECKS.values()) + '.\n')
  rows = []
  for a in runs:
    rb = a['robustness']
    failed = [f'{k}: {v["detail"]}' for k, v in rb['checks'].items() if not v['passed']]
    rows.append([f'AR {a["strength"]:g}', '**yes** — ' + rb['verdict'] if rb['real'] else '**check** — '
                 + rb['verdict'], '; '.join(failed) or f'{len(rb["checks"])} of {len(rb["checks"])} checks pass'])
  out.append(tables.md_table(['model', 'real?', 'details'], rows))
  grid = ', '.join(f'ε {e:g}: {100 * v:.1f} %' for e, v in r0['accuracy_vs_eps'])
  out.append(f'\nPGD-10 accuracy against ε, AR {runs[0]["strength"]:g}: {grid}.\n')
  return '\n'.join(out)


def _autoattack_text(r: dict) -> str:
  """What the AutoAttack column is — the authors' standard version — and every way this run reduces it."""
  aa, labels = r.get('autoattack'), dict(COLUMNS)
  if not aa:
    notes = r.get('attacks_not_run') or {}
    return (' Not run: ' + '; '.join(f'{labels.get(k, k)} {v}' for k, v in notes.items()) + '.') if notes else ''
  out = (" AutoAttack is the authors' standard version (Croce & Hein, ICML 2020) — "
         + ' → '.join(labels[s] for s in aa['stages']) + f', {aa["iterations"]} iterations — and a point counts '
         'as robust when it survives every stage (what the cascade computes: each attack acts per example).')
  if aa.get('reduced'):
    out += ' Reduced here: ' + '; '.join(aa['reduced']) + '.'
  return out
