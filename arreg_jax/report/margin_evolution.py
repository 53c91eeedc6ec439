"""The minimum-vs-average-margin part of a report (Wu & Yu, poster 004): figures and a markdown section.

Reads what training left in each run directory of a sweep: ``metrics.jsonl`` rows with the per-epoch margin
statistics (``config.margins.track``; :mod:`arreg_jax.analysis.margin_tracking`), ``margins/epoch<k>.npz`` with the
per-example margins of chosen epochs, ``final.json`` (clean and PGD accuracy) and ``config.json`` (the regularizer's
λ, γ, β). Draws

* ``poster004_margins_vs_epoch.png``: minimum and average margin per epoch, train and test, feature-space (top) and
  logit (bottom) margins, one line per run (standard vs regularized) — the poster's margin-vs-epoch panels;
* ``poster004_margin_histograms.png``: training-set feature-space margin histograms at the saved epochs, one panel
  per run — the poster's "margin histograms on the training set";
* ``poster004_robustness.png``: clean and PGD test accuracy per run — the poster's "significantly improves
  robustness".
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np

from arreg_jax import rundir
from arreg_jax import sweep as sweep_lib
from arreg_jax.report import plotting

FIGURES = {'margins': 'poster004_margins_vs_epoch.png', 'hist': 'poster004_margin_histograms.png',
           'robustness': 'poster004_robustness.png'}


def run_label(run: dict) -> str:
  r = run['regularizer']
  ar = f'AR {run["strength"]:g}, ' if run['strength'] else ''
  if not (r['margin_lambda'] or r['ortho_beta']):
    return f'{ar}standard'
  return f'{ar}regularized (λ={r["margin_lambda"]:g}, γ={r["margin_gamma"]:g}, β={r["ortho_beta"]:g})'


def load_runs(workdir: str) -> list[dict]:
  """Every run of ``workdir`` whose metrics.jsonl has margin statistics, standard runs first."""
  runs = []
  for info in sweep_lib.find_runs(workdir):
    rows = rundir.read_jsonl(os.path.join(info.path, rundir.METRICS))
    if not rows or 'train_fmargin_min' not in rows[-1]:
      continue
    hists = {}
    for p in glob.glob(os.path.join(info.path, rundir.MARGINS, 'epoch*.npz')):
      m = re.search(r'epoch(\d+)\.npz$', p)
      if m:
        with np.load(p) as z:
          hists[int(m.group(1))] = {k: z[k] for k in z.files}
    final_path = os.path.join(info.path, rundir.FINAL)
    runs.append({'name': info.name, 'path': info.path, 'strength': info.strength,
                 'pgd_eps': (info.config.get('eval') or {}).get('pgd_eps'),
                 'regularizer': sweep_lib.regularizer_of(info.config), 'epochs': rows,
                 'hists': dict(sorted(hists.items())),
                 'final': rundir.read_json(final_path) if info.finished else None})
  return sorted(runs, key=lambda r: (r['strength'], r['regularizer']['margin_lambda'], r['regularizer']['ortho_beta']))


def _colors(runs):
  base = ['0.25', '#d62728', '#1f77b4', '#2ca02c', '#9467bd', '#ff7f0e']
  return {r['name']: base[i % len(base)] for i, r in enumerate(runs)}


@plotting.styled
def fig_margins_vs_epoch(runs: list[dict], path: str, title: str) -> str:
  fig, axes = plotting.new_figure(13.5, 6.6, 2, 4)
  colors = _colors(runs)
  kinds = (('fmargin', 'feature-space margin\n' r'$\min_k (f_y - f_k)/\|w_y - w_k\|$'),
           ('margin', 'logit margin\n' r'$f_y - \max_{k \neq y} f_k$'))
  cols = (('train', 'min'), ('train', 'mean'), ('test', 'min'), ('test', 'mean'))
  for i, (kind, ylabel) in enumerate(kinds):
    for j, (split, stat) in enumerate(cols):
      ax = axes[i, j]
      for r in runs:
        ep = [e['epoch'] for e in r['epochs'] if f'{split}_{kind}_{stat}' in e]
        val = [e[f'{split}_{kind}_{stat}'] for e in r['epochs'] if f'{split}_{kind}_{stat}' in e]
        ax.plot(ep, val, marker='o', markersize=3, color=colors[r['name']], label=run_label(r))
      ax.axhline(0.0, color='0.6', linewidth=0.8, linestyle=':')
      ax.set_title(f'{"minimum" if stat == "min" else "average"} margin, {split} set', fontsize=10)
      ax.set_xlabel('epoch')
      if j == 0 or j == 2:
        ax.set_ylabel(ylabel)
      plotting.style_axis(ax)
  axes[0, 0].legend(frameon=False, fontsize=8, loc='best')
  fig.suptitle(title, fontsize=11)
  return plotting.save(fig, path)


@plotting.styled
def fig_histograms(runs: list[dict], path: str, title: str, bins: int = 50) -> str | None:
  runs = [r for r in runs if r['hists']]
  if not runs:
    return None
  values = np.concatenate([h['train_fmargin'] for r in runs for h in r['hists'].values()])
  values = values[np.isfinite(values)]
  # Every negative (misclassified) example stays visible; the long upper tail is folded into the last bin.
  lo, hi = (min(float(values.min()), 0.0), float(np.percentile(values, 99.5))) if values.size else (-1.0, 1.0)
  if not hi > lo:
    lo, hi = lo - 1.0, hi + 1.0
  edges = np.linspace(lo, hi, bins + 1)
  fig, axes = plotting.new_figure(5.2 * len(runs), 4.0, 1, len(runs), sharey=True)
  for j, r in enumerate(runs):
    ax = axes[0, j]
    epochs = list(r['hists'])
    shades = np.linspace(0.25, 0.95, len(epochs))
    for e, sh in zip(epochs, shades):
      v = np.clip(r['hists'][e]['train_fmargin'], lo, hi)
      ax.hist(v, bins=edges, histtype='step', linewidth=1.4, color=(sh * 0.85, 0.2, 1.0 - sh * 0.8),
              label=f'epoch {e}')
    ax.axvline(0.0, color='0.5', linewidth=0.8, linestyle=':')
    ax.set_title(run_label(r), fontsize=9)
    ax.set_xlabel(r'training-set feature-space margin $\min_k (f_y - f_k)/\|w_y - w_k\|$')
    if j == 0:
      ax.set_ylabel('number of training examples')
    ax.legend(frameon=False, fontsize=8)
    plotting.style_axis(ax)
  fig.suptitle(title + ' — training-set margin histograms (values above the 99.5th percentile are put in the last '
               'bin)', fontsize=10)
  return plotting.save(fig, path)


@plotting.styled
def fig_robustness(runs: list[dict], path: str, title: str) -> str | None:
  runs = [r for r in runs if r['final']]
  if not runs:
    return None
  fig, axes = plotting.new_figure(max(5.0, 2.2 * len(runs)), 4.0)
  ax = axes[0, 0]
  x = np.arange(len(runs))
  clean = [100 * r['final']['test']['acc'] for r in runs]
  pgd = [100 * r['final']['test'].get('pgd_acc', float('nan')) for r in runs]
  eps = runs[0]['pgd_eps']
  ax.bar(x - 0.18, clean, 0.36, color='0.6', label='clean test accuracy')
  ax.bar(x + 0.18, pgd, 0.36, color='#d62728',
         label='PGD accuracy (share of clean-correct test examples still correct'
         + (f', L∞ ε = {eps:.3g})' if eps is not None else ')'))
  for xi, c, p in zip(x, clean, pgd):
    ax.text(xi - 0.18, c + 1, f'{c:.1f}', ha='center', fontsize=8)
    ax.text(xi + 0.18, p + 1, f'{p:.1f}', ha='center', fontsize=8)
  ax.set_xticks(x)
  ax.set_xticklabels([run_label(r).replace(' (', '\n(') for r in runs], fontsize=8)
  ax.set_ylabel('accuracy (%)')
  ax.set_ylim(0, 130)
  ax.set_yticks(range(0, 101, 20))
  ax.legend(frameon=False, fontsize=8, loc='upper center', ncol=1)
  plotting.style_axis(ax)
  fig.suptitle(title + ' — robustness', fontsize=10)
  return plotting.save(fig, path)


def _fmt(v) -> str:
  return '—' if v is None or (isinstance(v, float) and not np.isfinite(v)) else f'{v:.4g}'


def section(workdir: str, fig_dir: str, title: str) -> str:
  """The markdown section (and its figures) for the margin-tracked runs of ``workdir``; '' if there are none."""
  runs = load_runs(workdir)
  if not runs:
    return ''
  paths = {'margins': fig_margins_vs_epoch(runs, os.path.join(fig_dir, FIGURES['margins']), title),
           'hist': fig_histograms(runs, os.path.join(fig_dir, FIGURES['hist']), title),
           'robustness': fig_robustness(runs, os.path.join(fig_dir, FIGURES['robustness']), title)}
  L = ['## Minimum vs average margin (Wu & Yu, poster 004)\n']
  L.append('Per epoch, on the clean training and test sets: the **minimum** and the **average** over examples of the '
           'feature-space margin min_k (f_y − f_k)/‖w_y − w_k‖ (the distance of the penultimate features Φ(x) to the '
           'last layer\'s decision boundary — for logistic regression exactly the input-space margin) and of the '
           'logit margin f_y − max_{k≠y} f_k. Margins are signed (negative = misclassified), so the minimum is '
           'negative while any example is misclassified. The poster: standard training raises the minimum margin '
           'and lowers the average; its regularizer, −λ·clip_[0,γ]((w_y − w_k)ᵀΦ(x)) + β Σ_l ‖W_l W_lᵀ − I‖²_F, keeps '
           'the average up and improves robustness.\n')
  L.append('| run | λ | γ | β | epochs | train fmargin min (first → last) | train fmargin mean (first → highest '
           '[epoch] → last) | test fmargin mean (last) | test acc (%) | PGD acc (%) |')
  L.append('|---|---|---|---|---|---|---|---|---|---|')
  for r in runs:
    e0, e1 = r['epochs'][0], r['epochs'][-1]
    peak = max(r['epochs'], key=lambda e: e['train_fmargin_mean'])
    reg = r['regularizer']
    fin = r['final']
    L.append(f'| {r["name"]} | {reg["margin_lambda"]:g} | {reg["margin_gamma"]:g} | {reg["ortho_beta"]:g} | '
             f'{e1["epoch"]} | {_fmt(e0["train_fmargin_min"])} → {_fmt(e1["train_fmargin_min"])} | '
             f'{_fmt(e0["train_fmargin_mean"])} → {_fmt(peak["train_fmargin_mean"])} [{peak["epoch"]}] → '
             f'{_fmt(e1["train_fmargin_mean"])} | {_fmt(e1["test_fmargin_mean"])} | '
             + (f'{100 * fin["test"]["acc"]:.2f} | {100 * fin["test"].get("pgd_acc", float("nan")):.2f} |'
                if fin else '— | — |'))
  L.append('')
  for key, alt in (('margins', 'minimum and average margin per epoch'), ('hist', 'margin histograms'),
                   ('robustness', 'clean and PGD accuracy')):
    if paths.get(key):
      L.append(f'![{alt}](figures/{os.path.basename(paths[key])})\n')
  return '\n'.join(L) + '\n'
