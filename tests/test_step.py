"""Training pieces: the schedule, the ε ramp, BatchNorm handling in the step, evaluation masking."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from arreg_jax import configuration, models, presets, sharding
from arreg_jax.data import augment
from arreg_jax.training import eval_step, state as state_lib, step as step_lib


def _compiles(fun_name: str):
  """``(seen, listener)``: the listener (for ``jax.monitoring``) appends to ``seen`` once per backend compilation
  of a function named ``fun_name``."""
  seen = []

  def listener(event, _, **kw):
    if event == '/jax/core/compile/backend_compile_duration' and kw.get('fun_name') == f'jit({fun_name})':
      seen.append(fun_name)

  return seen, listener


def test_piecewise_constant_schedule_matches_paper():
  """lr 0.05, ÷10 at epochs 100 and 150 (D.3): read off the actual SGD updates (momentum 0: u = -lr·g)."""
  cfg = presets.cifar_paper('cifar10', 'resnet56').train
  cfg.momentum = 0.0
  steps = 2
  optimizer = state_lib.Optimizer.from_config(cfg, steps)
  tx = optimizer.transform()
  params = {'w': jnp.zeros(())}
  state = tx.init(params)
  update = jax.jit(lambda s: tx.update({'w': jnp.ones(())}, s, params))
  seen = {}
  for step in range(151 * steps):
    u, state = update(state)
    seen[step] = -float(u['w'])
  for step, lr in ((0, 0.05), (100 * steps - 1, 0.05), (100 * steps, 0.005), (150 * steps - 1, 0.005),
                   (150 * steps, 0.0005)):
    assert abs(seen[step] - lr) < 1e-9, (step, seen[step])
    assert abs(float(optimizer.schedule()(step)) - lr) < 1e-9  # what metrics.jsonl reports as lr


def test_sgd_momentum_update_is_pytorch_sgd():
  cfg = configuration.base_config().train
  cfg.learning_rate, cfg.momentum, cfg.weight_decay, cfg.lr_boundaries = 0.1, 0.9, 0.01, ()
  tx = state_lib.Optimizer.from_config(cfg, 10).transform()
  p = {'w': jnp.array([1.0, -2.0])}
  g = {'w': jnp.array([0.5, 0.5])}
  s = tx.init(p)
  buf = np.zeros(2)
  w = np.array([1.0, -2.0])
  for _ in range(3):  # torch.optim.SGD(lr, momentum, weight_decay): d = g + wd·w; buf = m·buf + d; w -= lr·buf
    u, s = tx.update(g, s, p)
    p = optax.apply_updates(p, u)
    buf = 0.9 * buf + (0.5 + 0.01 * w)
    w = w - 0.1 * buf
  np.testing.assert_allclose(p['w'], w, rtol=1e-6)


def test_eps_ramp():
  cfg = configuration.base_config()
  cfg.attack.strength_unit = 1 / 255
  eps = step_lib.step_hyper(cfg, 8, jax.random.key(0)).eps
  assert eps.dtype == jnp.float32 and float(eps) == float(np.float32(8 / 255))
  assert float(step_lib.attack_eps(eps, jnp.asarray(99), 0)) == float(eps)
  ramped = [float(step_lib.attack_eps(eps, jnp.asarray(s), 100)) for s in (0, 49, 99, 500)]
  np.testing.assert_allclose(ramped, [8 / 255 / 100, 8 / 255 / 2, 8 / 255, 8 / 255], rtol=1e-6)


def _step_for(name, strength, bn_mode="eval"):
  cfg = configuration.base_config()
  cfg.attack.bn_mode = bn_mode
  cfg.attack.steps = 2
  module = models.get_module(name, num_classes=10)
  _, variables = models.create(name, num_classes=10, key=jax.random.key(0))
  mesh = sharding.make_mesh()
  spec = step_lib.step_spec(cfg, module=module, adversarial=step_lib.is_adversarial(cfg, strength), augment='cifar',
                            steps_per_epoch=4, batch_sharding=sharding.batch_sharding(mesh))
  state = jax.device_put(state_lib.init_state(variables, spec.optimizer), sharding.replicated(mesh))
  step = functools.partial(jax.jit(step_lib.train_step, static_argnums=0, donate_argnums=1), spec)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8))
  labels = jnp.asarray(np.arange(16) % 10, jnp.int32)
  return state, step, images, labels, step_lib.step_hyper(cfg, strength, jax.random.key(1))


def test_batchnorm_step_updates_running_stats_once():
  for mode in ('eval', 'batch'):
    state, step, images, labels, hyper = _step_for('resnet20_bn', 8.0, mode)
    before = jax.tree.map(np.asarray, state.batch_stats)
    state, metrics = step(state, images, labels, jnp.arange(8, dtype=jnp.int32), hyper)
    after = state.batch_stats
    assert int(state.step) == 1 and np.isfinite(float(metrics['loss_sum']))
    # Running means move by (1 - momentum) = 0.1 toward one batch's statistics: a single update, not one per
    # attack step (which would compound to 1 - 0.9^3 of the way).
    m0 = before['bn_init']['mean']
    m1 = np.asarray(after['bn_init']['mean'])
    assert np.all(m0 == 0) and np.any(m1 != 0)
    x = augment.preprocess(None, images[:8], kind='cifar', train=False)
    del x


def test_train_step_compiles_once_and_is_deterministic():
  state, step, images, labels, hyper = _step_for('resnet20', 8.0)
  s2, s3 = jax.tree.map(jnp.copy, state), jax.tree.map(jnp.copy, state)
  idx = jnp.arange(8, dtype=jnp.int32)
  compiled, listener = _compiles('train_step')
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    a, _ = step(state, images, labels, idx, hyper)
    a, _ = step(a, images, labels, idx + 8, hyper)
    b, _ = step(s2, images, labels, idx, hyper)
    b, _ = step(b, images, labels, idx + 8, hyper)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
      np.testing.assert_array_equal(x, y)
    # Another member's ε (AR 4 instead of 8) runs the same compiled program, and trains differently.
    c, _ = step(s3, images, labels, idx, hyper.replace(eps=hyper.eps / 2))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert len(compiled) == 1, compiled
  assert any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(c.params), jax.tree.leaves(a.params)))


def test_evaluate_masks_padding_and_counts_pgd_over_clean_correct():
  module = models.get_module('small_cnn', num_classes=10)
  _, variables = models.create('small_cnn', num_classes=10, key=jax.random.key(0))
  # A radius of 1e-6 (the attacks refuse ε = 0): no prediction of this model moves, so PGD accuracy is 1.
  cfg = ml_collections.ConfigDict({'eps': 1e-6, 'step_size': 1e-6, 'steps': 1})
  step = eval_step.make_eval_step(module, augment_kind='none', pgd_cfg=cfg)
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (37, 28, 28, 1), dtype=np.uint8))
  labels = jnp.asarray(np.arange(37) % 10, jnp.int32)
  out = eval_step.evaluate(step, variables, images, labels, batch_size=16, key=jax.random.key(0))
  logits = module.apply(variables, images.astype(jnp.float32) / 255)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  assert out['count'] == 37
  np.testing.assert_allclose(out['loss'], float(ce.mean()), rtol=1e-5)
  np.testing.assert_allclose(out['acc'], float((logits.argmax(-1) == labels).mean()), rtol=1e-6)
  # ε = 0: the attack changes nothing, so every clean-correct example stays correct.
  assert out['pgd_acc'] == 1.0 or out['clean_correct'] == 0


def test_steady_state_steps_make_no_host_to_device_copies():
  """With the dataset and the epoch's permutation on the device, training calls copy nothing from the
  host — checked with jax.transfer_guard, which raises on any host→device transfer inside the block."""
  cfg = configuration.base_config()
  cfg.attack.steps = 2
  cfg.train.batch_size, cfg.train.steps_per_call = 8, 2
  module = models.get_module('small_cnn', num_classes=10)
  _, variables = models.create('small_cnn', num_classes=10, key=jax.random.key(0), input_shape=(28, 28, 1))
  mesh = sharding.make_mesh()
  spec = step_lib.step_spec(cfg, module=module, adversarial=True, augment='none', steps_per_epoch=4,
                            batch_sharding=sharding.batch_sharding(mesh), steps_per_call=2)
  state = jax.device_put(state_lib.init_state(variables, spec.optimizer), sharding.replicated(mesh))
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8), sharding.replicated(mesh))
  labels = jax.device_put(rng.integers(0, 10, (32,), dtype=np.int32), sharding.replicated(mesh))
  perm = jax.device_put(np.random.default_rng(1).permutation(32).astype(np.int32), sharding.replicated(mesh))
  multi = functools.partial(step_lib.train_steps, spec)
  hyper = jax.device_put(step_lib.step_hyper(cfg, 0.1, jax.random.key(1)), sharding.replicated(mesh))
  state, _ = multi(state, images, labels, perm, hyper)  # compile outside the guard
  with jax.transfer_guard_host_to_device('disallow'):
    for _ in range(3):
      state, metrics = multi(state, images, labels, perm, hyper)
  assert int(state.step) == 8
  assert np.isfinite(float(metrics['loss_sum']))


def test_multi_step_equals_single_steps():
  """steps_per_call = 3 in one dispatch trains exactly as three single steps on the same permutation."""
  state, step, images, labels, hyper = _step_for('resnet20', 4.0)
  cfg = configuration.base_config()
  cfg.attack.steps = 2
  cfg.train.batch_size = 4
  module = models.get_module('resnet20', num_classes=10)
  mesh = sharding.make_mesh()
  spec = step_lib.step_spec(cfg, module=module, adversarial=True, augment='cifar', steps_per_epoch=4,
                            batch_sharding=sharding.batch_sharding(mesh), steps_per_call=3)
  multi = functools.partial(step_lib.train_steps, spec)
  perm = jnp.asarray(np.random.default_rng(1).permutation(16), jnp.int32)
  s_multi, m_multi = multi(jax.tree.map(jnp.copy, state), images, labels, perm, hyper)
  total = 0.0
  for t in range(3):
    state, m = step(state, images, labels, perm[4 * t:4 * t + 4], hyper)
    total += float(m['loss_sum'])
  assert int(s_multi.step) == 3
  np.testing.assert_allclose(float(m_multi['loss_sum']), total, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_multi.params), jax.tree.leaves(state.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


EVAL_EPS = 0.06  # breaks about a third of the examples of this random network


def test_chunked_evaluation_attack_gives_the_same_metrics():
  """The eval step attacking its batch in 1, 2 or 5 chunks: same starts, same PGD accuracy and loss."""
  module = models.get_module('small_cnn', num_classes=10)
  _, variables = models.create('small_cnn', num_classes=10, key=jax.random.key(0))
  variables = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(3), a.shape), variables)
  cfg = ml_collections.ConfigDict({'eps': EVAL_EPS, 'step_size': EVAL_EPS / 4, 'steps': 4})
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (30, 28, 28, 1), dtype=np.uint8))
  labels = jnp.argmax(module.apply(variables, images.astype(jnp.float32) / 255), -1).astype(jnp.int32)  # all correct
  out = {k: eval_step.evaluate(eval_step.make_eval_step(module, augment_kind='none', pgd_cfg=cfg, chunks=k),
                               variables, images, labels, batch_size=10, key=jax.random.key(1))
         for k in (1, 2, 5)}
  assert out[1]['clean_correct'] == 30 and 0.2 < out[1]['pgd_acc'] < 0.8, out[1]
  for k in (2, 5):
    assert out[k]['clean_correct'] == out[1]['clean_correct']
    np.testing.assert_allclose(out[k]['pgd_acc'], out[1]['pgd_acc'], atol=1 / 30)
    np.testing.assert_allclose(out[k]['loss'], out[1]['loss'], rtol=1e-6)
