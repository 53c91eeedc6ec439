"""Writing a sweep's report: ``report.md``, ``claims.json`` and ``figures/*.png`` in the sweep directory.

Reads what the analysis left in every finished run directory (``analysis.json``, ``per_example.npz``,
``metrics.jsonl``), evaluates the claims (:mod:`claims`), draws the figures (:mod:`figures`) and assembles the
markdown (:mod:`tables`). Nothing is recomputed from checkpoints here: rerunning the report is cheap.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from arreg_jax import rundir
from arreg_jax import sweep as sweep_lib
from arreg_jax.analysis import singular_values
from arreg_jax.report import claims as claims_lib
from arreg_jax.report import figures
from arreg_jax.report import margin_evolution
from arreg_jax.report import spectral_norm_table
from arreg_jax.report import paper as paper_lib
from arreg_jax.report import plotting
from arreg_jax.report import robustness_section
from arreg_jax.report import tables

FIGURES = {
    'overview': 'fig1_overview.png',
    'loss_error': 'fig3_loss_error.png',
    'margins': 'fig4_margins.png',
    'prob_loss_sv': 'fig5_prob_loss_sv.png',
    'loss_variation': 'fig8_loss_variation.png',
    'clip_grid': 'fig6_spectral_clipping.png',
}


def _load_run(run: sweep_lib.RunInfo) -> dict | None:
  path = os.path.join(run.path, rundir.ANALYSIS)
  if not os.path.exists(path):
    return None
  analysis = rundir.read_json(path)
  npz = os.path.join(run.path, rundir.PER_EXAMPLE)
  arrays = dict(np.load(npz)) if os.path.exists(npz) else {}
  epochs = rundir.read_jsonl(os.path.join(run.path, rundir.METRICS))
  return {'info': run, 'analysis': analysis, 'arrays': arrays, 'epochs': epochs,
          'record': claims_lib.record_from_analysis(analysis)}


def _epoch_seconds(runs: list[dict]) -> float | None:
  """Mean wall time of one training epoch of the adversarially trained members (epochs after the first, which
  includes compilation), from metrics.jsonl."""
  times = [e['epoch_time_s'] for r in runs if r['analysis']['strength'] > 0 for e in r['epochs'][1:]
           if 'epoch_time_s' in e]
  if not times:
    times = [e['epoch_time_s'] for r in runs for e in r['epochs'][1:] if 'epoch_time_s' in e]
  return float(np.mean(times)) if times else None


def _trend_words(values, better_fmt='{:.3g}') -> str:
  return ' → '.join(better_fmt.format(v) for v in values)


def write_report(workdir: str, *, analysis_seconds: float | None = None) -> dict:
  """Writes ``report.md``, ``claims.json`` and the figures for the analyzed runs of ``workdir``; returns a dict of
  the paths written and the claims."""
  all_runs = sweep_lib.find_runs(workdir)
  loaded = [x for x in (_load_run(r) for r in all_runs if r.finished) if x is not None]
  missing = [r.name for r in all_runs if not r.finished]
  not_analyzed = [r.name for r in all_runs if r.finished and not os.path.exists(os.path.join(r.path, rundir.ANALYSIS))]
  if not loaded:
    raise FileNotFoundError(f'no analyzed runs in {workdir}: run python -m arreg_jax.analyze --workdir {workdir}')
  # A sweep that also varies the average-margin regularizer (poster 004): the AR-strength analysis below uses the
  # unregularized members; the margin section at the end compares all of them.
  loaded = [r for r in loaded if not r['info'].regularized] or loaded
  fig_dir = os.path.join(workdir, rundir.FIGURES)
  os.makedirs(fig_dir, exist_ok=True)

  records = [r['record'] for r in loaded]
  group_records, group_clip = claims_lib.primary_group(records)
  by_key = {(r['record']['clip'], r['record']['strength']): r for r in loaded}
  group = [by_key[(r['clip'], r['strength'])] for r in group_records]
  a0 = group[0]['analysis']
  exp = paper_lib.get(a0.get('paper'))
  unit = float(a0.get('strength_unit', 1.0))
  attack = a0.get('attack', 'pgd')
  meta = plotting.Meta(dataset=a0['dataset'], model=a0['model'], strength_unit=unit,
                      title=f'{a0["dataset"]} · {a0["model"]} · '
                      + ('standard training' if attack == 'none' else f'{attack.upper()} adversarial training')
                      + (f' (paper: {exp.title})' if exp else ''))
  colors = plotting.strength_colors([r['record']['strength'] for r in group])
  views = [plotting.RunView(r['record']['strength'], r['record'], r['analysis'], r['arrays']) for r in group]

  claim_list = claims_lib.check_claims(records)
  claims_path = os.path.join(workdir, rundir.CLAIMS)
  rundir.write_json(claims_path, safe=True, obj={
      'workdir': os.path.abspath(workdir), 'dataset': meta.dataset, 'model': meta.model, 'paper': a0.get('paper'),
      'rho_threshold': claims_lib.RHO, 'claims': claim_list})

  paths = {}
  have_arrays = all('test_margin' in v.arrays for v in views)
  if have_arrays:
    paths['overview'] = figures.fig_overview(views, colors, meta, os.path.join(fig_dir, FIGURES['overview']))
  paths['loss_error'] = figures.fig_loss_error(views, colors, meta, os.path.join(fig_dir, FIGURES['loss_error']),
                                               paper_rows=exp.rows if exp else None)
  if have_arrays:
    paths['margins'] = figures.fig_margins(views, colors, meta, os.path.join(fig_dir, FIGURES['margins']))
    paths['prob_loss_sv'] = figures.fig_prob_loss_sv(views, colors, meta,
                                                     os.path.join(fig_dir, FIGURES['prob_loss_sv']))
  if all(v.record.get('loss_variation') for v in views):
    paths['loss_variation'] = figures.fig_loss_variation(
        views, colors, meta, os.path.join(fig_dir, FIGURES['loss_variation']),
        paper_lv=exp.loss_variation if exp else None, paper_eps_255=exp.loss_variation_eps_255 if exp else ())
  has_clip = any(r['clip'] is not None for r in records)
  if has_clip:
    paths['clip_grid'] = figures.fig_clip_grid(records, meta, os.path.join(fig_dir, FIGURES['clip_grid']),
                                               paper_clip=exp.spectral_clipping if exp else None)

  md = _markdown(_Report(workdir=workdir, group=group, records=records, claim_list=claim_list, exp=exp, meta=meta,
                         paths=paths, missing=missing, not_analyzed=not_analyzed, group_clip=group_clip,
                         analysis_seconds=analysis_seconds, loaded=loaded))
  md += '\n' + robustness_section.section([g['analysis'] for g in group])
  md += '\n' + spectral_norm_table.section([g['record'] for g in group], a0.get('paper'), a0.get('model'),
                                 a0['test'].get('eps'))
  md += '\n' + margin_evolution.section(workdir, fig_dir, meta.title)
  report_path = os.path.join(workdir, rundir.REPORT)
  rundir.write_text(report_path, md)
  return {'report': report_path, 'claims': claims_path, 'figures': paths, 'claim_list': claim_list}


def _img(paths: dict, key: str, alt: str) -> str:
  return f'![{alt}](figures/{os.path.basename(paths[key])})\n' if key in paths else ''


@dataclasses.dataclass(frozen=True)
class _Report:
  """What the sections of ``report.md`` read: the sweep, its primary group of runs (claims 1–6) and the figures."""
  workdir: str
  group: list  # the loaded runs of the primary group, by strength
  records: list  # the claim records of every analyzed run
  claim_list: list
  exp: Any  # the published experiment (arreg_jax.report.paper), or None
  meta: plotting.Meta
  paths: dict  # figure key -> path written
  missing: list
  not_analyzed: list
  group_clip: float | None
  analysis_seconds: float | None
  loaded: list  # every loaded run

  @property
  def a0(self) -> dict:
    return self.group[0]['analysis']

  @property
  def s0(self) -> dict:
    return self.a0['settings']

  @property
  def recs(self) -> list:
    return [g['record'] for g in self.group]

  @property
  def analyses(self) -> list:
    return [g['analysis'] for g in self.group]

  @property
  def lo(self) -> dict:
    return self.group[0]

  @property
  def hi(self) -> dict:
    return self.group[-1]

  def eps_of(self, s: float) -> str:
    return f'{s:g}/255' if self.meta.per_255 else f'{s * self.meta.strength_unit:g}'

  def eps_label(self, e: float) -> str:
    return f'{e * 255:.3g}/255' if self.meta.per_255 else f'{e:.3g}'


def _intro(r: _Report) -> list[str]:
  meta, a0, exp = r.meta, r.a0, r.exp
  ss = [g['record']['strength'] for g in r.group]
  out = [f'# Adversarial robustness as a regularizer — {meta.dataset} / {meta.model}\n']
  out.append(f'This report checks, on the sweep in `{os.path.abspath(r.workdir)}`, the findings of Wen, Li & Jia, '
             '*Towards Understanding the Regularization of Adversarial Robustness on Neural Networks* (ICML 2020). '
             'The paper trains the same network with adversarial training (Madry et al. 2018) of increasing **AR '
             'strength** — the radius ε of the L∞ ball the training adversary may search — and shows that stronger '
             'adversarial robustness acts as a regularizer: the gap between training and test loss shrinks, margins '
             'and predicted probabilities become less confident, the spread of each layer\'s singular values '
             'shrinks, and the loss varies less inside small perturbation balls, while clean test accuracy drops.\n')
  out.append((f'Here **{meta.model}** was trained on **{meta.dataset}** with standard training only (no training '
              'attack). ' if a0.get('attack') == 'none' else
              f'Here **{meta.model}** was trained on **{meta.dataset}** with {a0.get("attack", "pgd").upper()} '
              f'adversarial training at AR strengths {", ".join(f"{s:g}" for s in ss)} (training ε = '
              f'{", ".join(r.eps_of(s) for s in ss)}; strength 0 is standard training). ')
             + (f'The sweep reproduces the paper\'s **{exp.title}** ({exp.table}); published numbers are shown '
                'beside ours.' if exp else 'The sweep does not correspond to a published experiment of the paper, so '
                'no published numbers are shown; the claims are checked on their own terms.')
             + (f' Runs with spectral clipping are present; claims 1–6 use the '
                f'{"runs without clipping" if r.group_clip is None else f"runs clipped at c = {r.group_clip:g}"}.'
                if any(rec['clip'] is not None for rec in r.records) else '') + '\n')
  if r.missing or r.not_analyzed:
    out.append(f'**Partial sweep.** Not finished (not analyzed): {", ".join(r.missing) or "none"}; finished but '
               f'without analysis: {", ".join(r.not_analyzed) or "none"}. Everything below uses the finished, '
               'analyzed runs only.\n')
  return out


def _claims_summary(r: _Report) -> list[str]:
  return ['## Which of the paper\'s claims hold here\n',
          'Each claim is tested by an explicit criterion on the measurements (details and numbers in '
          '[the claims in detail](#the-claims-in-detail); machine-readable in `claims.json`). A quantity *rises* '
          f'(*falls*) over AR strength when Spearman\'s ρ between strength and value is ≥ {claims_lib.RHO} '
          f'(≤ −{claims_lib.RHO}) **and** its value at the strongest AR is above (below) its value at the '
          'weakest.\n',
          tables.claims_table(r.claim_list) + '\n']


def _final_metrics(r: _Report) -> list[str]:
  test = r.a0['test']
  return ['## Final metrics\n',
          'Accuracies and losses of the final models, in the layout of the paper\'s Tables 3–5: clean accuracy on '
          'the training set (no augmentation) and the test set, ΔAcc = train − test, mean cross-entropy, ΔLoss = '
          'test − train, and PGD accuracy — the share of clean-correct test examples still classified correctly '
          f'after L∞ PGD-{test.get("steps", "")} at ε = {r.eps_label(test.get("eps", float("nan")))}.'
          + (f' "paper" is {r.exp.table}; Δ = ours − paper.' if r.exp else '') + '\n',
          tables.metrics_table(r.recs, r.exp) + '\n']


def _figure1(r: _Report) -> list[str]:
  if 'overview' not in r.paths:
    return []
  lo, hi, recs = r.lo['record'], r.hi['record'], r.recs
  std_lo = np.mean(lo['sv_std']) if lo.get('sv_std') else float('nan')
  std_hi = np.mean(hi['sv_std']) if hi.get('sv_std') else float('nan')
  return ['## Figure 1 — the whole story in three panels\n',
          '(a) The standard deviation of the singular values of every weight layer (convolutions as the linear '
          'operators they apply to inputs of the size they see, Sedghi et al. 2019; dense layers as matrices), one '
          'line per AR strength. The paper finds it smaller at stronger AR in most layers: a layer with a small '
          'spread of singular values amplifies perturbations in all directions more evenly. '
          f'Averaged over layers it goes from {std_lo:.3g} (AR {lo["strength"]:g}) to {std_hi:.3g} '
          f'(AR {hi["strength"]:g}). (b) The distribution of test-set margins '
          'f_y(x) − max_{i≠y} f_i(x) (Definition 3; positive = correct, 0 = on the decision boundary). '
          f'Its standard deviation goes {_trend_words([x["test_margin_std"] for x in recs])}. (c) Clean test '
          f'accuracy ({_trend_words([x["test_acc"] for x in recs], "{:.2f}")} %) and PGD accuracy '
          f'({_trend_words([x["pgd_acc"] for x in recs], "{:.2f}")} %) against AR strength.\n',
          _img(r.paths, 'overview', 'Figure 1 analogue')]


def _figure3(r: _Report) -> list[str]:
  return ['## Figure 3 — regularization: losses, errors and their gaps\n',
          'Top: training and test cross-entropy (a) and error rate (b) against AR strength. Bottom: the '
          'generalization gaps, ΔLoss = test − training loss (c) and ΔAcc = training − test accuracy (d). The paper '
          'reads AR as a regularizer because the training loss rises and the loss gap shrinks with AR strength (its '
          'Fig. 3a); the error gap need not follow (on CIFAR-10 it grows, explained in its appendix B.3 by '
          f'overfitting that AR does not prevent). Here ΔLoss goes '
          f'{_trend_words([x["loss_gap"] for x in r.recs], "{:.4f}")} and ΔAcc '
          f'{_trend_words([x["acc_gap"] for x in r.recs], "{:.2f}")} points.'
          + (' Grey dotted lines with × are the paper\'s numbers.' if r.exp else '') + '\n',
          _img(r.paths, 'loss_error', 'Figure 3 analogue')]


def _figure4(r: _Report) -> list[str]:
  if 'margins' not in r.paths:
    return []
  n_tr = r.analyses[0]['train']['n']
  return ['## Figure 4 — margins concentrate around the decision boundary\n',
          'The margin distributions on the training set (left, '
          f'{"all" if r.s0["max_train_examples"] is None else "first"} {n_tr} examples) and the test set (right), '
          'one curve per AR strength, on bins shared by all strengths (spanning the pooled 0.1–99.9 % quantiles, so '
          'the most extreme 0.2 % of margins are off the plot); the dotted line is margin 0. The paper (§4.2.1) '
          'finds that stronger AR moves the mass toward 0: predictions become less confident, which lowers '
          'accuracy (more examples slip just across the boundary) but also makes wrong predictions less '
          f'confidently wrong. Median margin, train: {_trend_words([x["train_margin_median"] for x in r.recs])}; '
          f'test: {_trend_words([x["test_margin_median"] for x in r.recs])}.\n',
          _img(r.paths, 'margins', 'Figure 4 analogue'),
          'Summary statistics of the same distributions (τ = config `analysis.margin_tau`):\n',
          tables.distribution_table(r.analyses) + '\n']


def _figure5(r: _Report) -> list[str]:
  if 'prob_loss_sv' not in r.paths:
    return []
  return ['## Figure 5 — less confident predictions, smaller singular-value spread\n',
          '(a) Histogram of the estimated probability of the true class, softmax(f(x))_y, on the test set; most '
          'examples sit at the ends (confidently right near 1, confidently wrong near 0), so the inset zooms on '
          'the middle range [0.1, 0.9]. (b) The same examples\' cross-entropy losses, with the corresponding '
          'middle range (−log 0.9 to −log 0.1) in the inset. The paper (§4.2.1) finds more mid-range probabilities '
          'at stronger AR, which is why the test loss can fall even when the test error rises. Fraction of test '
          f'examples with p_y ∈ [0.1, 0.9]: {_trend_words([x["test_prob_mid_frac"] for x in r.recs], "{:.4f}")}. '
          f'(c) Per-layer singular-value STD of the weakest (AR {r.lo["record"]["strength"]:g}) and strongest '
          f'(AR {r.hi["record"]["strength"]:g}) models, as in the paper\'s Fig. 5c,d.\n',
          _img(r.paths, 'prob_loss_sv', 'Figure 5 analogue')]


def _singular_values(r: _Report) -> list[str]:
  lo, hi = r.lo['record'], r.hi['record']
  if not (lo.get('sv_std') and hi.get('sv_std') and len(lo['sv_std']) == len(hi['sv_std'])):
    return []
  cmp = singular_values.compare_std_json(lo['sv_std'], hi['sv_std'])
  return ['## Singular values layer by layer (appendix B.2)\n',
          'Appendix B.2 splits the layers into those whose singular-value STD is lower at the strongest AR than at '
          'the weakest and those where it is higher, and compares the accumulated changes. Here (AR '
          f'{lo["strength"]:g} vs AR {hi["strength"]:g}):\n',
          tables.sv_comparison_table(cmp, lo['strength'], hi['strength'], r.exp) + '\n',
          'Per layer (convolutions at the input size they see; "operator input" is that size):\n',
          tables.sv_layers_table(r.analyses) + '\n']


def _loss_variation(r: _Report) -> list[str]:
  if 'loss_variation' not in r.paths:
    return []
  s0 = r.s0
  n_lv = r.analyses[0]['loss_variation'][0]['n']
  lv_train = s0.get('loss_variation_split') == 'train_correct'
  radii = ', '.join(f'{x:g}' for x in [e / float(r.a0['test'].get('eps', 1)) for e in s0['loss_variation_eps']])
  return ['## Figure 8 / Table 1 — the loss varies less around each example\n',
          (f'For each of the {n_lv} correctly classified examples among the first '
           f'{s0["loss_variation_examples"] or "(all)"} training examples (draft 003, Fig. 3: the maximal loss '
           'variation within a covering ball around training samples; only perturbed points still classified '
           'correctly count) ' if lv_train else f'For each of the first {n_lv} test examples ')
          + 'and each attack radius ε (L∞), the largest increase of the '
          'cross-entropy that PGD finds inside the ε-ball, max ℓ(x′) − ℓ(x) (appendix B.5; PGD from the clean '
          f'input, {s0["loss_variation_steps"]} steps of {s0["loss_variation_step_rel"]:g}·ε, best iterate); bars '
          'are the mean over examples, whiskers +1 standard deviation. The paper finds it smaller for more robust '
          f'networks: AR smooths the loss surface around the data. Radii are {radii} × '
          'the evaluation PGD ε (1, 2, 4 /255 in the paper\'s CIFAR setting).'
          + (' The paper attacked the whole test set; we attack a subset, so compare trends, not third decimals.'
             if r.exp else '') + '\n',
          _img(r.paths, 'loss_variation', 'Figure 8 analogue'),
          tables.loss_variation_table(r.recs, r.eps_label, r.exp) + '\n']


def _spectral_clipping(r: _Report) -> list[str]:
  if 'clip_grid' not in r.paths:
    return []
  return ['## Figure 6 / Table 6 — AR with controlled capacity (spectral clipping)\n',
          'The paper clips every layer\'s singular values at c after each epoch (appendix B.4.2) to limit the '
          'network\'s capacity. Lines: loss gap (a) and error gap (b) against AR strength, one per clipping '
          'threshold. The paper finds the error gap turning from growing to shrinking with AR as the clip tightens, '
          'while the loss gap shrinks throughout.\n',
          _img(r.paths, 'clip_grid', 'Figure 6 analogue'),
          tables.clip_table(r.records, r.exp) + '\n']


def _bound(r: _Report) -> list[str]:
  b, bnd = r.s0['bound'], r.analyses[0]['boundary']
  return ['## Theorem 3.1 — the terms of the bound\n',
          'The paper bounds the generalization error by max{0, 1 − u_min/γ} + sqrt(2 log 2 · C_X^k / (ε^k m) + '
          '2 log(1/η)/m), with u_min = min_{y≠ŷ}‖w_y − w_ŷ‖₂ · ∏_{i<L} σ_min(W_i) · v_min (eq. 4–5). We report '
          'each factor: the smallest distance between two rows of the last layer, the sum of log smallest singular '
          'values of the other layers, and v̂_min, an estimate of the smallest L2 distance from a training example '
          'to the decision boundary (Definition 6). v̂_min is estimated on a subset: the '
          f'first {bnd["screened"]} training examples are screened by their first-order distance '
          f'M/‖∇ₓM‖ and the {bnd["refined"]} closest are refined by bisection on the radius of an '
          'L2 PGD attack; each value is an upper bound certified by an adversarial example, so v̂_min upper-bounds '
          'the true minimum. γ is the median training margin unless config `analysis.bound.gamma` sets it; the '
          f'covering term uses C_X = {b["c_x"]:g}, k = {b["k"]:g}, η = {b["eta"]:g} and is shown '
          'as log10. log SC = Σ log ‖W_i‖₂ is the log spectral complexity (Definition 7). The bound is a worst-case '
          'guide — with a few training examples essentially on the boundary v̂_min is tiny and the margin term is '
          'close to 1 — and the paper studies the distributions above instead (its footnotes 2–3).\n',
          tables.bound_table(r.analyses) + '\n']


def _claims_detail(r: _Report) -> list[str]:
  out = ['## The claims in detail\n']
  for c in r.claim_list:
    out += [f'**{c["id"]}. {c["claim"]}** ({c["where"]}) — **{c["verdict"]}**  ',
            f'Criterion: {c["criterion"]}.  ', f'Evidence: {c["summary"]}.\n']
  return out


def _cost(r: _Report) -> list[str]:
  s0, analyses = r.s0, r.analyses
  per_run = [x['analysis'].get('timing', {}).get('total_s') for x in r.loaded]
  per_run = [t for t in per_run if t is not None]
  epoch_s = _epoch_seconds(r.loaded)
  parts = []
  if r.analysis_seconds is not None:
    parts.append(f'this analysis took {r.analysis_seconds:.1f} s of wall time for {len(r.loaded)} run(s)')
  if per_run:
    parts.append(f'the per-run analyses recorded {sum(per_run):.1f} s in total')
  if epoch_s:
    parts.append(f'one epoch of an adversarially trained member took {epoch_s:.1f} s on average (training and '
                 'per-epoch evaluation, metrics.jsonl; first epochs, which include compilation, left out)')
    if r.analysis_seconds is not None:
      parts.append(f'so the analysis of the whole sweep cost {r.analysis_seconds / epoch_s:.2f} epochs of one '
                   'member')
  out = ['## Settings and cost of the analysis\n']
  if parts:
    out.append('Timing: ' + '; '.join(parts) + '. Machine load at training time and now may differ.\n')
  lv_n = analyses[0]['loss_variation'][0]['n'] if analyses[0]['loss_variation'] else 0
  out.append('Subsets: margins, probabilities and losses use '
             + ('all' if s0['max_train_examples'] is None else f'the first {s0["max_train_examples"]}')
             + ' training and '
             + ('all' if s0['max_test_examples'] is None else f'the first {s0["max_test_examples"]}')
             + ' test examples; '
             + (f'loss variation {lv_n} correctly classified training examples; '
                if s0.get('loss_variation_split') == 'train_correct' else
                f'loss variation the first {lv_n} test examples; ') + 'v̂_min '
             f'{analyses[0]["boundary"]["screened"]} screened / {analyses[0]["boundary"]["refined"]} refined '
             'training examples; PGD accuracy comes from the end-of-training evaluation over the whole test set. '
             'Settings are in each run\'s `analysis.json` (`settings`) and in the config block `analysis`.\n')
  return out


# The sections of report.md in order; each returns its paragraphs (an empty list when it does not apply).
SECTIONS = (_intro, _claims_summary, _final_metrics, _figure1, _figure3, _figure4, _figure5, _singular_values,
            _loss_variation, _spectral_clipping, _bound, _claims_detail, _cost)


def _markdown(report: _Report) -> str:
  return '\n'.join(part for section in SECTIONS for part in section(report))
