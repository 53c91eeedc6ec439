"""Markdown tables of the report, in the paper's layouts (metrics as rows, AR strengths as columns).

When the sweep reproduces a paper experiment (``config.paper``, :mod:`arreg_jax.report.paper`), each strength gets
three columns — ours, the paper's, and the difference ours − paper — for the strengths both have.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from arreg_jax.report import paper as paper_lib


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> str:
  """A GitHub-markdown table; ``align`` is one character per column ('l' or 'r'; default: first l, rest r)."""
  align = align or ('l' + 'r' * (len(header) - 1))
  sep = ['---' if a == 'l' else '---:' for a in align]
  cell = lambda c: str(c).replace('|', '\\|')  # a literal | would end the cell
  lines = ['| ' + ' | '.join(cell(h) for h in header) + ' |', '| ' + ' | '.join(sep) + ' |']
  for row in rows:
    lines.append('| ' + ' | '.join(cell(c) for c in row) + ' |')
  return '\n'.join(lines)


def fmt(v: Any, key: str = '') -> str:
  """Accuracies (%) with 2 decimals, losses with 3 significant decimals, others with 4 significant digits."""
  if v is None:
    return '—'
  if isinstance(v, str):
    return v
  v = float(v)
  if math.isnan(v):
    return '—'
  if math.isinf(v):
    return '∞' if v > 0 else '−∞'
  if key.endswith('acc') or key == 'acc_gap':
    return f'{v:.2f}'
  if 'loss' in key:
    return f'{v:.4f}' if abs(v) < 0.1 else f'{v:.3f}'
  return f'{v:.4g}'


def _diff(ours: float | None, theirs: float | None, key: str) -> str:
  if ours is None or theirs is None or (isinstance(ours, float) and math.isnan(ours)):
    return '—'
  d = float(ours) - float(theirs)
  return ('+' if d >= 0 else '−') + fmt(abs(d), key)


def metrics_table(records: Sequence[Mapping[str, Any]], exp: paper_lib.PaperExperiment | None = None) -> str:
  """Tables 3–5 layout: Trn Acc., Test Acc., ΔAcc., Trn Loss, Test Loss, ΔLoss, PGD by AR strength."""
  ss = [r['strength'] for r in records]
  if exp is None:
    header = ['metric'] + [f'AR {s:g}' for s in ss]
    rows = [[label] + [fmt(r[k], k) for r in records] for k, label in paper_lib.LABELS.items()]
    return md_table(header, rows)
  header = ['metric']
  for s in ss:
    header += [f'AR {s:g} ours', 'paper', 'Δ'] if s in exp.rows else [f'AR {s:g} ours']
  rows = []
  for k, label in paper_lib.LABELS.items():
    row = [label]
    for r in records:
      row.append(fmt(r[k], k))
      if r['strength'] in exp.rows:
        theirs = exp.rows[r['strength']].get(k)
        row += [fmt(theirs, k), _diff(r[k], theirs, k)]
    rows.append(row)
  return md_table(header, rows)


def loss_variation_table(records: Sequence[Mapping[str, Any]], eps_label, exp=None) -> str:
  """Table 1 layout: rows = attack ε, columns = AR strength, cells mean ± std (paper's beside ours if known)."""
  ss = [r['strength'] for r in records]
  lv_paper = exp.loss_variation if exp is not None else {}
  ours_255 = [row['eps'] * 255 for row in records[0]['loss_variation']]
  if lv_paper and (len(ours_255) != len(exp.loss_variation_eps_255) or any(
      abs(a - b) > 1e-3 * b for a, b in zip(ours_255, exp.loss_variation_eps_255))):
    lv_paper = {}  # different attack radii: the published columns would not be comparable
  header = ['attack ε'] + sum(([f'AR {s:g} ours', 'paper'] if s in lv_paper else [f'AR {s:g} ours'] for s in ss),
                              [])
  rows = []
  for i, row0 in enumerate(records[0]['loss_variation']):
    row = [eps_label(row0['eps'])]
    for r in records:
      lv = r['loss_variation'][i]
      row.append(f'{lv["mean"]:.4f} ± {lv["std"]:.4f}')
      if r['strength'] in lv_paper:
        p = lv_paper[r['strength']]
        row.append(f'{p[i][0]:.4f} ± {p[i][1]:.4f}' if i < len(p) else '—')
    rows.append(row)
  return md_table(header, rows)


def distribution_table(analyses: Sequence[Mapping[str, Any]]) -> str:
  """Margin and probability summaries per AR strength (train and test)."""
  header = ['AR', 'split', 'n', 'margin mean', 'margin std', 'margin median', 'margin skewness',
            'frac |M| < τ', 'frac p_y ∈ [0.1, 0.9]', 'mean loss']
  rows = []
  for a in analyses:
    for split in ('train', 'test'):
      d = a[split]
      m = d['margin']
      rows.append([f'{a["strength"]:g}', split, d['n'], fmt(m['mean']), fmt(m['std']), fmt(m['quantiles']['q50']),
                   fmt(m['skewness']), f'{m["frac_abs_below_tau"]:.4f} (τ = {m["tau"]:g})',
                   f'{d["prob"]["frac_mid"]:.4f}', fmt(d['loss'], 'loss')])
  return md_table(header, rows, 'rlrrrrrrrr')


def sv_comparison_table(cmp: Mapping[str, float], lo: float, hi: float, exp=None) -> str:
  """Appendix B.2: STD decreases vs increases between the weakest and the strongest AR."""
  p = exp.sv_std_comparison if exp is not None else {}
  header = ['group of layers', 'count', 'Σ |STD change|', 'mean |STD change|'] + (
      ['paper Σ (AR 4 vs 16)', 'paper mean'] if p else [])
  rows = [
      [f'STD decreased (AR {lo:g} > AR {hi:g})', cmp['decrease_count'], fmt(cmp['decrease_sum']),
       fmt(cmp['decrease_mean'])] + ([fmt(p['decrease_sum']), fmt(p['decrease_mean'])] if p else []),
      [f'STD increased (AR {lo:g} < AR {hi:g})', cmp['increase_count'], fmt(cmp['increase_sum']),
       fmt(cmp['increase_mean'])] + ([fmt(p['increase_sum']), fmt(p['increase_mean'])] if p else []),
  ]
  return md_table(header, rows)


def sv_layers_table(analyses: Sequence[Mapping[str, Any]]) -> str:
  """Per-layer singular-value STD (and max) by AR strength; long networks are shown in full."""
  layers = analyses[0]['singular_values']['layers']
  header = ['#', 'layer', 'kind', 'operator input'] + [f'STD AR {a["strength"]:g}' for a in analyses] + \
      [f'σ_max AR {a["strength"]:g}' for a in analyses]
  rows = []
  for i, layer in enumerate(layers):
    hw = 'x'.join(str(v) for v in layer['input_hw']) if layer.get('input_hw') else '—'
    row = [i + 1, layer['name'], layer['kind'], hw]
    row += [fmt(a['singular_values']['layers'][i]['std']) for a in analyses]
    row += [fmt(a['singular_values']['layers'][i]['max']) for a in analyses]
    rows.append(row)
  return md_table(header, rows, 'rlll' + 'r' * (2 * len(analyses)))


def clip_table(records: Sequence[Mapping[str, Any]], exp=None) -> str:
  """Table 6 layout: one block of metric rows per clip threshold, AR strengths as columns."""
  clips = sorted({r['clip'] for r in records}, key=lambda c: (c is None, c or 0))
  ss = sorted({r['strength'] for r in records})
  header = ['clip', 'metric'] + [f'AR {s:g}' for s in ss]
  rows = []
  for c in clips:
    by_s = {r['strength']: r for r in records if r['clip'] == c}
    pc = exp.spectral_clipping.get(c, {}) if exp is not None else {}
    for k, label in paper_lib.LABELS.items():
      cells = []
      for s in ss:
        ours = fmt(by_s[s][k], k) if s in by_s else '—'
        if s in pc:
          ours += f' (paper {fmt(pc[s][k], k)}, Δ {_diff(by_s[s][k] if s in by_s else None, pc[s][k], k)})'
        cells.append(ours)
      rows.append(['uncontrolled' if c is None else f'SP {c:g}', label] + cells)
  return md_table(header, rows, 'll' + 'r' * len(ss))


def bound_table(analyses: Sequence[Mapping[str, Any]]) -> str:
  """Theorem 3.1's terms per AR strength."""
  header = ['AR', 'min‖w_y − w_ŷ‖₂', 'Σ log σ_min (layers 1..L−1)', 'v̂_min (L2)', 'median v̂ (refined)',
            'median first-order d̂', 'log u_min', 'γ', '1 − u_min/γ', 'log10 covering term', 'log SC']
  rows = []
  for a in analyses:
    b, v = a['bound'], a['boundary']
    rows.append([f'{a["strength"]:g}', fmt(b['w_distance']), fmt(b['log_prod_sigma_min']), fmt(v['v_min']),
                 fmt(v['v_median_refined']), fmt(v['first_order_median']), fmt(b['log_u_min']), fmt(b['gamma']),
                 fmt(b['margin_term']), fmt(b['log10_covering_term']),
                 fmt(a['singular_values']['log_spectral_complexity'])])
  return md_table(header, rows)


def claims_table(claims: Sequence[Mapping[str, Any]]) -> str:
  rows = [[c['id'], c['claim'], c['where'], f'**{c["verdict"]}**'] for c in claims]
  return md_table(['#', 'claim (SPEC §6)', 'paper', 'verdict'], rows, 'rllll'[:4])
