"""APGD, Square, AutoAttack, robust accuracies and the gradient-masking checks.

Kept fast: the attacks' geometry on a linear model (cheap to compile), their strength on the trained CNN in one
compiled program with short schedules (APGD 20 iterations, 3 targets, Square 300 queries). The 4-device sharding
test is marked slow (pytest -m slow)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arreg_jax import attacks, sharding
from arreg_jax.attacks import gradient_masking, robust_accuracy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 0.15
KEY = jax.random.key(0)


def _linear_model(key=0, classes=10, shape=(8, 8, 1)):
  w = jax.random.normal(jax.random.key(key), (int(np.prod(shape)), classes)) / 4
  return lambda x: x.reshape(x.shape[0], -1).astype(jnp.float32) @ w


def _linear_data(n=16, shape=(8, 8, 1), classes=10):
  x = jax.random.uniform(jax.random.key(1), (n,) + shape)
  logits_fn = _linear_model(classes=classes, shape=shape)
  return logits_fn, x, jnp.argmax(logits_fn(x), -1).astype(jnp.int32)


def _no_gradient(logits_fn):
  """logits_fn whose derivative raises: any gradient use fails at trace time."""

  @jax.custom_vjp
  def f(x):
    return logits_fn(x)

  def bwd(res, g):
    raise AssertionError('the gradient of logits_fn was taken')

  f.defvjp(lambda x: (f(x), None), bwd)
  return f


def _accuracy(logits_fn, x, y):
  return float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y))


# --- the schedule and the losses -------------------------------------------------------------------------------

def _authors_checkpoints(n_iter):
  """The authors' loop (autopgd_base.py): a check when counter3 == k, then k = max(k - size_decr, n_iter_min)."""
  n_iter_2, n_iter_min, size_decr = max(int(0.22 * n_iter), 1), max(int(0.06 * n_iter), 1), max(int(0.03 * n_iter), 1)
  out, k, counter3 = [], n_iter_2, 0
  for i in range(n_iter):
    counter3 += 1
    if counter3 == k:
      out.append(i + 1)
      k = max(k - size_decr, n_iter_min)
      counter3 = 0
  return out


@pytest.mark.parametrize('n', [100, 20, 1000])
def test_checkpoints_match_authors_formula(n):
  assert list(attacks.checkpoints(n)) == _authors_checkpoints(n)
  if n == 100:  # p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06): 0, .22, .41, .57, .70, .80, .87, .93, .99
    p = [0.0, 0.22]
    while True:
      nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
      if nxt > 1 + 1e-9:
        break
      p.append(nxt)
    assert list(attacks.checkpoints(n)) == [round(v * n) for v in p[1:]]


def test_dlr_losses_invariant_to_shift_and_scale():
  z = jax.random.normal(jax.random.key(0), (32, 10)) * 3
  y = jnp.arange(32) % 10
  t = (y + 3) % 10
  dlr, dlr_t = jax.jit(attacks.dlr), jax.jit(attacks.dlr_targeted)
  for a, b in [(1.0, 5.0), (7.5, -2.0), (0.1, 1.0)]:  # float32: big shifts of small logits cancel digits
    np.testing.assert_allclose(dlr(a * z + b, y), dlr(z, y), rtol=2e-3, atol=1e-4)
    np.testing.assert_allclose(dlr_t(a * z + b, y, t), dlr_t(z, y, t), rtol=2e-3, atol=1e-4)
  # The definition: −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3).
  zs = np.sort(np.asarray(z), -1)[:, ::-1]
  zy = np.asarray(z)[np.arange(32), y]
  other = np.where(np.eye(10, dtype=bool)[y], -np.inf, np.asarray(z)).max(-1)
  np.testing.assert_allclose(dlr(z, y), -(zy - other) / (zs[:, 0] - zs[:, 2]), rtol=1e-5)
  assert not np.allclose(attacks.cross_entropy(3 * z, y), attacks.cross_entropy(z, y))


