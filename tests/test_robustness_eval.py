"""The robustness evaluation of a run (analysis.robustness) and its report section, on tiny models."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import pytest

from arreg_jax import attacks, models, sharding
from arreg_jax.analysis import robustness
from arreg_jax.report import robustness_section

SETTINGS = {'attacks': ['fgsm', 'pgd10', 'apgd_ce', 'apgd_t', 'square'], 'eps': 0.3, 'examples': 32,
            'n_targets': 1, 'square_queries': 20, 'eps_grid': [0.15, 0.3, 1.0], 'check_examples': 16,
            'batch_size': 16}


class Rounded(nn.Module):
  """A linear model on rounded pixels: its input gradient is zero everywhere (masked gradients)."""

  @nn.compact
  def __call__(self, x, train=False):
    del train
    return nn.Dense(10)(jnp.round(x).reshape(x.shape[0], -1))


def _data(n=32, classes=10):
  rng = np.random.default_rng(0)
  return rng.random((n, 28, 28, 1), dtype=np.float32), rng.integers(0, classes, n).astype(np.int32)


def _model(module, variables):
  return types.SimpleNamespace(apply_fn=lambda v, x: module.apply(v, x, train=False), params=variables)


def test_a_plain_model_is_evaluated_and_judged_real():
  module = models.get_module('small_cnn', num_classes=10)
  _, variables = models.create('small_cnn', num_classes=10, key=jax.random.key(0), input_shape=(28, 28, 1))
  images, labels = _data()
  r = robustness.analyze(_model(module, variables), images, labels, settings=SETTINGS, key=jax.random.key(1),
                         mesh=sharding.make_mesh(), population=2000)
  acc = r['accuracy']
  assert set(acc) == {'clean', 'fgsm', 'pgd10', 'apgd_ce', 'apgd_t', 'fab_t', 'square', 'autoattack'}
  assert all(acc[k] <= acc['clean'] for k in acc)
  assert acc['autoattack'] <= min(acc['apgd_ce'], acc['apgd_t'], acc['fab_t'], acc['square'])
  aa = r['autoattack']
  assert aa['stages'] == ['apgd_ce', 'apgd_t', 'fab_t', 'square'] and aa['n_targets'] == 1
  assert any('1 target(s) instead of 9' in x for x in aa['reduced'])
  assert any('20 queries instead of 5000' in x for x in aa['reduced'])
  assert any('first 32 of 2000' in x for x in aa['reduced'])
  assert r['examples'] == 32 and [e for e, _ in r['accuracy_vs_eps']] == [0.15, 0.3, 1.0]
  assert set(r['checks']) == {'deterministic', 'zero_gradients', 'attack_ordering', 'square_vs_whitebox',
                              'eps_monotone'}
  md = robustness_section.section([{'strength': 0.0, 'robustness': r}, {'strength': 0.3, 'robustness': r}])
  assert '| AR | clean | FGSM | PGD-10 | APGD-CE | APGD-T | FAB-T | Square | AutoAttack |' in md
  assert "AutoAttack is the authors' standard version" in md and 'APGD-CE → APGD-T → FAB-T → Square' in md
  assert '## Is the robustness real?' in md and 'Claim 2 under the strongest attack' in md


def test_masked_gradients_are_flagged():
  module = Rounded()
  images, labels = _data()
  variables = module.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  with pytest.warns(attacks.GradientMaskingWarning, match='zero input gradient'):
    r = robustness.analyze(_model(module, variables), images, labels, settings=SETTINGS, key=jax.random.key(1),
                           mesh=sharding.make_mesh())
  assert not r['real'] and not r['checks']['zero_gradients']['passed']
  assert r['verdict'].startswith('suspicious') and 'zero_gradients' in r['verdict']
  md = robustness_section.section([{'strength': 0.0, 'robustness': r}])
  assert '**check**' in md and 'zero input gradient' in md


def test_a_two_class_model_runs_the_cascade_without_dlr():
  """Poster 004's logistic regression: APGD-T (targeted DLR needs 4 classes) is left out and said so, FAB-T takes
  the one other class; nothing crashes."""
  module = models.get_module('logreg', num_classes=2)
  _, variables = models.create('logreg', num_classes=2, key=jax.random.key(0), input_shape=(28, 28, 1))
  images, labels = _data(classes=2)
  r = robustness.analyze(_model(module, variables), images, labels, settings=SETTINGS, key=jax.random.key(1),
                         mesh=sharding.make_mesh())
  assert 'apgd_t' not in r['accuracy'] and 'targeted DLR' in r['attacks_not_run']['apgd_t']
  assert r['autoattack']['stages'] == ['apgd_ce', 'fab_t', 'square']
  assert r['accuracy']['autoattack'] <= min(r['accuracy'][k] for k in ('apgd_ce', 'fab_t', 'square'))
  md = robustness_section.section([{'strength': 0.0, 'robustness': r}])
  assert 'APGD-CE → FAB-T → Square' in md and 'APGD-T not run' in md
