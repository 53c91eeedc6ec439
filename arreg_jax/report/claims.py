"""The paper's seven claims (SPEC §6), each checked against a sweep's measurements by an explicit criterion.

Nothing here is asserted: every verdict is computed from the per-run records (:func:`record_from_analysis`), and a
claim whose evidence is missing (too few finished strengths, no spectral-clipping runs, ...) is "not applicable".

**Trend over AR strength.** For the strengths ``s_1 < … < s_n`` (n ≥ 2) of one group of runs and a measured
quantity ``v``, the trend is

* ``rises``  iff Spearman's ρ(s, v) ≥ ``RHO`` (0.5) **and** ``v(s_n) > v(s_1)``;
* ``falls``  iff ρ(s, v) ≤ −``RHO`` **and** ``v(s_n) < v(s_1)``;
* ``flat``   otherwise (mixed, or constant).

So a trend needs both a mostly monotone ordering and a net change between the weakest and the strongest AR. With
two strengths ρ = ±1 and the trend is the sign of the change; with three, one inversion is tolerated (ρ = ±0.5)
only if the end points still move the claimed way.

**The criteria** (a claim holds iff all of its required parts hold):

1. Fig. 3a — training loss *rises* and the loss gap ΔLoss = test − train *falls*.
2. Fig. 1c, 3b — test accuracy *falls* and PGD accuracy *rises*.
3. Fig. 4 — margins concentrate around zero: on both the training and the test set, the margins' standard
   deviation *falls* and the distance of their median from 0 (|median|) *falls*.
4. Fig. 5a,b — the fraction of test examples whose true-class probability lies in the middle range [0.1, 0.9]
   *rises*. (The paper's companion remark — test loss *can* fall while test error rises — is reported as
   observed / not observed between the weakest and the strongest AR, and is not part of the verdict.)
5. Fig. 1a, 5c,d, B.2 — per-layer singular-value STD shrinks in most layers: more than half of the weight layers
   have a lower STD at the strongest AR than at the weakest.
6. Table 1 — the mean loss variation *falls*, at every attack radius ε measured.
7. Table 6 — with the tightest spectral clipping in the sweep (c = 1 in the paper), the error gap ΔAcc *falls*.
   Not applicable without spectral-clipping runs.

Claims 1–6 use the runs without spectral clipping (or, if every run is clipped, those with the loosest clip).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from scipy import stats

from arreg_jax.analysis import singular_values

RHO = 0.5
HOLDS, FAILS, NA = 'holds', 'does not hold', 'not applicable'

CLAIMS = {
    1: ('Training loss rises and the train–test loss gap shrinks as AR strength grows.', 'Fig. 3a'),
    2: ('Test accuracy falls and PGD accuracy rises with AR strength.', 'Fig. 1c, 3b'),
    3: ('Margins concentrate around zero (smaller spread, centre moves toward 0) on train and test.', 'Fig. 4'),
    4: ('More test predictions have mid-range probabilities; test loss can fall even as test error rises.',
        'Fig. 5a,b'),
    5: ('Per-layer singular-value STD shrinks in most layers.', 'Fig. 1a, 5c,d; App. B.2'),
    6: ('Loss variation under a fixed-ε perturbation shrinks.', 'Table 1, Fig. 8'),
    7: ('With tighter spectral clipping (c = 1), the error gap also shrinks with AR.', 'Table 6, Fig. 6'),
}

CRITERIA = {
    1: 'trend(training loss) = rises and trend(ΔLoss = test − train loss) = falls',
    2: 'trend(test accuracy) = falls and trend(PGD accuracy) = rises',
    3: 'on train and on test: trend(std of margins) = falls and trend(|median margin|) = falls',
    4: 'trend(fraction of test examples with p_y in [0.1, 0.9]) = rises',
    5: 'more than half of the layers have a lower singular-value STD at the strongest AR than at the weakest',
    6: 'trend(mean loss variation) = falls at every attack ε',
    7: 'among runs with the tightest spectral clip c: trend(ΔAcc = train − test accuracy) = falls',
}


def trend(strengths: Sequence[float], values: Sequence[float]) -> dict[str, Any]:
  """The trend of ``values`` over ``strengths`` (module docstring): direction, Spearman ρ, end points."""
  s = np.asarray(strengths, np.float64)
  v = np.asarray(values, np.float64)
  order = np.argsort(s, kind='stable')
  s, v = s[order], v[order]
  out = {'strengths': [float(x) for x in s], 'values': [float(x) for x in v], 'rho': float('nan'),
         'first': float(v[0]) if v.size else float('nan'), 'last': float(v[-1]) if v.size else float('nan'),
         'direction': 'flat'}
  if v.size < 2 or not np.all(np.isfinite(v)) or np.all(v == v[0]):
    return out
  rho = float(stats.spearmanr(s, v).statistic)
  out['rho'] = rho
  if rho >= RHO and v[-1] > v[0]:
    out['direction'] = 'rises'
  elif rho <= -RHO and v[-1] < v[0]:
    out['direction'] = 'falls'
  return out


def _get(d: dict, *path, default=None):
  for p in path:
    if not isinstance(d, dict) or p not in d:
      return default
    d = d[p]
  return d


def _num(x) -> float:
  if isinstance(x, str):
    return float(x)  # 'inf' / 'nan' written by the analysis for non-finite numbers
  return float('nan') if x is None else float(x)


def record_from_analysis(a: dict) -> dict[str, Any]:
  """The flat per-run record the claims are computed from, out of one run's ``analysis.json``."""
  row = a.get('final_row') or {}
  rec = {'strength': float(a['strength']), 'clip': a.get('clip'), 'run': a.get('run')}
  for k in ('train_acc', 'test_acc', 'acc_gap', 'train_loss', 'test_loss', 'loss_gap', 'pgd_acc'):
    rec[k] = _num(row.get(k))
  for split in ('train', 'test'):
    rec[f'{split}_margin_std'] = _num(_get(a, split, 'margin', 'std'))
    rec[f'{split}_margin_median'] = _num(_get(a, split, 'margin', 'quantiles', 'q50'))
  rec['test_prob_mid_frac'] = _num(_get(a, 'test', 'prob', 'frac_mid'))
  layers = _get(a, 'singular_values', 'layers', default=None)
  rec['sv_std'] = [float(layer['std']) for layer in layers] if layers else None
  rec['sv_names'] = [layer['name'] for layer in layers] if layers else None
  lv = a.get('loss_variation')
  rec['loss_variation'] = [{'eps': float(r['eps']), 'mean': _num(r['mean']), 'std': _num(r['std'])}
                           for r in lv] if lv else None
  return rec


