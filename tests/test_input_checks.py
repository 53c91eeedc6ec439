"""Nothing silent: every bad input of a public attack or evaluation is a ValueError/TypeError naming the argument
(and the fix), and what looks wrong but may be meant (probabilities instead of logits) is a warning."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arreg_jax import attacks

KEY = jax.random.key(0)
W = jax.random.normal(jax.random.key(0), (64, 10)) / 4


def _logits(x):
  return x.reshape(x.shape[0], -1).astype(jnp.float32) @ W


X = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1))
Y = jnp.argmax(_logits(X), -1).astype(jnp.int32)

# Every public entry point, called with (images, labels, eps, extra keyword arguments).
ENTRY = {
    'pgd': lambda x, y, e, **kw: attacks.pgd(_logits, x, y, KEY, eps=e, step_size=0.01, steps=2, **kw),
    'fgsm': lambda x, y, e, **kw: attacks.fgsm(_logits, x, y, KEY, eps=e, **kw),
    'apgd': lambda x, y, e, **kw: attacks.apgd(_logits, x, y, KEY, eps=e, steps=2, **kw),
    'fab': lambda x, y, e, **kw: attacks.fab(_logits, x, y, KEY, eps=e, steps=2, n_targets=1, **kw),
    'square': lambda x, y, e, **kw: attacks.square(_logits, x, y, KEY, eps=e, queries=2, **kw),
    'autoattack': lambda x, y, e, **kw: attacks.autoattack(_logits, x, y, KEY, eps=e, steps=2, n_targets=1,
                                                          queries=2, **kw),
    'robust_accuracies': lambda x, y, e, **kw: attacks.robust_accuracies(_logits, x, y, KEY, eps=e,
                                                                         attacks=('fgsm',), batch_size=8, **kw),
    'AutoAttack': lambda x, y, e, **kw: attacks.AutoAttack(_logits, eps=e, verbose=False, steps=2, n_targets=1,
                                                           queries=2, **kw).run_standard_evaluation(x, y, bs=8),
}

BAD = [
    # (what, images, labels, eps, error, message pattern)
    ('eps 8 meant 8/255', X, Y, 8, ValueError, r'eps must be in \(0, 1\].*8/255 = 0\.0313725'),
    ('negative eps', X, Y, -0.1, ValueError, 'eps must be > 0'),
    ('zero eps', X, Y, 0.0, ValueError, 'eps must be > 0'),
    ('images in [0, 255]', X * 255, Y, 0.1, ValueError, r'images must lie in \[0, 1\].*/ 255'),
    ('normalized images', X - 0.5, Y, 0.1, ValueError, r'images must lie in \[0, 1\].*inside logits_fn'),
    ('uint8 images', (X * 255).astype(jnp.uint8), Y, 0.1, TypeError, r'images must be floating point.*/ 255'),
    ('NaN in images', X.at[0, 0, 0, 0].set(jnp.nan), Y, 0.1, ValueError, 'images holds NaN'),
    ('16 images, 8 labels', jnp.concatenate([X, X]), Y, 0.1, ValueError, 'labels has 8 entries but images has 16'),
    ('8 images, 16 labels', X, jnp.concatenate([Y, Y]), 0.1, ValueError, 'labels has 16 entries but images has 8'),
    ('float labels', X, Y.astype(jnp.float32), 0.1, TypeError, 'labels must be integer class indices'),
    ('one-hot labels', X, jax.nn.one_hot(Y, 10).astype(jnp.int32), 0.1, ValueError, 'labels must have rank 1'),
    ('labels out of range', X, Y.at[0].set(10), 0.1, ValueError, r'labels must lie in \[0, 10\)'),
    ('eps as a string', X, Y, '8/255', TypeError, 'eps must be a number'),
]


@pytest.mark.parametrize('entry', sorted(ENTRY))
@pytest.mark.parametrize('what,images,labels,eps,error,pattern', BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_an_error_naming_the_argument(entry, what, images, labels, eps, error, pattern):
  del what
  with pytest.raises(error, match=pattern):
    ENTRY[entry](images, labels, eps)


@pytest.mark.parametrize('entry', sorted(ENTRY))
def test_unknown_norm_is_refused_and_both_spellings_work(entry):
  with pytest.raises(ValueError, match="norm must be 'Linf' or 'L2'"):
    ENTRY[entry](X, Y, 0.1, norm='l3')
  if entry != 'fgsm':  # FGSM is an L∞ attack; its L2 form is a normalized gradient step
    ENTRY[entry](X, Y, 0.5, norm='L2')
  ENTRY[entry](X, Y, 0.1, norm='Linf')


def test_square_on_nchw_images_needs_the_layout():
  x_nchw = jax.random.uniform(jax.random.key(2), (4, 3, 16, 16))
  w = jax.random.normal(jax.random.key(3), (3 * 16 * 16, 10))
  f = lambda x: x.reshape(x.shape[0], -1) @ w  # a model that reads NCHW
  y = jnp.argmax(f(x_nchw), -1)
  with pytest.raises(ValueError, match="look NCHW, but layout is 'NHWC': pass layout='NCHW'"):
    attacks.square(f, x_nchw, y, KEY, eps=0.05, queries=5)
  adv = attacks.square(f, x_nchw, y, KEY, eps=0.05, queries=5, layout='NCHW')
  assert adv.shape == x_nchw.shape and float(jnp.abs(adv - x_nchw).max()) <= 0.05 + 1e-6
  with pytest.raises(ValueError, match='look NCHW'):
    attacks.AutoAttack(f, eps=0.05, verbose=False).run_standard_evaluation(x_nchw, y, bs=4)


def test_static_arguments_must_be_python_ints():
  with pytest.raises(TypeError, match=r"steps must be a Python int.*static_argnames=\('steps',\)"):
    jax.jit(lambda n: attacks.apgd(_logits, X, Y, KEY, eps=0.1, steps=n))(3)
  with pytest.raises(TypeError, match='queries must be an int'):
    attacks.square(_logits, X, Y, KEY, eps=0.1, queries=2.5)
  with pytest.raises(ValueError, match='restarts must be >= 1'):
    attacks.apgd(_logits, X, Y, KEY, eps=0.1, restarts=0)


def test_the_model_argument_is_checked():
  with pytest.raises(TypeError, match='logits_fn must be a callable images -> logits'):
    attacks.pgd('model', X, Y, KEY, eps=0.1, step_size=0.1, steps=1)
  with pytest.raises(ValueError, match=r'logits_fn must map images \(8, 8, 8, 1\) to logits'):
    attacks.apgd(lambda x: _logits(x)[:, 0], X, Y, KEY, eps=0.1, steps=1)
  with pytest.raises(ValueError, match='K >= 2 logits'):
    attacks.apgd(lambda x: _logits(x)[:, :1], X, jnp.zeros_like(Y), KEY, eps=0.1, steps=1)
  with pytest.raises(TypeError, match='model must be a callable'):
    attacks.AutoAttack(None)


def test_losses_and_targets_the_model_cannot_support():
  three = lambda x: _logits(x)[:, :3]
  y3 = jnp.argmax(three(X), -1)
  with pytest.raises(ValueError, match="loss='dlr_targeted' needs a model with at least 4 classes"):
    attacks.apgd(three, X, y3, KEY, eps=0.1, steps=1, loss='dlr_targeted', n_targets=2)
  with pytest.raises(ValueError, match='n_targets must be at most 9'):
    attacks.apgd(_logits, X, Y, KEY, eps=0.1, steps=1, loss='dlr_targeted', n_targets=10)
  with pytest.raises(ValueError, match='n_targets must be at most 2'):
    attacks.fab(three, X, y3, KEY, eps=0.1, steps=1, n_targets=3)
  with pytest.raises(ValueError, match='loss must be one of'):
    attacks.apgd(_logits, X, Y, KEY, eps=0.1, steps=1, loss='hinge')
  with pytest.raises(ValueError, match='eps must be a scalar for apgd'):
    attacks.apgd(_logits, X, Y, KEY, eps=jnp.full((8,), 0.1), steps=1)


def test_versions_and_attack_lists():
  with pytest.raises(ValueError, match='version must be one of'):
    attacks.AutoAttack(_logits, version='fast')
  with pytest.raises(ValueError, match="attacks is only used with version='custom'"):
    attacks.AutoAttack(_logits, attacks_to_run=['apgd-ce'])
  with pytest.raises(ValueError, match=r"attacks: unknown stage\(s\) \['cw'\]"):
    attacks.AutoAttack(_logits, version='custom', attacks_to_run=['apgd-ce', 'cw'])
  assert attacks.AutoAttack(_logits, version='custom', attacks_to_run=['apgd-ce', 'fab-t']).attacks_to_run == [
      'apgd_ce', 'fab_t']
  with pytest.raises(ValueError, match="attacks: unknown attack 'cw'"):
    attacks.robust_accuracies(_logits, X, Y, KEY, eps=0.1, attacks=('cw',))


def test_probabilities_are_warned_about():
  probs = lambda x: jax.nn.softmax(_logits(x))
  with pytest.warns(attacks.ProbabilitiesWarning, match='probabilities'):
    _, result = attacks.AutoAttack(probs, eps=0.05, verbose=False, version='custom', attacks_to_run=['apgd-ce'],
                                   steps=2).run_standard_evaluation(X, Y, bs=8)
  assert any('probabilities' in w for w in result.warnings)
  with pytest.warns(attacks.ProbabilitiesWarning):
    attacks.robust_accuracies(probs, X, Y, KEY, eps=0.05, attacks=('fgsm',), batch_size=8)
  with pytest.warns(attacks.ProbabilitiesWarning):  # an eager call of an attack
    attacks.apgd(probs, X, Y, KEY, eps=0.05, steps=2)
  with warnings.catch_warnings():
    warnings.simplefilter('error', attacks.ProbabilitiesWarning)
    attacks.robust_accuracies(_logits, X, Y, KEY, eps=0.05, attacks=('fgsm',), batch_size=8)


def test_checks_cost_nothing_inside_a_callers_jit():
  """Under a caller's jit only shapes and dtypes are checked; traced values pass (an ε ramp starting at 0)."""
  run = jax.jit(lambda x, y, e: attacks.apgd(_logits, x, y, KEY, eps=e, steps=2))
  assert run(X, Y, 0.0).shape == X.shape
  with pytest.raises(TypeError, match='labels must be integer'):
    run(X, Y.astype(jnp.float32), 0.1)