def test_targeted_apgd_reaches_its_target():
  logits_fn, x, y = _linear_data()
  target = jnp.argsort(-logits_fn(x), -1)[:, 1]
  adv = jax.jit(lambda x, y: attacks.apgd(logits_fn, x, y, KEY, eps=0.5, steps=20, loss='dlr_targeted',
                                          n_targets=1))(x, y)
  z = np.asarray(logits_fn(adv))
  i = np.arange(len(y))
  assert np.mean(z[i, target] > z[i, y]) >= 0.9  # the targeted DLR −(z_y − z_t)/… is positive: t beats y


# --- geometry: ε-ball, [0, 1], shape, dtype ----------------------------------------------------------------------

GEOMETRY = {
    'apgd_ce_linf': lambda f, x, y, k, e: attacks.apgd(f, x, y, k, eps=e, steps=10),
    'apgd_dlr_l2': lambda f, x, y, k, e: attacks.apgd(f, x, y, k, eps=10 * e, steps=10, norm='l2', loss='dlr',
                                                      restarts=2),
    'square': lambda f, x, y, k, e: attacks.square(f, x, y, k, eps=e, queries=50),
    # APGD-CE then APGD-T (2 targets): also the targeted attack's geometry.
    'autoattack_custom': lambda f, x, y, k, e: attacks.autoattack(f, x, y, k, eps=e, steps=10, n_targets=2,
                                                                  version='custom', attacks=['apgd_ce', 'apgd_t']),
    'square_l2': lambda f, x, y, k, e: attacks.square(f, x, y, k, eps=10 * e, queries=50, norm='l2'),
}


@pytest.mark.parametrize('name', sorted(GEOMETRY))
def test_stays_in_ball_and_domain(name):
  logits_fn, x, y = _linear_data()
  eps = 0.05
  norm = 'l2' if 'l2' in name else 'linf'
  adv = jax.jit(lambda x, y, k, e: GEOMETRY[name](logits_fn, x, y, k, e))(x, y, jax.random.key(0), eps)
  assert adv.shape == x.shape and adv.dtype == x.dtype
  assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
  d = np.asarray(adv - x).reshape(len(x), -1)
  if norm == 'linf':
    assert np.abs(d).max() <= eps + 1e-6 and np.abs(d).max() >= 0.9 * eps
  else:
    assert np.linalg.norm(d, axis=1).max() <= 10 * eps * (1 + 1e-5)


def test_apgd_keeps_bfloat16_and_compiles_once():
  logits_fn, x, y = _linear_data()
  traces = []

  @jax.jit
  def run(x, y, key, eps):
    traces.append(1)
    return attacks.apgd(logits_fn, x, y, key, eps=eps, steps=5)

  for i in range(2):
    adv = run(x.astype(jnp.bfloat16), y, jax.random.key(i), 0.05 + 0.01 * i)
  assert adv.dtype == jnp.bfloat16 and adv.shape == x.shape and len(traces) == 1
  with pytest.raises(ValueError, match='loss'):
    attacks.apgd(logits_fn, x, y, jax.random.key(0), eps=0.1, steps=2, loss='hinge')


def test_per_example_noise_and_independence():
  """Example i's random start comes from fold_in(key, i): a sub-batch gets the same attack."""
  logits_fn, x, y = _linear_data()
  run = jax.jit(lambda x, y: attacks.apgd(logits_fn, x, y, jax.random.key(3), eps=0.05, steps=6))
  full, half = run(x, y), run(x[:8], y[:8])
  np.testing.assert_allclose(full[:8], half, atol=1e-6)