def primary_group(records: Sequence[dict]) -> tuple[list[dict], float | None]:
  """Runs without spectral clipping, or if all are clipped, those with the loosest clip; sorted by strength."""
  unclipped = [r for r in records if r.get('clip') is None]
  if unclipped:
    return sorted(unclipped, key=lambda r: r['strength']), None
  loosest = max(r['clip'] for r in records)
  return sorted([r for r in records if r['clip'] == loosest], key=lambda r: r['strength']), loosest


def _part(name: str, group: Sequence[dict], key, want: str, transform=None) -> dict:
  vals = [(r[key] if transform is None else transform(r[key])) for r in group]
  t = trend([r['strength'] for r in group], vals)
  ok = t['direction'] == want
  return {'quantity': name, 'want': want, **t, 'ok': bool(ok)}


def _verdict(parts: Sequence[dict]) -> str:
  return HOLDS if all(p['ok'] for p in parts) else FAILS


def _missing(group, *keys) -> bool:
  for r in group:
    for k in keys:
      v = r.get(k)
      if v is None or (isinstance(v, float) and math.isnan(v)):
        return True
  return False


def _claim(cid: int, verdict: str, parts: list, summary: str, **extra) -> dict:
  text, where = CLAIMS[cid]
  return {'id': cid, 'claim': text, 'where': where, 'criterion': CRITERIA[cid], 'verdict': verdict,
          'summary': summary, 'evidence': parts, **extra}


def _fmt_trend(p: dict) -> str:
  vals = ', '.join(f'{v:.4g}' for v in p['values'])
  rho = 'n/a' if math.isnan(p['rho']) else f'{p["rho"]:+.2f}'
  text = f'{p["quantity"]} {p["direction"]} (ρ = {rho}; {vals})'
  moved = {'rises': p['last'] > p['first'], 'falls': p['last'] < p['first']}.get(p.get('want'), False)
  if p['direction'] == 'flat' and moved:
    text += (f' — it does {p["want"][:-1]} from the weakest to the strongest AR, but not monotonically enough '
             f'(|ρ| < {RHO})')
  return text


