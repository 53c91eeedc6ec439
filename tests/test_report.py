"""The report: the claims logic on synthetic sweeps, the paper's numbers, tables, figures, and the CLI end to end."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from arreg_jax.report import builder, claims, paper, plotting, tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- trend


@pytest.mark.parametrize('values,direction', [
    ([1, 2, 3], 'rises'), ([3, 2, 1], 'falls'), ([1, 3, 2], 'rises'),  # ρ = 0.5, end above start
    ([2, 3, 1], 'falls'), ([1, 1, 1], 'flat'), ([1, 3, 1], 'flat'), ([5, 4], 'falls'), ([4, 5], 'rises'),
    ([1, 3, 2, 4], 'rises'), ([1, 4, 2, 3], 'flat'), ([2, 1, 4, 0.5], 'flat'),  # ρ = 0.8, 0.4, −0.2
])
def test_trend(values, direction):
  assert claims.trend(list(range(len(values))), values)['direction'] == direction


def test_trend_orders_by_strength():
  assert claims.trend([16, 4, 8], [3.0, 1.0, 2.0])['direction'] == 'rises'


# --- claims


def _record(s, *, clip=None, paper_like=True, n_layers=6):
  """A synthetic run whose measurements follow the paper (``paper_like``) or go the other way."""
  k = s if paper_like else -s
  std = [1.0 - 0.02 * k * (i % 3 != 0) + 0.001 * k * (i % 3 == 0) for i in range(n_layers)]
  return {
      'strength': float(s), 'clip': clip, 'run': f'ar{s}',
      'train_acc': 99.5 - 0.2 * k, 'test_acc': 88.0 - 0.2 * k, 'acc_gap': 11.5 - 0.1 * k,
      'train_loss': 0.02 + 0.005 * k, 'test_loss': 0.68 - 0.01 * k, 'loss_gap': 0.66 - 0.015 * k,
      'pgd_acc': 60 + k, 'train_margin_std': 5 - 0.1 * k, 'train_margin_median': 8 - 0.2 * k,
      'test_margin_std': 6 - 0.1 * k, 'test_margin_median': 7 - 0.2 * k, 'test_prob_mid_frac': 0.05 + 0.002 * k,
      'sv_std': std, 'sv_names': [f'l{i}' for i in range(n_layers)],
      'loss_variation': [{'eps': e, 'mean': e * (0.1 - 0.002 * k), 'std': 0.1} for e in (1 / 255, 2 / 255, 4 / 255)],
  }


def _verdicts(records):
  return {c['id']: c['verdict'] for c in claims.check_claims(records)}


def test_claims_hold_on_a_paper_like_sweep():
  v = _verdicts([_record(s) for s in (4, 8, 16)])
  assert v == {1: 'holds', 2: 'holds', 3: 'holds', 4: 'holds', 5: 'holds', 6: 'holds', 7: 'not applicable'}


def test_claims_fail_on_a_reversed_sweep():
  v = _verdicts([_record(s, paper_like=False) for s in (4, 8, 16)])
  assert all(v[i] == 'does not hold' for i in range(1, 7)), v
  assert v[7] == 'not applicable'


def test_single_part_failures_are_detected():
  recs = [_record(s) for s in (4, 8, 16)]
  recs[-1]['loss_gap'] = 1.0  # the gap grows at the strongest AR: claim 1 fails, nothing else
  recs[0]['loss_variation'][2]['mean'] = 0.0  # at the largest ε the variation now rises: claim 6 fails
  v = _verdicts(recs)
  assert v[1] == 'does not hold' and v[6] == 'does not hold'
  assert v[2] == v[3] == v[4] == v[5] == 'holds'


def test_claim5_needs_more_than_half_of_the_layers():
  lo, hi = _record(4), _record(16)
  lo['sv_std'] = [1.0, 1.0, 1.0, 1.0]
  hi['sv_std'] = [0.5, 0.5, 2.0, 2.0]  # exactly half shrink: not "most"
  assert _verdicts([lo, hi])[5] == 'does not hold'
  hi['sv_std'] = [0.5, 0.5, 0.5, 2.0]
  c5 = [c for c in claims.check_claims([lo, hi]) if c['id'] == 5][0]
  assert c5['verdict'] == 'holds'
  cmp = c5['evidence'][0]['comparison']
  assert cmp['decrease_sum'] == pytest.approx(1.5) and cmp['increase_sum'] == pytest.approx(1.0)


def test_too_few_strengths_is_not_applicable():
  v = _verdicts([_record(8)])
  assert set(v.values()) == {'not applicable'}


def test_claim7_uses_the_tightest_clip_and_claims_1_to_6_the_unclipped_runs():
  recs = [_record(s) for s in (4, 8, 16)]
  for c, falls in ((1.0, True), (3.0, False)):
    for s in (4, 8, 16):
      r = _record(s, clip=c, paper_like=False)  # clipped runs go the "wrong" way on claims 1–6 ...
      r['acc_gap'] = 10 - (0.1 * s if falls else -0.1 * s)  # ... but the tightest clip's error gap falls
      recs.append(r)
  out = claims.check_claims(recs)
  v = {c['id']: c['verdict'] for c in out}
  assert v == {1: 'holds', 2: 'holds', 3: 'holds', 4: 'holds', 5: 'holds', 6: 'holds', 7: 'holds'}
  assert out[6]['clip'] == 1.0 and out[0]['group']['clip'] is None
  for r in recs:
    if r['clip'] == 1.0:
      r['acc_gap'] = 10 + 0.1 * r['strength']
  assert _verdicts(recs)[7] == 'does not hold'


def test_claims_are_json_serializable():
  json.dumps(claims.check_claims([_record(s) for s in (0, 0.1, 0.2, 0.3)]))


# --- paper numbers, tables


def test_paper_numbers_are_consistent():
  keys = {'cifar10_resnet56', 'cifar100_resnet56', 'cifar10_resnet110', 'cifar100_resnet110',
          'cifar10_resnet56_fgsm', 'cifar100_resnet56_fgsm', 'tiny_imagenet_wrn50_2'}
  assert keys <= set(paper.EXPERIMENTS)
  for exp in paper.EXPERIMENTS.values():
    rows = list(exp.rows.values()) + [r for g in exp.spectral_clipping.values() for r in g.values()]
    for r in rows:
      if 'train_acc' in r:
        assert r['acc_gap'] == pytest.approx(r['train_acc'] - r['test_acc'], abs=0.011), (exp.key, r)
      if 'train_loss' in r:
        assert r['loss_gap'] == pytest.approx(r['test_loss'] - r['train_loss'], abs=0.0011), (exp.key, r)
  assert paper.get('tiny_imagenet_wrn50_2').rows[16.0]['pgd_acc'] == 53.12
  assert paper.get('cifar10_resnet56').loss_variation[16.0][2] == (0.0888, 0.1816)
  assert paper.get(None) is None and paper.get('mnist') is None


def test_metrics_table_with_paper_columns_and_escaping():
  recs = [_record(s) for s in (4, 8, 16)]
  md = tables.metrics_table(recs, paper.get('cifar10_resnet56'))
  header = md.splitlines()[0]
  assert header.count('paper') == 3 and header.count('Δ') == 3
  assert '| Trn Acc. (%) | 98.70 | 99.51 | −0.81 |' in md
  assert tables.md_table(['a|b'], [['|x|']]).splitlines()[2] == '| \\|x\\| |'


def test_strength_colors_are_fixed_and_distinct():
  a = plotting.strength_colors([16, 4, 8])
  b = plotting.strength_colors([4, 8, 16])
  assert a == b and len(set(a.values())) == 3


# --- report on a synthetic sweep


def _fake_run(root, name, rec, cfg_extra=None):
  d = root / name
  d.mkdir()
  rng = np.random.default_rng(int(rec['strength'] * 10 + (rec['clip'] or 0)))
  cfg = {'strength': rec['strength'], 'spectral': {'clip_to': rec['clip']}, **(cfg_extra or {})}
  (d / 'config.json').write_text(json.dumps(cfg))
  row = {k: rec[k] for k in paper.COLUMNS}
  (d / 'final.json').write_text(json.dumps({'row': row}))
  (d / 'metrics.jsonl').write_text('\n'.join(json.dumps({'epoch': e, 'epoch_time_s': 10.0}) for e in (1, 2, 3)))
  n = 200
  arrays = {f'{s}_margin': rng.normal(5 - 0.1 * rec['strength'], 2, n).astype(np.float32) for s in ('train', 'test')}
  arrays['test_prob'] = rng.beta(5, 0.5, n).astype(np.float32)
  arrays['test_loss'] = -np.log(arrays['test_prob'])
  np.savez(d / 'per_example.npz', **arrays)

  def dist(v):
    return {'std': float(np.std(v)), 'mean': float(np.mean(v)), 'skewness': 0.0, 'tau': 1.0,
            'frac_abs_below_tau': 0.01, 'quantiles': {'q50': float(np.median(v))}}

  layers = [{'name': f'l{i}', 'kind': 'conv', 'std': s, 'max': 2.0, 'min': 0.1, 'input_hw': [8, 8]}
            for i, s in enumerate(rec['sv_std'])]
  a = {'run': name, 'strength': rec['strength'], 'clip': rec['clip'], 'strength_unit': 1 / 255, 'dataset': 'cifar10',
       'model': 'resnet56', 'paper': 'cifar10_resnet56', 'attack': 'pgd', 'final_row': row,
       'settings': {'max_train_examples': None, 'max_test_examples': None, 'loss_variation_steps': 5,
                    'loss_variation_step_rel': 0.4, 'loss_variation_eps': [1 / 255, 2 / 255, 4 / 255],
                    'bound': {'c_x': 1.0, 'k': 10.0, 'eta': 0.05}},
       'train': {'n': n, 'loss': rec['train_loss'], 'margin': dist(arrays['train_margin']),
                 'prob': {'frac_mid': 0.02}},
       'test': {'n': n, 'loss': rec['test_loss'], 'margin': dist(arrays['test_margin']),
                'prob': {'frac_mid': rec['test_prob_mid_frac']}, 'eps': 8 / 255, 'steps': 10},
       'singular_values': {'layers': layers, 'log_spectral_complexity': 3.0},
       'loss_variation': [{**lv, 'n': 100} for lv in rec['loss_variation']],
       'boundary': {'screened': 100, 'refined': 8, 'v_min': 0.01, 'v_median_refined': 0.1,
                    'first_order_median': 0.5},
       'bound': {'w_distance': 1.0, 'log_prod_sigma_min': -3.0, 'log_u_min': -7.0, 'gamma': 5.0,
                 'margin_term': 0.999, 'log10_covering_term': 12.0},
       'timing': {'total_s': 1.0}}
  (d / 'analysis.json').write_text(json.dumps(a))


def test_report_on_a_synthetic_two_dimensional_sweep(tmp_path):
  for s in (4, 8, 16):
    _fake_run(tmp_path, f'run_s{s}_none', _record(s))
    r = _record(s, clip=1.0)
    _fake_run(tmp_path, f'weird_name_{s}', r)
  (tmp_path / 'unfinished').mkdir()
  (tmp_path / 'unfinished' / 'config.json').write_text(json.dumps({'strength': 32.0}))
  out = builder.write_report(str(tmp_path))
  names = sorted(os.listdir(tmp_path / 'figures'))
  assert names == sorted(builder.FIGURES.values()), names
  md = (tmp_path / 'report.md').read_text()
  assert 'Partial sweep' in md and 'unfinished' in md
  assert 'Table 6' in md and '(paper 96.91, Δ ' in md  # the clip grid with the published numbers beside ours
  cl = json.loads((tmp_path / 'claims.json').read_text())
  assert [c['id'] for c in cl['claims']] == list(range(1, 8))
  assert {c['id']: c['verdict'] for c in cl['claims']}[1] == 'holds'
  assert out['claim_list'][6]['verdict'] in ('holds', 'does not hold')
  for f in names:  # real PNGs
    assert (tmp_path / 'figures' / f).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


# --- end to end


def _run(module, *args, timeout=400):
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow  # 66 s; test_main's smoke sweep covers train → analyze → report in the default suite
def test_smoke_sweep_writes_the_report_and_analyze_reruns_it(tmp_path):
  wd = tmp_path / 'w'
  r = _run('arreg_jax.main', '--config', 'configs/mnist.py:smoke', '--workdir', str(wd), '--config.train.epochs=1')
  assert r.returncode == 0, r.stderr[-3000:]
  for name in ('report.md', 'claims.json'):
    assert (wd / name).exists(), name
  figs = set(os.listdir(wd / 'figures'))
  assert figs == {builder.FIGURES[k] for k in ('overview', 'loss_error', 'margins', 'prob_loss_sv',
                                               'loss_variation')}, figs
  for run in ('ar0', 'ar0.1'):
    a = json.loads((wd / run / 'analysis.json').read_text())
    assert a['train']['n'] == 256 and a['test']['n'] == 128
    assert sum(a['test']['margin']['counts']) == 128
    assert all(lv['mean'] >= 0 for lv in a['loss_variation'])
  cl = json.loads((wd / 'claims.json').read_text())
  assert len(cl['claims']) == 7
  assert all(c['verdict'] in ('holds', 'does not hold', 'not applicable') for c in cl['claims'])
  assert cl['claims'][6]['verdict'] == 'not applicable'
  md = (wd / 'report.md').read_text()
  assert '## Which of the paper\'s claims hold here' in md and 'figures/fig4_margins.png' in md

  before = (wd / 'ar0' / 'analysis.json').stat().st_mtime_ns
  r = _run('arreg_jax.analyze', '--workdir', str(wd))
  assert r.returncode == 0, r.stderr[-3000:]
  assert '[analysis] ar0:' in r.stdout and '[analysis] ar0.1:' in r.stdout and '[report]' in r.stdout
  assert (wd / 'ar0' / 'analysis.json').stat().st_mtime_ns > before

  r = _run('arreg_jax.analyze', '--workdir', str(tmp_path / 'nothing_here'))
  assert r.returncode == 2 and 'does not exist' in r.stderr and 'Traceback' not in r.stderr
