"""The report's figures (PNG), analogues of the paper's Fig. 1, 3, 4, 5, 6 and 8.

Each ``fig_*`` function takes plain data (lists of :class:`plotting.RunView`, dicts) and a path, writes one PNG
(:func:`plotting.save`, atomic) and returns the path; the conventions are :mod:`plotting`'s.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use('Agg', force=False)  # harmless if a backend is already chosen: Figure() below needs no pyplot
from matplotlib.lines import Line2D  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from arreg_jax.report.plotting import (LOSS_LABEL, MARGIN_LABEL, PAPER_STYLE, PROB_LABEL,  # pylint: disable=g-import-not-at-top
                                       Meta, RunView, ar_label, common_edges, curve, density_steps, hist_bins,
                                       new_figure, save, strength_ticks, style_axis, styled)


@styled
def fig_overview(runs: Sequence[RunView], colors, meta: Meta, path: str) -> str:
  """Fig. 1 analogue: (a) per-layer SV STD, (b) test-margin distribution, (c) clean and PGD accuracy vs AR."""
  fig, axes = new_figure(13.5, 3.9, 1, 3)
  ax = axes[0, 0]
  for r in runs:
    std = r.record.get('sv_std')
    if std:
      ax.plot(np.arange(1, len(std) + 1), std, marker='o', markersize=4 if len(std) < 20 else 2.5, linewidth=1.5,
              color=colors[r.strength], label=ar_label(r.strength))
      n_layers = len(std)
  if any(r.record.get('sv_std') for r in runs):
    ax.set_xticks(np.arange(1, n_layers + 1) if n_layers <= 12 else ax.get_xticks())
    ax.set_xlim(0.5, n_layers + 0.5)
  ax.set_xlabel('weight layer (forward order)')
  ax.set_ylabel('STD of the layer\'s singular values')
  ax.set_title('(a) Singular-value STD per layer')
  ax.legend(frameon=False)
  style_axis(ax)

  ax = axes[0, 1]
  edges = common_edges([r.arrays['test_margin'] for r in runs], hist_bins(len(runs[0].arrays['test_margin'])))
  density_steps(ax, runs, 'test_margin', edges, colors)
  ax.axvline(0, color='0.2', linestyle=':', linewidth=1)
  ax.set_xlabel(MARGIN_LABEL)
  ax.set_ylabel('density (per logit unit)')
  ax.set_title('(b) Margin distribution, test set')
  ax.legend(frameon=False)
  style_axis(ax)

  ax = axes[0, 2]
  ss = [r.strength for r in runs]
  ax.set_ylim(0, 108)
  curve(ax, ss, [r.record['test_acc'] for r in runs], colors, label='clean test accuracy', annotate='{:.1f}')
  curve(ax, ss, [r.record['pgd_acc'] for r in runs], colors, linestyle='--', marker='s',
         label='PGD accuracy (of clean-correct)', annotate='{:.1f}', below=True)
  ax.set_ylim(0, 108)
  strength_ticks(ax, ss)
  ax.set_xlabel(meta.strength_axis)
  ax.set_ylabel('accuracy (%)')
  ax.set_title('(c) Clean and adversarial accuracy')
  ax.legend(frameon=False, loc='best')
  style_axis(ax)
  fig.suptitle(meta.title, fontsize=11)
  return save(fig, path)


@styled
def fig_loss_error(runs: Sequence[RunView], colors, meta: Meta, path: str,
                   paper_rows: Mapping[float, Mapping[str, float]] | None = None) -> str:
  """Fig. 3 analogue: train/test loss and error vs AR (top), their gaps vs AR (bottom)."""
  fig, axes = new_figure(10.5, 7.0, 2, 2)
  ss = [r.strength for r in runs]
  rec = lambda k: [r.record[k] for r in runs]
  panels = [
      (axes[0, 0], [('test loss', rec('test_loss'), '-', 'test_loss'), ('training loss', rec('train_loss'), '--',
                                                                         'train_loss')],
       'cross-entropy loss', '(a) Loss'),
      (axes[0, 1], [('test error', [100 - v for v in rec('test_acc')], '-', 'test_err'),
                    ('training error', [100 - v for v in rec('train_acc')], '--', 'train_err')],
       'error rate (%)', '(b) Error rate'),
      (axes[1, 0], [('ΔLoss = test − training loss', rec('loss_gap'), '-', 'loss_gap')], 'loss gap',
       '(c) Generalization gap in loss'),
      (axes[1, 1], [('ΔAcc = training − test accuracy', rec('acc_gap'), '-', 'acc_gap')], 'error-rate gap (points)',
       '(d) Generalization gap in error rate'),
  ]
  for ax, curves, ylabel, title in panels:
    for label, ys, ls, key in curves:
      curve(ax, ss, ys, colors, linestyle=ls, label=label)
      if paper_rows:
        px = sorted(s for s in paper_rows if _paper_value(paper_rows[s], key) is not None)
        if px:
          style = {**PAPER_STYLE, 'marker': '+' if ls == '--' else 'x'}  # + for training, × for test curves
          ax.plot(px, [_paper_value(paper_rows[s], key) for s in px], **style,
                  label=f'paper: {label}' if len(curves) > 1 else 'paper')
    strength_ticks(ax, sorted(set(ss) | set(paper_rows or {})))
    ax.set_xlabel(meta.strength_axis)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(frameon=False, loc='best')
    style_axis(ax)
  fig.suptitle(meta.title, fontsize=11)
  return save(fig, path)


def _paper_value(row: Mapping[str, float], key: str) -> float | None:
  if key == 'test_err':
    return 100 - row['test_acc'] if 'test_acc' in row else None
  if key == 'train_err':
    return 100 - row['train_acc'] if 'train_acc' in row else None
  return row.get(key)


@styled
def fig_margins(runs: Sequence[RunView], colors, meta: Meta, path: str) -> str:
  """Fig. 4 analogue: margin distributions on the training set (left) and the test set (right), per AR."""
  fig, axes = new_figure(11.0, 4.0, 1, 2, sharex=True)
  pooled = [r.arrays[f'{s}_margin'] for r in runs for s in ('train', 'test')]
  for ax, split, name in ((axes[0, 0], 'train', 'training'), (axes[0, 1], 'test', 'test')):
    edges = common_edges(pooled, hist_bins(len(runs[0].arrays[f'{split}_margin'])))
    density_steps(ax, runs, f'{split}_margin', edges, colors)
    ax.axvline(0, color='0.2', linestyle=':', linewidth=1, label='decision boundary')
    n = len(runs[0].arrays[f'{split}_margin'])
    ax.set_title(f'Margin distribution, {name} set (n = {n})')
    ax.set_xlabel(MARGIN_LABEL)
    ax.set_ylabel('density (per logit unit)')
    ax.legend(frameon=False)
    style_axis(ax)
  fig.suptitle(meta.title, fontsize=11)
  return save(fig, path)


def _hist_with_inset(ax, runs, key, edges, colors, inset_range, xlabel, title, inset_label, inset_box):
  for r in runs:
    v = np.asarray(r.arrays[key], np.float64)
    h, _ = np.histogram(np.clip(v, edges[0], edges[-1]), bins=edges)
    ax.stairs(100 * h / max(v.size, 1), edges, color=colors[r.strength], linewidth=1.6, label=ar_label(r.strength))
  ax.set_xlabel(xlabel)
  ax.set_ylabel('% of test examples per bin')
  ax.set_title(title)
  ax.set_ylim(0, None)
  style_axis(ax)
  ins = ax.inset_axes(inset_box)
  lo, hi = inset_range
  in_edges = np.linspace(lo, hi, 25)
  top = 0.0
  for r in runs:
    v = np.asarray(r.arrays[key], np.float64)
    h, _ = np.histogram(v, bins=in_edges)
    h = 100 * h / max(v.size, 1)
    top = max(top, h.max())
    ins.stairs(h, in_edges, color=colors[r.strength], linewidth=1.4)
  ins.set_xlim(lo, hi)
  ins.set_ylim(0, top * 1.25 if top > 0 else 1)
  ins.text(0.03, 0.96, inset_label, transform=ins.transAxes, fontsize=8, va='top', ha='left', color='0.2')
  ins.tick_params(labelsize=7)
  ins.grid(True, alpha=0.3)
  ax.indicate_inset_zoom(ins, edgecolor='0.5')


@styled
def fig_prob_loss_sv(runs: Sequence[RunView], colors, meta: Meta, path: str, mid=(0.1, 0.9)) -> str:
  """Fig. 5 analogue: (a) true-class probability and (b) loss histograms on the test set, each with an inset on
  the middle range; (c) per-layer SV STD of the weakest and the strongest AR (the paper drops the middle one)."""
  fig, axes = new_figure(14.5, 4.6, 1, 3)
  _hist_with_inset(axes[0, 0], runs, 'test_prob', np.linspace(0, 1, 41), colors, mid, PROB_LABEL,
                   '(a) Probability histogram, test set', f'zoom: $p_y \\in [{mid[0]:g}, {mid[1]:g}]$',
                   [0.08, 0.3, 0.62, 0.62])
  loss_hi = float(np.quantile(np.concatenate([r.arrays['test_loss'] for r in runs]), 0.995))
  loss_hi = max(loss_hi, -np.log(mid[0]) * 1.5)
  lo_l, hi_l = -np.log(mid[1]), -np.log(mid[0])
  _hist_with_inset(axes[0, 1], runs, 'test_loss', np.linspace(0, loss_hi, 41), colors, (lo_l, hi_l),
                   LOSS_LABEL + ' (larger values in the last bin)', '(b) Loss histogram, test set',
                   f'zoom: same examples, loss $\\in [{lo_l:.2f}, {hi_l:.2f}]$', [0.33, 0.3, 0.62, 0.62])
  ax = axes[0, 2]
  pair = [runs[0], runs[-1]] if len(runs) > 1 else list(runs)
  for r in pair:
    std = r.record.get('sv_std')
    if std:
      ax.plot(np.arange(1, len(std) + 1), std, marker='o', markersize=4 if len(std) < 20 else 2.5, linewidth=1.5,
              color=colors[r.strength], label=ar_label(r.strength))
      if len(std) <= 12:
        ax.set_xticks(np.arange(1, len(std) + 1))
  ax.set_xlabel('weight layer (forward order)')
  ax.set_ylabel('STD of the layer\'s singular values')
  ax.set_title('(c) SV STD per layer, weakest vs strongest AR')
  ax.legend(frameon=False)
  style_axis(ax)
  handles = [Line2D([], [], color=colors[r.strength], linewidth=2) for r in runs]
  fig.legend(handles, [ar_label(r.strength) for r in runs], loc='outside lower center', ncols=len(runs),
             frameon=False)
  fig.suptitle(meta.title, fontsize=11)
  return save(fig, path)


@styled
def fig_loss_variation(runs: Sequence[RunView], colors, meta: Meta, path: str,
                       paper_lv: Mapping[float, Sequence[tuple[float, float]]] | None = None,
                       paper_eps_255: Sequence[float] = ()) -> str:
  """Fig. 8 analogue: the mean maximal loss increase inside the L∞ ball vs attack ε, one marker per AR strength,
  with a whisker up to mean + 1 std (the paper's error bars are ±1 std; the lower half is dropped because the
  increase is ≥ 0 and the axis is logarithmic, so that every strength stays readable)."""
  have_paper = bool(paper_lv)
  fig, axes = new_figure(11.5 if have_paper else 6.8, 4.4, 1, 2 if have_paper else 1, sharey=have_paper)
  eps = [row['eps'] for row in runs[0].record['loss_variation']]
  x = np.arange(len(eps))
  offset = 0.6 / max(len(runs), 1)

  def dots(ax, series, title):
    for j, (s_, means, stds) in enumerate(series):
      pos = x - 0.3 + offset * (j + 0.5)
      means, stds = np.asarray(means), np.asarray(stds)
      ax.vlines(pos, means, means + stds, color=colors.get(s_, '0.5'), linewidth=1.3, alpha=0.8)
      ax.plot(pos, means, marker='o', linestyle='none', markersize=7, color=colors.get(s_, '0.5'),
              markeredgecolor='0.15', label=ar_label(s_))
    ax.set_yscale('log')
    ax.set_ylabel(r'max loss increase in the ball, $\ell(x^\prime) - \ell(x)$')
    ax.set_title(title)
    ax.legend(frameon=False, loc='lower right', fontsize=8)
    style_axis(ax)
    ax.grid(True, which='both', axis='y', alpha=0.2)

  series = [(r.strength, [row['mean'] for row in r.record['loss_variation']],
             [row['std'] for row in r.record['loss_variation']]) for r in runs]
  n = runs[0].analysis['loss_variation'][0]['n']
  ax = axes[0, 0]
  where = ('correctly classified training examples'
           if runs[0].analysis['loss_variation'][0].get('split') == 'train_correct' else 'test examples')
  dots(ax, series, f'Ours: mean (dot) to mean + 1 std, {n} {where}')
  ax.set_xticks(x)
  ax.set_xticklabels([f'{meta.eps_value(e):.3g}' for e in eps])
  ax.set_xlabel(meta.eps_axis())
  if have_paper:
    ax = axes[0, 1]
    p_series = [(s_, [m for m, _ in v], [sd for _, sd in v]) for s_, v in sorted(paper_lv.items())]
    dots(ax, p_series, 'Paper, Table 1 (whole test set)')
    ax.set_xticks(np.arange(len(paper_eps_255)))
    ax.set_xticklabels([f'{e:g}' for e in paper_eps_255])
    ax.set_xlabel('attack L∞ ε (×1/255)')
  fig.suptitle(meta.title, fontsize=11)
  return save(fig, path)


@styled
def fig_clip_grid(records: Sequence[dict], meta: Meta, path: str,
                  paper_clip: Mapping[Any, Mapping[float, Mapping[str, float]]] | None = None) -> str:
  """Fig. 6 analogue: loss gap and error gap vs AR, one line per spectral-clipping threshold c (Table 6 grid)."""
  fig, axes = new_figure(11.0, 4.2, 1, 2)
  clips = sorted({r['clip'] for r in records}, key=lambda c: (c is None, c or 0))
  cmap = matplotlib.colormaps['plasma']
  ccolors = {c: cmap(0.1 + 0.7 * i / max(len(clips) - 1, 1)) for i, c in enumerate(clips)}
  label = lambda c: 'uncontrolled' if c is None else f'clip c = {c:g}'
  for ax, key, ylabel, title in ((axes[0, 0], 'loss_gap', 'ΔLoss = test − training loss', '(a) Loss gap'),
                                 (axes[0, 1], 'acc_gap', 'ΔAcc = training − test accuracy (points)',
                                  '(b) Error-rate gap')):
    for c in clips:
      g = sorted([r for r in records if r['clip'] == c], key=lambda r: r['strength'])
      ax.plot([r['strength'] for r in g], [r[key] for r in g], marker='o', color=ccolors[c], linewidth=1.6,
              label=label(c))
      if paper_clip and c in paper_clip:
        p = paper_clip[c]
        ax.plot(sorted(p), [p[s][key] for s in sorted(p)], color=ccolors[c], linestyle=':', marker='x',
                linewidth=1.2)
    strength_ticks(ax, sorted({r['strength'] for r in records}))
    ax.set_xlabel(meta.strength_axis)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    handles, labels = ax.get_legend_handles_labels()
    if paper_clip:
      handles.append(Line2D([], [], color='0.3', linestyle=':', marker='x'))
      labels.append('paper (Table 6), same color')
    ax.legend(handles, labels, frameon=False)
    style_axis(ax)
  fig.suptitle(meta.title, fontsize=11)
  return save(fig, path)
