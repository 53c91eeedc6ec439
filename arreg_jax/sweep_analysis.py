"""Analyzing the trained members of a sweep: ``analysis.json`` (+ ``per_example.npz``) in every run directory.

The kernels are in :mod:`arreg_jax.analysis`; this module runs them over a sweep directory. For one run
(:func:`analyze_run`), with the settings of its config's ``analysis`` block (validated by
``configuration.validate``):

1. per-example margin (Definition 3), true-class probability and cross-entropy on the training and test sets
   (:mod:`margins`), summarized with fixed bin edges (:mod:`distributions`) — Fig. 1b, 4, 5a,b;
2. per-layer singular-value statistics and the log spectral complexity (:mod:`singular_values`) — Fig. 1a, 5c,d;
3. loss variation inside L∞ balls on the first test examples (:mod:`smoothness`) — appendix B.5, Table 1; or, with
   ``analysis.loss_variation_split = 'train_correct'``, on the correctly classified examples among the first
   training examples, counting only perturbed points still classified correctly (draft 003, Fig. 3);
4. PGD accuracy over the clean-correct test examples: taken from the run's ``final.json`` (computed by
   ``training.eval_step.make_eval_step`` over the whole test set at the end of training), recomputed only when absent;
5. the instance-space margin v_min (:mod:`decision_boundary`, on a subset of training examples) and the terms of
   Theorem 3.1 (:mod:`generalization_bound`).

The analyses are the library's (:mod:`arreg_jax.analysis`, functions of ``(apply_fn, params, images, labels)``);
this module gives them the run's model in inference mode and its uint8 datasets with the test-time transform
(``data.augment.preprocess``) as their ``preprocess``, applied inside the compiled programs.

:func:`analyze_sweep` does this for every finished member of a sweep directory (the report is written after it,
by :mod:`arreg_jax.report.builder`). Analysis files are rewritten atomically. With ``reuse=True`` a run whose
``analysis.json`` was made from the same checkpoint with the same settings is not analyzed again.
"""

from __future__ import annotations

import functools
import math
import os
import time
import types
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from arreg_jax import configuration, distributed, models, rundir, sharding, spectral
from arreg_jax.training import checkpoints, eval_step
from arreg_jax import sweep as sweep_lib
from arreg_jax.analysis import decision_boundary, distributions, generalization_bound, margins, robustness
from arreg_jax.analysis import singular_values, smoothness
from arreg_jax.data import augment
from arreg_jax.errors import ConfigError

ANALYSIS_VERSION = 1
PROB_RANGE = (0.0, 1.0)
# "Mid-range" estimated probabilities (§4.2.1, Fig. 5a inset; SPEC §6 claim 4): p_y in [0.1, 0.9].
MID_PROB = (0.1, 0.9)