def check_claims(records: Sequence[dict]) -> list[dict]:
  """All seven claims for the per-run ``records`` (from :func:`record_from_analysis`), in order."""
  group, clip = primary_group(records) if records else ([], None)
  out = []
  enough = len({r['strength'] for r in group}) >= 2
  na_reason = f'needs at least two AR strengths in the sweep, found {len(group)} finished run(s)'

  def simple(cid, specs):
    keys = [k for _, k, _, _ in specs]
    if not enough or _missing(group, *keys):
      out.append(_claim(cid, NA, [], na_reason if not enough else 'measurements missing'))
      return
    parts = [_part(name, group, key, want, tf) for name, key, want, tf in specs]
    out.append(_claim(cid, _verdict(parts), parts, '; '.join(_fmt_trend(p) for p in parts)))

  simple(1, [('training loss', 'train_loss', 'rises', None), ('ΔLoss', 'loss_gap', 'falls', None)])
  simple(2, [('test accuracy', 'test_acc', 'falls', None), ('PGD accuracy', 'pgd_acc', 'rises', None)])
  simple(3, [('train margin std', 'train_margin_std', 'falls', None),
             ('train |median margin|', 'train_margin_median', 'falls', abs),
             ('test margin std', 'test_margin_std', 'falls', None),
             ('test |median margin|', 'test_margin_median', 'falls', abs)])

  # Claim 4 (+ the non-binding companion observation).
  if not enough or _missing(group, 'test_prob_mid_frac'):
    out.append(_claim(4, NA, [], na_reason if not enough else 'measurements missing'))
  else:
    part = _part('fraction of test p_y in [0.1, 0.9]', group, 'test_prob_mid_frac', 'rises')
    lo, hi = group[0], group[-1]
    observed = (hi['test_loss'] < lo['test_loss']) and (hi['test_acc'] < lo['test_acc'])
    note = (f'test loss {lo["test_loss"]:.4g} → {hi["test_loss"]:.4g} while test error '
            f'{100 - lo["test_acc"]:.4g}% → {100 - hi["test_acc"]:.4g}% (AR {lo["strength"]:g} → '
            f'{hi["strength"]:g}): "test loss falls while test error rises" is '
            f'{"observed" if observed else "not observed"} (not part of the verdict)')
    out.append(_claim(4, _verdict([part]), [part], _fmt_trend(part) + '; ' + note, companion_observed=observed))

  # Claim 5: per-layer STD, weakest vs strongest AR.
  if not enough or any(r.get('sv_std') is None for r in (group[0], group[-1])) or \
      len(group[0]['sv_std']) != len(group[-1]['sv_std']):
    out.append(_claim(5, NA, [], na_reason if not enough else 'singular values missing or layers differ'))
  else:
    lo, hi = group[0], group[-1]
    a, b = np.asarray(lo['sv_std']), np.asarray(hi['sv_std'])
    cmp = singular_values.compare_std_json(a, b)
    n = len(a)
    ok = cmp['decrease_count'] > n / 2
    part = {'quantity': 'layers with lower SV STD at the strongest AR', 'want': '> half', 'ok': bool(ok),
            'count': cmp['decrease_count'], 'layers': n, 'from': lo['strength'], 'to': hi['strength'],
            'comparison': cmp}
    summary = (f'{cmp["decrease_count"]} of {n} layers have a lower STD at AR {hi["strength"]:g} than at AR '
               f'{lo["strength"]:g}; STD decreases sum {cmp["decrease_sum"]:.4g} (mean {cmp["decrease_mean"]:.4g}), '
               f'increases sum {cmp["increase_sum"]:.4g} (mean {cmp["increase_mean"]:.4g})')
    out.append(_claim(5, HOLDS if ok else FAILS, [part], summary))

  # Claim 6: loss variation at every ε.
  if not enough or any(r.get('loss_variation') is None for r in group):
    out.append(_claim(6, NA, [], na_reason if not enough else 'loss variation missing'))
  else:
    parts = []
    for i, row in enumerate(group[0]['loss_variation']):
      vals = [r['loss_variation'][i]['mean'] for r in group]
      t = trend([r['strength'] for r in group], vals)
      parts.append({'quantity': f'mean loss variation at ε = {row["eps"]:.4g}', 'want': 'falls', **t,
                    'ok': t['direction'] == 'falls'})
    out.append(_claim(6, _verdict(parts), parts, '; '.join(_fmt_trend(p) for p in parts)))

  # Claim 7: the tightest clip group.
  clipped = [r for r in records if r.get('clip') is not None]
  if not clipped:
    out.append(_claim(7, NA, [], 'the sweep has no spectral-clipping runs (config spectral.clip_to)'))
  else:
    c = min(r['clip'] for r in clipped)
    g = sorted([r for r in clipped if r['clip'] == c], key=lambda r: r['strength'])
    if len({r['strength'] for r in g}) < 2 or _missing(g, 'acc_gap'):
      out.append(_claim(7, NA, [], f'fewer than two AR strengths with clip c = {c:g}', clip=c))
    else:
      part = _part(f'ΔAcc at clip c = {c:g}', g, 'acc_gap', 'falls')
      out.append(_claim(7, _verdict([part]), [part], _fmt_trend(part), clip=c))
  for claim in out:
    claim['group'] = {'clip': clip, 'strengths': [r['strength'] for r in group]}
  return out
