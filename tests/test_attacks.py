"""Attacks: they stay in their ε-ball and in [0, 1], they are ordered PGD < FGSM < noise < clean in accuracy on a
trained model, and they compile once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arreg_jax import attacks


def _accuracy(logits_fn, x, y):
  return float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y))


@pytest.mark.parametrize('norm,eps', [('linf', 0.1), ('linf', 8 / 255), ('l2', 1.5)])
def test_pgd_stays_in_ball_and_domain(trained_cnn, norm, eps):
  logits_fn, x, y = trained_cnn
  x, y = x[:128], y[:128]
  step = eps / 4 if norm == 'linf' else eps / 4
  adv = attacks.pgd(logits_fn, x, y, jax.random.key(0), eps=eps, step_size=step, steps=10, norm=norm)
  assert adv.shape == x.shape and adv.dtype == x.dtype
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  delta = np.asarray(adv - x).reshape(len(x), -1)
  if norm == 'linf':
    assert np.abs(delta).max() <= eps + 1e-6
    assert np.abs(delta).max() >= 0.9 * eps  # the attack actually moves to the boundary
  else:
    norms = np.linalg.norm(delta, axis=1)
    assert norms.max() <= eps * (1 + 1e-5)
    assert np.median(norms) >= 0.5 * eps


def test_attack_strength_ordering(trained_cnn):
  """On a trained model: accuracy(clean) > accuracy(uniform noise, same ε) > FGSM > PGD."""
  logits_fn, x, y = trained_cnn
  eps = 0.15
  key = jax.random.key(3)
  clean = _accuracy(logits_fn, x, y)
  noise = _accuracy(logits_fn, jnp.clip(x + jax.random.uniform(key, x.shape, minval=-eps, maxval=eps), 0, 1), y)
  fgsm = _accuracy(logits_fn, attacks.fgsm(logits_fn, x, y, key, eps=eps), y)
  pgd = _accuracy(logits_fn, attacks.pgd(logits_fn, x, y, key, eps=eps, step_size=eps / 4, steps=10), y)
  assert clean > 0.85, clean
  assert noise > fgsm + 0.05, (noise, fgsm)
  assert fgsm > pgd + 0.02, (fgsm, pgd)
  assert clean >= noise - 0.02


def test_fgsm_is_one_unprojected_sign_step(trained_cnn):
  logits_fn, x, y = trained_cnn
  x, y = x[:64], y[:64]
  g = jax.grad(lambda z: attacks.cross_entropy_sum(logits_fn, z, y))(x)
  expected = jnp.clip(x + 0.1 * jnp.sign(g), 0, 1)
  np.testing.assert_allclose(attacks.fgsm(logits_fn, x, y, jax.random.key(0), eps=0.1), expected, atol=1e-6)


def test_zero_eps_returns_input(trained_cnn):
  """A traced ε of 0 (an ε ramp's first step) leaves the input as it is; a concrete ε of 0 is refused."""
  logits_fn, x, y = trained_cnn
  run = jax.jit(lambda e: attacks.pgd(logits_fn, x[:16], y[:16], jax.random.key(0), eps=e, step_size=0.01, steps=3))
  np.testing.assert_array_equal(run(0.0), x[:16])
  with pytest.raises(ValueError, match='eps must be > 0'):
    attacks.pgd(logits_fn, x[:16], y[:16], jax.random.key(0), eps=0.0, step_size=0.01, steps=3)


def test_per_example_independence(trained_cnn):
  """The gradient of the batch-summed loss makes each example's attack independent of the batch."""
  logits_fn, x, y = trained_cnn
  kw = dict(eps=0.1, step_size=0.025, steps=5, random_start=False)
  full = attacks.pgd(logits_fn, x[:32], y[:32], jax.random.key(0), **kw)
  half = attacks.pgd(logits_fn, x[:16], y[:16], jax.random.key(0), **kw)
  np.testing.assert_allclose(full[:16], half, atol=1e-5)


def test_compiles_once_for_same_shapes(trained_cnn):
  logits_fn, x, y = trained_cnn
  traces = []

  @jax.jit
  def run(x, y, key, eps):
    traces.append(1)
    return attacks.pgd(logits_fn, x, y, key, eps=eps, step_size=eps / 4, steps=3)

  for i in range(3):
    run(x[:32], y[:32], jax.random.key(i), 0.1 + 0.01 * i).block_until_ready()
  assert len(traces) == 1


def test_rejects_bad_inputs(trained_cnn):
  logits_fn, x, y = trained_cnn
  with pytest.raises(ValueError, match='norm'):
    attacks.pgd(logits_fn, x[:4], y[:4], jax.random.key(0), eps=0.1, step_size=0.1, steps=1, norm='l3')
  with pytest.raises(ValueError, match='logits_fn must map images'):  # (4, 28, 1): not the model's input shape
    attacks.pgd(logits_fn, x[:4, 0], y[:4], jax.random.key(0), eps=0.1, step_size=0.1, steps=1)