def settings_of(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The analysis settings of a (validated) run config, resolved to absolute values (JSON-ready)."""
  a = config.analysis
  pgd_eps = float(config.eval.pgd_eps)
  s = {
      'version': ANALYSIS_VERSION,
      'max_train_examples': a.max_train_examples, 'max_test_examples': a.max_test_examples,
      'bins': int(a.bins), 'margin_range': [float(v) for v in a.margin_range], 'margin_tau': float(a.margin_tau),
      'loss_range': [float(v) for v in a.loss_range], 'prob_range': list(PROB_RANGE),
      'loss_variation_eps': [float(r) * pgd_eps for r in a.loss_variation_eps_rel],
      'loss_variation_examples': a.loss_variation_examples, 'loss_variation_steps': int(a.loss_variation_steps),
      'loss_variation_step_rel': float(a.loss_variation_step_rel),
      'loss_variation_split': str(a.loss_variation_split),
      'boundary_screen_examples': int(a.boundary_screen_examples),
      'boundary_refine_examples': int(a.boundary_refine_examples),
      'boundary_rounds': int(a.boundary_rounds), 'boundary_steps': int(a.boundary_steps),
      'bound': {k: a.bound[k] for k in ('gamma', 'c_x', 'k', 'eps', 'eta')},
      # Forward-only kernels run at the evaluation batch size, the attack-based ones (loss variation, boundary
      # screening) at the training batch size: the batch the training attack runs at, efficient on this device.
      'batch_size': int(config.eval.batch_size),
      'attack_batch_size': int(config.train.batch_size),
      'robustness': robustness_settings(config),
  }
  return s


def robustness_settings(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """``config.eval.robustness`` resolved to absolute values (None when it is off)."""
  r = config.eval.robustness
  if not r.enabled:
    return None
  eps = float(r.eps if r.eps is not None else config.eval.pgd_eps)
  return {'attacks': [str(a) for a in r.attacks], 'eps': eps, 'examples': r.examples,
          'n_targets': int(r.n_targets), 'square_queries': int(r.square_queries),
          'eps_grid': sorted({min(float(v) * eps, 1.0) for v in r.eps_grid_rel}),
          'check_examples': int(r.check_examples),
          'batch_size': int(r.batch_size if r.batch_size is not None else config.train.batch_size)}


@functools.lru_cache(maxsize=None)
def _apply_fn(module):
  """The run's model in inference mode as ``apply_fn(variables, x)``: one object per module, so the members of a
  sweep share the compiled analysis programs."""
  return lambda variables, x: module.apply(variables, x, train=False)


@functools.lru_cache(maxsize=None)
def _preprocess(kind: str):
  """The test-time transform of the run's uint8 images into model inputs (inside the compiled programs)."""
  return lambda images: augment.preprocess(None, images, kind=kind, train=False)


def _confidence(module, variables, ds, split: str, limit, s, mesh) -> tuple[dict, dict]:
  images = getattr(ds, f'{split}_images')
  labels = getattr(ds, f'{split}_labels')
  out = margins.confidence(_apply_fn(module), variables, images, labels, batch_size=s['batch_size'], mesh=mesh,
                           limit=limit, preprocess=_preprocess(ds.augment))
  bins = s['bins']
  summ = distributions.summarize
  summary = {
      'n': int(out['margin'].shape[0]),
      'acc': float(np.mean(out['correct'])),
      'loss': float(np.mean(out['loss'])),
      'margin': summ(out['margin'], distributions.uniform_edges(*s['margin_range'], bins), tau=s['margin_tau']),
      'prob': summ(out['prob'], distributions.uniform_edges(*PROB_RANGE, bins)),
      'loss_dist': summ(out['loss'], distributions.uniform_edges(*s['loss_range'], bins)),
  }
  p = out['prob']
  summary['prob']['mid_range'] = list(MID_PROB)
  summary['prob']['frac_mid'] = float(np.mean((p >= MID_PROB[0]) & (p <= MID_PROB[1])))
  arrays = {f'{split}_{k}': out[k] for k in ('margin', 'prob', 'loss', 'correct')}
  return summary, arrays


def _loss_variation(module, variables, ds, s, mesh) -> tuple[list[dict], dict]:
  split = s['loss_variation_split']
  correct_only = split == 'train_correct'
  common = dict(mesh=mesh, preprocess=_preprocess(ds.augment))
  if correct_only:  # draft 003, Fig. 3: the correctly classified ones among the first N training examples
    n = min(s['loss_variation_examples'] or ds.num_train, ds.num_train)
    conf = margins.confidence(_apply_fn(module), variables, ds.train_images, ds.train_labels,
                              batch_size=s['batch_size'], limit=n, **common)
    keep = np.flatnonzero(conf['correct'])
    if keep.size == 0:
      return [], {}
    images, labels, limit = ds.train_images[keep], ds.train_labels[keep], None
  else:
    images, labels, limit = ds.test_images, ds.test_labels, s['loss_variation_examples']
  increases = smoothness.loss_variation(_apply_fn(module), variables, images, labels, eps=s['loss_variation_eps'],
                                        steps=s['loss_variation_steps'], step_rel=s['loss_variation_step_rel'],
                                        max_correct_only=correct_only, batch_size=s['attack_batch_size'],
                                        limit=limit, **common)
  rows, arrays = [], {}
  for i, eps in enumerate(s['loss_variation_eps']):
    inc = increases[float(eps)]
    rows.append({'eps': eps, 'eps_255': eps * 255.0, 'mean': float(inc.mean()), 'std': float(inc.std()),
                 'median': float(np.median(inc)), 'max': float(inc.max()), 'n': int(inc.size), 'split': split})
    arrays[f'loss_increase_{i}'] = inc
  return rows, arrays


def _boundary(module, variables, ds, s, mesh) -> dict:
  n = min(s['boundary_screen_examples'], ds.num_train)
  k = min(s['boundary_refine_examples'], n)
  r_max = float(math.sqrt(int(np.prod(ds.image_shape))))  # the L2 diameter of [0, 1]^d
  out = decision_boundary.boundary_distances(
      _apply_fn(module), variables, ds.train_images, screen=n, refine=k, rounds=s['boundary_rounds'],
      steps=s['boundary_steps'], r_max=r_max, batch_size=s['attack_batch_size'], mesh=mesh,
      preprocess=_preprocess(ds.augment))
  dist, found, first_order = out['distance'], out['found'], out['first_order']
  return {
      'method': 'first-order screening + per-example bisection on the radius of an L2 PGD attack + line search '
                '(arreg_jax.analysis.decision_boundary); certified upper bounds',
      'screened': int(n), 'refined': int(k), 'r_max': r_max,
      'first_order_min': float(first_order.min()),
      'first_order_median': float(np.median(first_order)),
      'v_min': out['v_min'],
      'v_median_refined': float(np.median(dist[found])) if found.any() else float('inf'),
      'found': int(found.sum()),
      'refined_indices': [int(i) for i in out['refined_indices']],
  }


def _bound_terms(variables, specs, layers: list[dict], v_min: float, train_margin_median: float, config, strength,
                 s, m: int) -> dict:
  b = s['bound']
  w_last = spectral.layer_kernels(variables['params'], specs[-1:])[0]  # the last layer, (in, out) as applied
  w_dist = float(generalization_bound.min_class_weight_distance(w_last, class_axis=-1))
  gamma = b['gamma'] if b['gamma'] is not None else max(train_margin_median, 1e-6)
  eps = b['eps']
  if eps is None:
    eps = strength * float(config.attack.strength_unit) or float(config.eval.pgd_eps)
  return generalization_bound.assemble(
      w_dist, [layer['min'] for layer in layers[:-1]], v_min, gamma=gamma, c_x=b['c_x'], k=b['k'], eps=eps,
      eta=b['eta'], m=m, gamma_source='config' if b['gamma'] is not None else 'median training margin')


def analyze_run(run_dir: str, *, mesh=None, reuse: bool = False) -> dict:
  """Analyzes one finished run; writes ``analysis.json`` and ``per_example.npz`` into it and returns the former."""
  t_start = time.time()
  mesh = mesh or sharding.make_mesh()
  config, raw_cfg = checkpoints.run_config(run_dir)
  configuration.validate(config)
  s = settings_of(config)
  out_path = os.path.join(run_dir, rundir.ANALYSIS)
  final = rundir.read_json(os.path.join(run_dir, rundir.FINAL))
  if reuse and os.path.exists(out_path) and os.path.exists(os.path.join(run_dir, rundir.PER_EXAMPLE)):
    old = rundir.read_json(out_path)
    if old.get('settings') == rundir.json_safe(s) and old.get('final_row') == rundir.json_safe(final.get('row')):
      logging.info('%s: analysis.json is up to date', run_dir)
      return old
  config, module, variables, ds, epoch = checkpoints.restore_run(run_dir)
  variables = models.fold_spectral_norm(variables)  # SN models: analyze the kernels the forward pass applies
  strength = float(raw_cfg['strength'])
  timing = {'restore_s': time.time() - t_start}

  t = time.time()
  train_sum, arrays = _confidence(module, variables, ds, 'train', s['max_train_examples'], s, mesh)
  test_sum, test_arrays = _confidence(module, variables, ds, 'test', s['max_test_examples'], s, mesh)
  arrays.update(test_arrays)
  timing['confidence_s'] = time.time() - t

  t = time.time()
  specs = spectral.layer_specs(module, variables, (1, *ds.image_shape), train=False)
  layers = singular_values.layer_statistics(module, variables, ds.image_shape, specs=specs, train=False)
  with np.errstate(divide='ignore'):
    log_sc = float(sum(layer['log_max'] for layer in layers))
  timing['spectral_s'] = time.time() - t

  t = time.time()
  lv_rows, lv_arrays = _loss_variation(module, variables, ds, s, mesh)
  arrays.update(lv_arrays)
  timing['loss_variation_s'] = time.time() - t

  if 'pgd_acc' in final.get('test', {}):
    pgd = {'pgd_acc': final['test']['pgd_acc'], 'source': 'final.json (training.eval_step.make_eval_step, whole test set)',
           'eps': float(config.eval.pgd_eps), 'steps': int(config.eval.pgd_steps)}
  else:
    t = time.time()
    step = eval_step.make_eval_step(module, augment_kind=ds.augment, pgd_cfg=eval_step.pgd_spec(config))
    res = eval_step.evaluate(step, variables, ds.test_images, ds.test_labels, batch_size=s['batch_size'],
                             key=jax.random.key(config.seed), limit=s['max_test_examples'], mesh=mesh)
    pgd = {'pgd_acc': res['pgd_acc'], 'source': 'recomputed by the analysis (training.eval_step.make_eval_step)',
           'eps': float(config.eval.pgd_eps), 'steps': int(config.eval.pgd_steps)}
    timing['pgd_s'] = time.time() - t

  robust = None
  if s['robustness'] is not None:
    t = time.time()
    # The library takes float images in [0, 1]: the test transform of the runner's data, on the examples evaluated.
    n = min(s['robustness']['examples'] or ds.num_test, ds.num_test)
    images = np.asarray(augment.preprocess(None, jax.numpy.asarray(ds.test_images[:n]), kind=ds.augment, train=False))
    model = types.SimpleNamespace(apply_fn=models.inference_apply(module), params=variables)
    robust = robustness.analyze(model, images, np.asarray(ds.test_labels[:n]), settings=s['robustness'],
                                key=jax.random.key(config.seed + 1), mesh=mesh, population=ds.num_test)
    timing['robustness_s'] = time.time() - t

  t = time.time()
  bnd = _boundary(module, variables, ds, s, mesh)
  terms = _bound_terms(variables, specs, layers, bnd['v_min'], train_sum['margin']['quantiles']['q50'], config,
                       strength, s, m=ds.num_train)
  timing['boundary_s'] = time.time() - t
  timing['total_s'] = time.time() - t_start

  result = {
      'run': os.path.basename(os.path.normpath(run_dir)),
      'strength': strength,
      'epsilon': strength * float(config.attack.strength_unit),
      'strength_unit': float(config.attack.strength_unit),
      'clip': sweep_lib.clip_of(raw_cfg),
      'dataset': ds.name, 'model': config.model.name, 'paper': config.paper, 'attack': config.attack.kind,
      'epoch': epoch, 'final_row': final.get('row'),
      'settings': s,
      'train': train_sum, 'test': {**test_sum, **pgd},
      'singular_values': {'layers': layers, 'log_spectral_complexity': log_sc},
      'loss_variation': lv_rows,
      'boundary': bnd,
      'robustness': robust,
      'bound': terms,
      'timing': timing,
  }
  if not distributed.is_main_process():  # every process computes; process 0 writes
    return rundir.json_safe(result)
  rundir.write_npz(os.path.join(run_dir, rundir.PER_EXAMPLE), arrays)
  rundir.write_json(out_path, result, safe=True)
  if robust is not None:  # final.json carries the final model's robust accuracies too
    rundir.write_json(os.path.join(run_dir, rundir.FINAL), {**final, 'robustness': robust}, safe=True)
  return rundir.read_json(out_path)


def analyze_sweep(workdir: str, *, reuse: bool = False, mesh=None) -> dict:
  """Analyzes every finished run of ``workdir``; returns ``{'runs': [names analyzed], 'analysis_s'}``.

  Unfinished runs are skipped (the report lists them).
  """
  t0 = time.time()
  mesh = mesh or sharding.make_mesh()
  runs = sweep_lib.find_runs(workdir)
  if not runs:
    raise ConfigError(f'{workdir} holds no run directories (subdirectories with a config.json); '
                      'train a sweep there first with python -m arreg_jax.main')
  done = []
  for run in runs:
    if not run.finished:
      logging.info('%s: not finished, not analyzed', run.path)
      continue
    t = time.time()
    analyze_run(run.path, mesh=mesh, reuse=reuse)
    if distributed.is_main_process():
      print(f'[analysis] {run.name}: {time.time() - t:.1f} s', flush=True)
    done.append(run.name)
  _add_robustness_to_summary(workdir)
  return {'runs': done, 'analysis_s': time.time() - t0}


def _add_robustness_to_summary(workdir: str) -> None:
  """Adds each run's robust accuracies (%) to its row of ``summary.json`` (rows are matched by run name)."""
  path = os.path.join(workdir, rundir.SUMMARY)
  if not os.path.exists(path) or not distributed.is_main_process():
    return
  summary = rundir.read_json(path)
  for row in summary.get('rows', []):
    a_path = os.path.join(workdir, str(row.get('run')), rundir.ANALYSIS)
    robust = rundir.read_json(a_path).get('robustness') if os.path.exists(a_path) else None
    if robust:
      row['robust_acc'] = {k: 100 * v for k, v in robust['accuracy'].items()}
      row['robust_eps'] = robust['eps']
  rundir.write_json(path, summary)