SHARDED = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from arreg_jax import attacks, sharding
    assert jax.device_count() == 4
    w = jax.random.normal(jax.random.key(0), (64, 10)) / 4
    f = lambda x: x.reshape(x.shape[0], -1) @ w
    x = jax.random.uniform(jax.random.key(1), (8, 8, 8, 1)); y = jnp.argmax(f(x), -1).astype(jnp.int32)
    mesh = sharding.make_mesh(); data, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    run = lambda x, y, k, e: attacks.autoattack(f, x, y, k, eps=e, steps=4, n_targets=1, queries=10)
    sharded = jax.jit(run, in_shardings=(data, data, rep, rep))(jax.device_put(x, data), jax.device_put(y, data),
                                                                jax.random.key(2), 0.05)
    single = jax.jit(run)(x, y, jax.random.key(2), 0.05)
    np.testing.assert_allclose(sharded, single, atol=1e-6)
    print('OK')
''')


@pytest.mark.slow  # ~15 s (a fresh process, two compilations); run with -m slow
def test_autoattack_on_four_devices_matches_one():
  """AutoAttack inside jax.jit with the batch sharded over a 4-device mesh gives the single-device result."""
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4'}
  r = subprocess.run([sys.executable, '-c', SHARDED], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and 'OK' in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


# --- strength on the trained CNN, and Square without gradients ----------------------------------------------------

@pytest.fixture(scope='module')
def strengths(trained_cnn):
  """Robust accuracies on 64 test digits at ε = 0.15, all attacks in one program: PGD-10, AutoAttack (APGD 20
  iterations, 3 targets, Square 300 queries) with its history, and APGD-T and Square alone with AutoAttack's stage
  keys (stages 1 and 3; Square on a model whose gradient raises)."""
  logits_fn, x, y = trained_cnn
  kw = dict(eps=EPS, steps=20, n_targets=3)

  @jax.jit
  def run(x, y):
    acc = lambda a: jnp.mean(jnp.argmax(logits_fn(a), -1) == y)
    _, hist = attacks.autoattack(logits_fn, x, y, KEY, queries=300, return_history=True, **kw)
    out = {k: jnp.mean(v) for k, v in hist.items()}
    out['pgd10'] = acc(attacks.pgd(logits_fn, x, y, KEY, eps=EPS, step_size=EPS / 4, steps=10))
    out['apgd_t_alone'] = acc(attacks.apgd(logits_fn, x, y, jax.random.fold_in(KEY, 1), loss='dlr_targeted', **kw))
    out['square_alone'] = acc(attacks.square(_no_gradient(logits_fn), x, y, jax.random.fold_in(KEY, 3), eps=EPS,
                                             queries=300, rescale=False))
    return out

  return {k: float(v) for k, v in run(x[:64], y[:64]).items()}


def test_apgd_at_least_as_strong_as_pgd10(strengths):
  assert strengths['clean'] > 0.85, strengths
  assert strengths['apgd_ce'] <= strengths['pgd10'], strengths


def test_autoattack_at_least_as_strong_as_each_part(strengths):
  for part in ('apgd_ce', 'apgd_t_alone', 'square_alone', 'pgd10'):
    assert strengths['square'] <= strengths[part], strengths
  assert strengths['square'] <= strengths['apgd_t'] <= strengths['apgd_ce'] < strengths['clean'], strengths


def test_square_lowers_accuracy_without_gradients(strengths, trained_cnn):
  assert strengths['square_alone'] < strengths['clean'] - 0.1, strengths
  logits_fn, x, y = trained_cnn
  with pytest.raises(AssertionError, match='gradient'):  # the guard works
    attacks.apgd(_no_gradient(logits_fn), x[:4], y[:4], jax.random.key(0), eps=0.1, steps=1)


def test_autoattack_history_is_the_cascade():
  """The stages equal the attacks run alone with the stage keys; robust sets only shrink; the output matches."""
  logits_fn, x, y = _linear_data(n=32)
  kw = dict(eps=0.03, steps=10)
  adv, hist = jax.jit(lambda x, y: attacks.autoattack(logits_fn, x, y, KEY, n_targets=2, queries=50,
                                                      return_history=True, **kw))(x, y)
  alone = jax.jit(lambda x, y: attacks.apgd(logits_fn, x, y, jax.random.fold_in(KEY, 0), **kw))(x, y)
  np.testing.assert_array_equal(hist['apgd_ce'], jnp.argmax(logits_fn(alone), -1) == y)
  stages = ['clean', 'apgd_ce', 'apgd_t', 'fab_t', 'square']  # (jit returns dicts with sorted keys)
  assert sorted(hist) == sorted(stages)
  masks = [np.asarray(hist[k]) for k in stages]
  for a, b in zip(masks, masks[1:]):
    assert not (b & ~a).any()  # robust sets only shrink
  np.testing.assert_array_equal(np.asarray(jnp.argmax(logits_fn(adv), -1) == y), masks[-1])
  assert np.abs(np.asarray(adv - x)).max() <= 0.03 + 1e-6
  with pytest.raises(ValueError, match='version'):
    attacks.autoattack(logits_fn, x, y, KEY, eps=0.03, version='fast')


# --- robust accuracies and sanity checks --------------------------------------------------------------------------

def test_robust_accuracies_padded_batches_match_one_batch():
  """10 points in batches of 4 (the last padded), sharded over the mesh, equal one unpadded evaluation."""
  logits_fn, x, y = _linear_data(n=10)
  y = y.at[:3].set((y[:3] + 1) % 10)  # 3 clean mistakes
  got = attacks.robust_accuracies(logits_fn, x, y, jax.random.key(0), eps=0.05, attacks=('fgsm',), batch_size=4,
                                  mesh=sharding.make_mesh())
  adv = attacks.fgsm(logits_fn, x, y, None, eps=0.05)
  want = np.mean(np.asarray((jnp.argmax(logits_fn(adv), -1) == y) & (jnp.argmax(logits_fn(x), -1) == y)))
  assert got['clean'] == pytest.approx(0.7) and got['fgsm'] == pytest.approx(want)
  with pytest.raises(ValueError, match='unknown attack'):
    robust_accuracy.attack_fn('cw')


def test_accuracy_checks_on_known_cases():
  good = {'fgsm': 0.5, 'pgd10': 0.4, 'pgd100': 0.38, 'apgd_ce': 0.37, 'autoattack': 0.35, 'square': 0.45}
  assert gradient_masking.attack_ordering(good)['passed']
  bad = gradient_masking.attack_ordering({**good, 'pgd100': 0.45})
  assert not bad['passed'] and bad['value'] == pytest.approx(0.05) and 'pgd10' in bad['detail']
  assert gradient_masking.square_vs_whitebox(good)['passed']
  masked = gradient_masking.square_vs_whitebox({**good, 'square': 0.30})
  assert not masked['passed'] and masked['value'] == pytest.approx(0.07)  # apgd_ce 0.37 − 0.30
  assert gradient_masking.eps_monotone({0.0: 0.9, 0.1: 0.5, 0.5: 0.0})['passed']
  assert not gradient_masking.eps_monotone({0.0: 0.9, 0.1: 0.5, 0.2: 0.6, 0.5: 0.0})['passed']
  assert not gradient_masking.eps_monotone({0.0: 0.9, 0.5: 0.3})['passed']  # never reaches 0


def test_masked_gradients_are_flagged(trained_cnn):
  logits_fn, x, y = trained_cnn
  x, y = x[:64], y[:64]
  clean = gradient_masking.run_checks(logits_fn, x, y)
  assert clean['zero_gradients']['passed'] and clean['deterministic']['passed'], clean
  for masked in (lambda z: logits_fn(jnp.round(z * 8) / 8), lambda z: logits_fn(jax.lax.stop_gradient(z))):
    out = gradient_masking.run_checks(masked, x, y)
    assert not out['zero_gradients']['passed'] and out['zero_gradients']['value'] == 1.0, out
  noisy = lambda z: logits_fn(z) + 1e-2 * np.random.default_rng().normal(size=(len(z), 10))
  assert not gradient_masking.deterministic(noisy, x)['passed']
