"""The AutoAttack front end (``attacks.AutoAttack``): the cascade over a data set, its progress lines and result, its
JSON, the warnings of the gradient-masking checks, two-class models, and compiled once — a second evaluation (another
ε, new weights) compiles nothing, counted with ``jax.monitoring`` as tests/test_programs.py does."""

import contextlib
import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arreg_jax import attacks

SMALL = dict(steps=8, n_targets=2, queries=40)


@contextlib.contextmanager
def _count_compilations():
  compiles = []
  listener = lambda event, *_, **__: (compiles.append(event) if event == '/jax/core/compile/backend_compile_duration'
                                      else None)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield compiles
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _linear_pair(classes=10, seed=0, d=64):
  w = jax.random.normal(jax.random.key(seed), (d, classes)) / 4
  return types.SimpleNamespace(apply_fn=_apply, params={'w': w})


def _apply(params, x):
  return x.reshape(x.shape[0], -1).astype(jnp.float32) @ params['w']


def _data(model, n=20, seed=1):
  x = np.asarray(jax.random.uniform(jax.random.key(seed), (n, 8, 8, 1)))
  return x, np.asarray(jnp.argmax(model.apply_fn(model.params, x), -1)).astype(np.int32)


def test_standard_evaluation_cascade_result_and_json(tmp_path, trained_cnn):
  logits_fn, x, y = trained_cnn
  x, y = np.asarray(x[:48]), np.asarray(y[:48])
  lines = []
  adversary = attacks.AutoAttack(logits_fn, norm='Linf', eps=0.15, version='standard', log=lines.append, **SMALL)
  x_adv, result = adversary.run_standard_evaluation(x, y, bs=16, save_json=str(tmp_path / 'aa.json'))
  assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
  assert list(result.stages) == ['clean', 'apgd_ce', 'apgd_t', 'fab_t', 'square']
  accs = list(result.stages.values())
  assert all(b <= a for a, b in zip(accs, accs[1:])) and accs[0] > 0.85 and accs[-1] < accs[0]
  correct = np.asarray(jnp.argmax(logits_fn(x_adv), -1)) == y
  np.testing.assert_array_equal(correct & result.robust, result.robust)
  assert result.robust_accuracy == pytest.approx(np.mean(correct)) == pytest.approx(result.robust.mean())
  assert np.abs(x_adv - x).max() <= 0.15 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
  np.testing.assert_array_equal(x_adv[result.robust], x[result.robust])  # robust points keep their clean image
  assert set(result.seconds) >= {'clean', 'apgd_ce', 'apgd_t', 'fab_t', 'square', 'total'}
  text = '\n'.join(lines)
  assert 'using standard version including APGD-CE, APGD-T, FAB-T, Square' in text
  assert 'initial accuracy:' in text and 'robust accuracy after FAB-T:' in text
  assert 'img/s, ETA' in text and 'successfully perturbed' in text
  saved = json.loads((tmp_path / 'aa.json').read_text())
  assert saved['stages'] == result.stages and sum(saved['robust']) == int(result.robust.sum())
  assert saved['version'] == 'standard' and saved['norm'] == 'linf' and saved['eps'] == 0.15


@pytest.mark.slow  # ~35 s: six L2 stages to compile
def test_plus_and_l2_versions_run():
  model = _linear_pair()
  x, y = _data(model)
  adversary = attacks.AutoAttack(model, norm='L2', eps=0.5, version='plus', verbose=False, **SMALL)
  x_adv, result = adversary.run_standard_evaluation(x, y, bs=8)
  assert list(result.stages) == ['clean', 'apgd_ce', 'apgd_dlr', 'fab', 'square', 'apgd_t', 'fab_t']
  assert np.linalg.norm((x_adv - x).reshape(len(x), -1), axis=1).max() <= 0.5 * (1 + 1e-5)


def test_a_second_evaluation_compiles_nothing():
  """Same shapes, another ε and new weights of the same model function: no compilation at all."""
  model = _linear_pair()
  x, y = _data(model, n=24)
  adversary = attacks.AutoAttack(model, eps=0.05, verbose=False, **SMALL)
  adversary.run_standard_evaluation(x, y, bs=16)
  other = attacks.AutoAttack(types.SimpleNamespace(apply_fn=_apply, params=_linear_pair(seed=5).params), eps=0.03,
                             verbose=False, **SMALL)
  with _count_compilations() as compiles:
    adversary.run_standard_evaluation(x, y, bs=16)
    _, result = other.run_standard_evaluation(x, y, bs=16)
  assert result.n == 24 and compiles == [], f'{len(compiles)} compilations'


