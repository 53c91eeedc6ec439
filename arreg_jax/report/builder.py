"""Writing a sweep's report: ``report.md``, ``claims.json`` and ``figures/*.png`` in the sweep directory.

Reads what the analysis left in every finished run directory (``analysis.json``, ``per_example.npz``,
``metrics.jsonl``), evaluates the claims (:mod:`claims`), draws the figures (:mod:`figures`) and assembles the
markdown (:mod:`tables`). Nothing is recomputed from checkpoints here: rerunning the report is cheap.
"""

from __future__ import annotations

import os

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
  """Writes ``report.md``, ``claims.json`` and the figures for the analysed runs of ``workdir``; returns a dict of
  the paths written and the claims."""
  all_runs = sweep_lib.find_runs(workdir)
  loaded = [x for x in (_load_run(r) for r in all_runs if r.finished) if x is not None]
  missing = [r.name for r in all_runs if not r.finished]
  not_analysed = [r.name for r in all_runs if r.finished and not os.path.exists(os.path.join(r.path, rundir.ANALYSIS))]
  if not loaded:
    raise FileNotFoundError(f'no analysed runs in {workdir}: run python -m arreg_jax.analyze --workdir {workdir}')
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

  claim_list = claims_lib.evaluate(records)
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

  md = _markdown(workdir, group, records, claim_list, exp, meta, paths, missing, not_analysed, group_clip,
                 analysis_seconds, loaded)
  md += '\n' + robustness_section.section([g['analysis'] for g in group])
  md += '\n' + spectral_norm_table.section([g['record'] for g in group], a0.get('paper'), a0.get('model'),
                                 a0['test'].get('eps'))
  md += '\n' + margin_evolution.section(workdir, fig_dir, meta.title)
  report_path = os.path.join(workdir, rundir.REPORT)
  rundir.write_text(report_path, md)
  return {'report': report_path, 'claims': claims_path, 'figures': paths, 'claim_list': claim_list}


def _img(paths: dict, key: str, alt: str) -> str:
  return f'![{alt}](figures/{os.path.basename(paths[key])})\n' if key in paths else ''