def test_robust_accuracies_compile_once_across_calls_and_eps():
  model = _linear_pair()
  x, y = _data(model, n=20)
  kw = dict(attacks=('pgd10', 'fab_t', 'square'), batch_size=8, n_targets=2, queries=20)
  first = attacks.robust_accuracies(model, x, y, jax.random.key(0), eps=0.05, **kw)
  with _count_compilations() as compiles:
    again = attacks.robust_accuracies(model, x, y, jax.random.key(0), eps=0.05, **kw)
    attacks.robust_accuracies(model, x, y, jax.random.key(1), eps=0.1, **kw)
  assert again == first and compiles == [], f'{len(compiles)} compilations'


def test_eager_attacks_compile_once():
  """An eager call runs one cached program: the second call with another ε and key compiles nothing."""
  model = _linear_pair()
  x, y = _data(model, n=8)
  for fn in (lambda e, k: attacks.apgd(model, x, y, k, eps=e, steps=5),
             lambda e, k: attacks.fab(model, x, y, k, eps=e, steps=5, n_targets=2),
             lambda e, k: attacks.square(model, x, y, k, eps=e, queries=10),
             lambda e, k: attacks.pgd(model, x, y, k, eps=e, step_size=e / 4, steps=5)):
    fn(0.05, jax.random.key(0))
    with _count_compilations() as compiles:
      fn(0.07, jax.random.key(1))
    assert compiles == []


def test_two_class_model_runs_without_dlr_and_says_so():
  model = _linear_pair(classes=2)
  x, y = _data(model, n=16)
  with pytest.warns(attacks.ReducedCascadeWarning, match='APGD-T not run: the targeted DLR loss'):
    x_adv, result = attacks.AutoAttack(model, eps=0.1, verbose=False, **SMALL).run_standard_evaluation(x, y, bs=8)
  assert list(result.stages) == ['clean', 'apgd_ce', 'fab_t', 'square']
  assert 'apgd_t' in result.dropped and 'fab_t' in result.dropped  # FAB-T: 1 target instead of 2
  assert any('APGD-T not run' in w for w in result.warnings)
  with pytest.warns(attacks.ReducedCascadeWarning):
    adv, hist = attacks.autoattack(model, x, y, jax.random.key(0), eps=0.1, return_history=True, **SMALL)
  assert sorted(hist) == ['apgd_ce', 'clean', 'fab_t', 'square']
  assert x_adv.shape == adv.shape


def test_gradient_masking_is_warned_about_during_the_evaluation(trained_cnn):
  logits_fn, x, y = trained_cnn
  x, y = np.asarray(x[:32]), np.asarray(y[:32])
  quick = dict(verbose=False, version='custom', attacks_to_run=['apgd-ce'], steps=2)
  rounded = lambda z: logits_fn(jnp.round(z * 4) / 4)  # zero input gradient everywhere
  with pytest.warns(attacks.GradientMaskingWarning, match='zero input gradient'):
    _, result = attacks.AutoAttack(rounded, eps=0.1, **quick).run_standard_evaluation(x, y, bs=32)
  assert any('zero input gradient' in w for w in result.warnings)
  rng = np.random.default_rng(0)
  noisy = lambda z: logits_fn(z) + jnp.asarray(rng.normal(size=(z.shape[0], 10)), jnp.float32)
  with pytest.warns(attacks.GradientMaskingWarning, match='forward pass is random'):
    attacks.AutoAttack(noisy, eps=0.1, **quick).run_standard_evaluation(x, y, bs=32)
  blind = lambda z: logits_fn(jax.lax.stop_gradient(z))  # gradients mislead: the black-box Square does better
  with pytest.warns(attacks.GradientMaskingWarning, match='Square Attack lowered the robust accuracy'):
    _, result = attacks.AutoAttack(blind, eps=0.15, verbose=False, version='custom',
                                   attacks_to_run=['apgd-ce', 'square'], steps=4,
                                   queries=300).run_standard_evaluation(x, y, bs=32)
  assert result.stages['square'] < result.stages['apgd_ce'] - 0.002