def _markdown(workdir, group, records, claim_list, exp, meta, paths, missing, not_analysed, group_clip,
              analysis_seconds, loaded) -> str:
  a0 = group[0]['analysis']
  s0 = a0['settings']
  ss = [g['record']['strength'] for g in group]
  recs = [g['record'] for g in group]
  analyses = [g['analysis'] for g in group]
  eps_of = (lambda s: f'{s:g}/255') if meta.per_255 else (lambda s: f'{s * meta.strength_unit:g}')
  eps_label = (lambda e: f'{e * 255:.3g}/255') if meta.per_255 else (lambda e: f'{e:.3g}')
  lo, hi = group[0], group[-1]
  L = []
  w = L.append

  w(f'# Adversarial robustness as a regularizer — {meta.dataset} / {meta.model}\n')
  w(f'This report checks, on the sweep in `{os.path.abspath(workdir)}`, the findings of Wen, Li & Jia, *Towards '
    'Understanding the Regularization of Adversarial Robustness on Neural Networks* (ICML 2020). The paper trains '
    'the same network with adversarial training (Madry et al. 2018) of increasing **AR strength** — the radius ε of '
    'the L∞ ball the training adversary may search — and shows that stronger adversarial robustness acts as a '
    'regularizer: the gap between training and test loss shrinks, margins and predicted probabilities become less '
    'confident, the spread of each layer\'s singular values shrinks, and the loss varies less inside small '
    'perturbation balls, while clean test accuracy drops.\n')
  w((f'Here **{meta.model}** was trained on **{meta.dataset}** with standard training only (no training attack). '
     if a0.get('attack') == 'none' else
     f'Here **{meta.model}** was trained on **{meta.dataset}** with {a0.get("attack", "pgd").upper()} adversarial '
     f'training at AR strengths {", ".join(f"{s:g}" for s in ss)} (training ε = {", ".join(eps_of(s) for s in ss)}; '
     'strength 0 is standard training). ')
    + (f'The sweep reproduces the paper\'s **{exp.title}** ({exp.table}); published numbers are shown beside '
       'ours.' if exp else 'The sweep does not correspond to a published experiment of the paper, so no published '
       'numbers are shown; the claims are checked on their own terms.')
    + (f' Runs with spectral clipping are present; claims 1–6 use the '
       f'{"runs without clipping" if group_clip is None else f"runs clipped at c = {group_clip:g}"}.'
       if any(r['clip'] is not None for r in records) else '') + '\n')
  if missing or not_analysed:
    w(f'**Partial sweep.** Not finished (not analysed): {", ".join(missing) or "none"}; finished but without '
      f'analysis: {", ".join(not_analysed) or "none"}. Everything below uses the finished, analysed runs only.\n')

  # Claims summary.
  w('## Which of the paper\'s claims hold here\n')
  w('Each claim is tested by an explicit criterion on the measurements (details and numbers in '
    '[the claims in detail](#the-claims-in-detail); machine-readable in `claims.json`). A quantity *rises* '
    f'(*falls*) over AR strength when Spearman\'s ρ between strength and value is ≥ {claims_lib.RHO} '
    f'(≤ −{claims_lib.RHO}) **and** its value at the strongest AR is above (below) its value at the weakest.\n')
  w(tables.claims_table(claim_list) + '\n')

  # Table.
  w('## Final metrics\n')
  w('Accuracies and losses of the final models, in the layout of the paper\'s Tables 3–5: clean accuracy on the '
    'training set (no augmentation) and the test set, ΔAcc = train − test, mean cross-entropy, ΔLoss = test − '
    f'train, and PGD accuracy — the share of clean-correct test examples still classified correctly after '
    f'L∞ PGD-{a0["test"].get("steps", "")} at ε = {eps_label(a0["test"].get("eps", float("nan")))}.'
    + (f' "paper" is {exp.table}; Δ = ours − paper.' if exp else '') + '\n')
  w(tables.metrics_table(recs, exp) + '\n')

  # Figure 1.
  if 'overview' in paths:
    w('## Figure 1 — the whole story in three panels\n')
    std_lo = np.mean(lo['record']['sv_std']) if lo['record'].get('sv_std') else float('nan')
    std_hi = np.mean(hi['record']['sv_std']) if hi['record'].get('sv_std') else float('nan')
    w('(a) The standard deviation of the singular values of every weight layer (convolutions as the linear '
      'operators they apply to inputs of the size they see, Sedghi et al. 2019; dense layers as matrices), one '
      'line per AR strength. The paper finds it smaller at stronger AR in most layers: a layer with a small spread '
      'of singular values amplifies perturbations in all directions more evenly. '
      f'Averaged over layers it goes from {std_lo:.3g} (AR {lo["record"]["strength"]:g}) to {std_hi:.3g} '
      f'(AR {hi["record"]["strength"]:g}). (b) The distribution of test-set margins '
      'f_y(x) − max_{i≠y} f_i(x) (Definition 3; positive = correct, 0 = on the decision boundary). '
      f'Its standard deviation goes {_trend_words([r["test_margin_std"] for r in recs])}. (c) Clean test '
      f'accuracy ({_trend_words([r["test_acc"] for r in recs], "{:.2f}")} %) and PGD accuracy '
      f'({_trend_words([r["pgd_acc"] for r in recs], "{:.2f}")} %) against AR strength.\n')
    w(_img(paths, 'overview', 'Figure 1 analogue'))

  w('## Figure 3 — regularization: losses, errors and their gaps\n')
  w('Top: training and test cross-entropy (a) and error rate (b) against AR strength. Bottom: the generalization '
    'gaps, ΔLoss = test − training loss (c) and ΔAcc = training − test accuracy (d). The paper reads AR as a '
    'regularizer because the training loss rises and the loss gap shrinks with AR strength (its Fig. 3a); the '
    'error gap need not follow (on CIFAR-10 it grows, explained in its appendix B.3 by overfitting that AR does '
    f'not prevent). Here ΔLoss goes {_trend_words([r["loss_gap"] for r in recs], "{:.4f}")} and ΔAcc '
    f'{_trend_words([r["acc_gap"] for r in recs], "{:.2f}")} points.'
    + (' Grey dotted lines with × are the paper\'s numbers.' if exp else '') + '\n')
  w(_img(paths, 'loss_error', 'Figure 3 analogue'))

  if 'margins' in paths:
    w('## Figure 4 — margins concentrate around the decision boundary\n')
    n_tr = analyses[0]['train']['n']
    w('The margin distributions on the training set (left, '
      f'{"all" if s0["max_train_examples"] is None else "first"} {n_tr} examples) and the test set (right), one '
      'curve per AR strength, on bins shared by all strengths (spanning the pooled 0.1–99.9 % quantiles, so the '
      'most extreme 0.2 % of margins are off the plot); the dotted line is margin 0. The paper (§4.2.1) finds that '
      'stronger AR moves the mass toward 0: predictions become less confident, which lowers accuracy (more '
      'examples slip just across the boundary) but also makes wrong predictions less confidently wrong. Median '
      f'margin, train: {_trend_words([r["train_margin_median"] for r in recs])}; test: '
      f'{_trend_words([r["test_margin_median"] for r in recs])}.\n')
    w(_img(paths, 'margins', 'Figure 4 analogue'))
    w('Summary statistics of the same distributions (τ = config `analysis.margin_tau`):\n')
    w(tables.distribution_table(analyses) + '\n')

  if 'prob_loss_sv' in paths:
    w('## Figure 5 — less confident predictions, smaller singular-value spread\n')
    w('(a) Histogram of the estimated probability of the true class, softmax(f(x))_y, on the test set; most '
      'examples sit at the ends (confidently right near 1, confidently wrong near 0), so the inset zooms on the '
      'middle range [0.1, 0.9]. (b) The same examples\' cross-entropy losses, with the corresponding middle range '
      '(−log 0.9 to −log 0.1) in the inset. The paper (§4.2.1) finds more mid-range probabilities at stronger AR, '
      'which is why the test loss can fall even when the test error rises. Fraction of test examples with '
      f'p_y ∈ [0.1, 0.9]: {_trend_words([r["test_prob_mid_frac"] for r in recs], "{:.4f}")}. (c) Per-layer '
      f'singular-value STD of the weakest (AR {lo["record"]["strength"]:g}) and strongest '
      f'(AR {hi["record"]["strength"]:g}) models, as in the paper\'s Fig. 5c,d.\n')
    w(_img(paths, 'prob_loss_sv', 'Figure 5 analogue'))

  if lo['record'].get('sv_std') and hi['record'].get('sv_std') and len(lo['record']['sv_std']) == len(
      hi['record']['sv_std']):
    w('## Singular values layer by layer (appendix B.2)\n')
    cmp = singular_values.compare_std_json(lo['record']['sv_std'], hi['record']['sv_std'])
    w(f'Appendix B.2 splits the layers into those whose singular-value STD is lower at the strongest AR than at '
      f'the weakest and those where it is higher, and compares the accumulated changes. Here (AR '
      f'{lo["record"]["strength"]:g} vs AR {hi["record"]["strength"]:g}):\n')
    w(tables.sv_comparison_table(cmp, lo['record']['strength'], hi['record']['strength'], exp) + '\n')
    w('Per layer (convolutions at the input size they see; "operator input" is that size):\n')
    w(tables.sv_layers_table(analyses) + '\n')

  if 'loss_variation' in paths:
    n_lv = analyses[0]['loss_variation'][0]['n']
    lv_train = s0.get('loss_variation_split') == 'train_correct'
    w('## Figure 8 / Table 1 — the loss varies less around each example\n')
    w((f'For each of the {n_lv} correctly classified examples among the first '
       f'{s0["loss_variation_examples"] or "(all)"} training examples (draft 003, Fig. 3: the maximal loss variation '
       'within a covering ball around training samples; only perturbed points still classified correctly count) '
       if lv_train else f'For each of the first {n_lv} test examples ')
      + 'and each attack radius ε (L∞), the largest increase of the '
      'cross-entropy that PGD finds inside the ε-ball, max ℓ(x′) − ℓ(x) (appendix B.5; PGD from the clean input, '
      f'{s0["loss_variation_steps"]} steps of {s0["loss_variation_step_rel"]:g}·ε, best iterate); bars are the '
      'mean over examples, whiskers +1 standard deviation. The paper finds it smaller for more robust networks: '
      'AR smooths the loss surface around the data. Radii are '
      f'{", ".join(f"{r:g}" for r in [e / float(a0["test"].get("eps", 1)) for e in s0["loss_variation_eps"]])} × '
      'the evaluation PGD ε (1, 2, 4 /255 in the paper\'s CIFAR setting).'
      + (' The paper attacked the whole test set; we attack a subset, so compare trends, not third decimals.'
         if exp else '') + '\n')
    w(_img(paths, 'loss_variation', 'Figure 8 analogue'))
    w(tables.loss_variation_table(recs, eps_label, exp) + '\n')

  if 'clip_grid' in paths:
    w('## Figure 6 / Table 6 — AR with controlled capacity (spectral clipping)\n')
    w('The paper clips every layer\'s singular values at c after each epoch (appendix B.4.2) to limit the '
      'network\'s capacity. Lines: loss gap (a) and error gap (b) against AR strength, one per clipping '
      'threshold. The paper finds the error gap turning from growing to shrinking with AR as the clip tightens, '
      'while the loss gap shrinks throughout.\n')
    w(_img(paths, 'clip_grid', 'Figure 6 analogue'))
    w(tables.clip_table(records, exp) + '\n')

  w('## Theorem 3.1 — the terms of the bound\n')
  w('The paper bounds the generalization error by max{0, 1 − u_min/γ} + sqrt(2 log 2 · C_X^k / (ε^k m) + '
    '2 log(1/η)/m), with u_min = min_{y≠ŷ}‖w_y − w_ŷ‖₂ · ∏_{i<L} σ_min(W_i) · v_min (eq. 4–5). We report each '
    'factor: the smallest distance between two rows of the last layer, the sum of log smallest singular values '
    'of the other layers, and v̂_min, an estimate of the smallest L2 distance from a training example to the '
    'decision boundary (Definition 6). v̂_min is estimated on a subset: the '
    f'first {analyses[0]["boundary"]["screened"]} training examples are screened by their first-order distance '
    f'M/‖∇ₓM‖ and the {analyses[0]["boundary"]["refined"]} closest are refined by bisection on the radius of an '
    'L2 PGD attack; each value is an upper bound certified by an adversarial example, so v̂_min upper-bounds the '
    'true minimum. γ is the median training margin unless config `analysis.bound.gamma` sets it; the covering '
    f'term uses C_X = {s0["bound"]["c_x"]:g}, k = {s0["bound"]["k"]:g}, η = {s0["bound"]["eta"]:g} and is shown '
    'as log10. log SC = Σ log ‖W_i‖₂ is the log spectral complexity (Definition 7). The bound is a worst-case '
    'guide — with a few training examples essentially on the boundary v̂_min is tiny and the margin term is '
    'close to 1 — and the paper studies the distributions above instead (its footnotes 2–3).\n')
  w(tables.bound_table(analyses) + '\n')

  # Claims in detail.
  w('## The claims in detail\n')
  for c in claim_list:
    w(f'**{c["id"]}. {c["claim"]}** ({c["where"]}) — **{c["verdict"]}**  ')
    w(f'Criterion: {c["criterion"]}.  ')
    w(f'Evidence: {c["summary"]}.\n')

  # Cost.
  w('## Settings and cost of the analysis\n')
  per_run = [r['analysis'].get('timing', {}).get('total_s') for r in loaded]
  per_run = [t for t in per_run if t is not None]
  epoch_s = _epoch_seconds(loaded)
  parts = []
  if analysis_seconds is not None:
    parts.append(f'this analysis took {analysis_seconds:.1f} s of wall time for {len(loaded)} run(s)')
  if per_run:
    parts.append(f'the per-run analyses recorded {sum(per_run):.1f} s in total')
  if epoch_s:
    parts.append(f'one epoch of an adversarially trained member took {epoch_s:.1f} s on average (training and '
                 'per-epoch evaluation, metrics.jsonl; first epochs, which include compilation, left out)')
    if analysis_seconds is not None:
      parts.append(f'so the analysis of the whole sweep cost {analysis_seconds / epoch_s:.2f} epochs of one member')
  if parts:
    w('Timing: ' + '; '.join(parts) + '. Machine load at training time and now may differ.\n')
  w('Subsets: margins, probabilities and losses use '
    + ('all' if s0['max_train_examples'] is None else f'the first {s0["max_train_examples"]}') + ' training and '
    + ('all' if s0['max_test_examples'] is None else f'the first {s0["max_test_examples"]}') + ' test examples; '
    + (f'loss variation {analyses[0]["loss_variation"][0]["n"]} correctly classified training examples; '
       if s0.get('loss_variation_split') == 'train_correct' else
       f'loss variation the first {analyses[0]["loss_variation"][0]["n"]} test examples; ') + 'v̂_min '
    f'{analyses[0]["boundary"]["screened"]} screened / {analyses[0]["boundary"]["refined"]} refined training '
    'examples; PGD accuracy comes from the end-of-training evaluation over the whole test set. Settings are in '
    'each run\'s `analysis.json` (`settings`) and in the config block `analysis`.\n')
  return '\n'.join(L)
