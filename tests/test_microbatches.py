"""Gradient accumulation over microbatches (config.train.microbatches) and the memory plan
(arreg_jax.training.memory_plan)."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arreg_jax import configuration, models, sharding
from arreg_jax.data import augment
from arreg_jax.errors import ConfigError, MemoryPlanError
from arreg_jax.training import memory_plan, setup, state as state_lib, step as step_lib

B = 16


def _setup(random_start=True, lam=0.0):
  cfg = configuration.base_config()
  cfg.attack.steps = 2
  cfg.attack.random_start = random_start
  cfg.regularizer.margin_lambda = lam
  cfg.train.batch_size = B
  module = models.get_module('mlp', num_classes=10)
  _, variables = models.create('mlp', num_classes=10, key=jax.random.key(0), input_shape=(28, 28, 1))
  mesh = sharding.make_mesh()
  spec = step_lib.step_spec(cfg, module=module, adversarial=True, augment='none', steps_per_epoch=4,
                            batch_sharding=sharding.batch_sharding(mesh))
  state = jax.device_put(state_lib.init_state(variables, spec.optimizer), sharding.replicated(mesh))
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.integers(0, 256, (32, 28, 28, 1), dtype=np.uint8))
  labels = jnp.asarray(rng.integers(0, 10, (32,)), jnp.int32)
  return cfg, spec, state, images, labels


def _hyper(cfg):
  return step_lib.step_hyper(cfg, 0.1, jax.random.key(1))


def _jitted(spec):
  return functools.partial(jax.jit(step_lib.train_step, static_argnums=0), spec)


def _step(cfg, spec, state, images, labels, k, progress=None):
  step = _jitted(spec.replace(microbatches=k, progress=progress))
  return step(state, images, labels, jnp.arange(B, dtype=jnp.int32), _hyper(cfg))


@pytest.mark.parametrize('lam', [0.0, 0.5])
def test_microbatches_give_the_update_of_one_batch(lam):
  """Without BatchNorm and random start, PGD is per example: k = 4 microbatches of 4 = one batch of 16."""
  cfg, spec, state, images, labels = _setup(random_start=False, lam=lam)
  s1, m1 = _step(cfg, spec, state, images, labels, 1)
  s4, m4 = _step(cfg, spec, state, images, labels, 4)
  assert int(s4.step) == 1 and float(m4['count']) == B
  for key in m1:
    np.testing.assert_allclose(float(m4[key]), float(m1[key]), rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s4.params), jax.tree.leaves(s1.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for a, b in zip(jax.tree.leaves(s4.opt_state), jax.tree.leaves(s1.opt_state)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _reference_step(module, tx, *, config, strength, augment_kind, batch_sharding, base_key):
  """The training step as it was before microbatches existed (no regularizer, ε a constant), for the bit-for-bit
  check."""
  attack = step_lib.AttackSpec.from_config(config.attack)
  eps = float(strength) * float(config.attack.strength_unit)

  def step(state, images, labels, batch_index):
    k_aug, k_att = jax.random.split(jax.random.fold_in(base_key, state.step))
    x = jax.lax.with_sharding_constraint(images[batch_index], batch_sharding)
    y = jax.lax.with_sharding_constraint(labels[batch_index], batch_sharding)
    x = augment.preprocess(k_aug, x, kind=augment_kind, train=True)
    fixed = step_lib.logits_fn_of(module, state.variables(), train=False)
    x = attack(fixed, x, y, k_att, eps)
    loss_fn = lambda p: step_lib.update_loss(module, p, state.batch_stats, x, y, 0.0, 1.0, 0.0)
    (loss, (logits, new_stats, _)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new = state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                        batch_stats=new_stats, opt_state=opt_state)
    return new, {'loss_sum': loss * y.shape[0],
                 'correct': jnp.sum(jnp.argmax(logits, -1) == y).astype(jnp.float32),
                 'count': jnp.asarray(y.shape[0], jnp.float32)}
  return step


def test_one_microbatch_is_the_unsplit_program_bit_for_bit():
  cfg, spec, state, images, labels = _setup(random_start=True)
  assert cfg.train.microbatches == 1  # the default
  ref = jax.jit(_reference_step(spec.module, spec.optimizer.transform(), config=cfg, strength=0.1,
                                augment_kind='none', batch_sharding=spec.batch_sharding,
                                base_key=jax.random.key(1)))
  new = _jitted(spec)
  a, b, index = state, state, jnp.arange(B, dtype=jnp.int32)
  for t in range(2):
    a, ma = ref(a, images, labels, index + t)
    b, mb = new(b, images, labels, index + t, _hyper(cfg))
  for x, y in zip(jax.tree.leaves((a, ma)), jax.tree.leaves((b, mb))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize('k', [0, -2, 3, 2.0, True, 'two', None])
def test_bad_microbatch_counts_are_config_errors(k):
  with pytest.raises(ConfigError, match='microbatches'):
    configuration.check_microbatches(k, 128)


def test_microbatch_validation_names_the_fix():
  c = configuration.base_config()
  c.train.microbatches = 3
  with pytest.raises(ConfigError, match=r'divide config.train.batch_size = 128; use a divisor of 128 \(2, 4'):
    configuration.validate(c)
  c.train.microbatches = 'auto'
  configuration.validate(c)
  c.train.microbatches, c.train.batch_size = 8, 64  # microbatches of 8 on 16 devices
  ds = types.SimpleNamespace(train_images=np.zeros((256, 1)), name='x')
  with pytest.raises(ConfigError, match='multiple of 16'):
    setup.check_sizes(c, ds, types.SimpleNamespace(size=16))
  setup.check_sizes(c, ds, types.SimpleNamespace(size=8))


class _FakeProgram:
  """A stand-in for a compiled step with k microbatches: temporaries of 1000/k MB, 10 MB of outputs donated."""

  def __init__(self, k):
    self.k = k

  def memory_analysis(self):
    return types.SimpleNamespace(argument_size_in_bytes=50e6, output_size_in_bytes=10e6, alias_size_in_bytes=10e6,
                                 temp_size_in_bytes=1000e6 / self.k)


def test_planner_raises_with_bytes_and_the_smallest_fitting_count():
  compiled = []
  compile_k = lambda k: compiled.append(k) or _FakeProgram(k)
  with pytest.raises(MemoryPlanError) as e:  # 90% of 300 MB: 1000/4 = 250 MB fits, 1000/2 does not
    memory_plan.plan_train_step(compile_k, 1, [1, 2, 4, 8, 16], what='AR 8', free=300_000_000)
  msg = str(e.value)
  assert 'AR 8' in msg and '1,000,000,000 bytes' in msg and '300,000,000 bytes' in msg
  assert '--config.train.microbatches=4' in msg
  assert compiled == [1, 4]  # k = 2 skipped: even at 1/k it could not fit
  with pytest.raises(MemoryPlanError, match='lower config.train.batch_size'):
    memory_plan.plan_train_step(compile_k, 1, [1, 2], what='AR 8', free=300_000_000)


def test_auto_picks_the_smallest_count_that_fits():
  for free, want in ((2_000_000_000, 1), (600_000_000, 2), (300_000_000, 4), (120_000_000, 16)):
    k, program = memory_plan.plan_train_step(_FakeProgram, 'auto', [1, 2, 4, 8, 16], what='t', free=free)
    assert (k, program.k) == (want, want), free
  k, _ = memory_plan.plan_train_step(_FakeProgram, 'auto', [1, 2], what='t', free=None)  # unknown memory: as is
  assert k == 1


def test_real_compiled_step_is_planned():
  """The compiled mlp step's own footprint: fits in the host's memory, and not in 1 kB."""
  cfg, spec, state, images, labels = _setup()
  idx = jnp.arange(B, dtype=jnp.int32)
  hyper = _hyper(cfg)
  step = jax.jit(step_lib.train_step, static_argnums=0)
  compile_k = lambda k: step.lower(spec.replace(microbatches=k), state, images, labels, idx, hyper).compile()
  free = memory_plan.free_bytes()
  assert free is not None and free > 0
  k, program = memory_plan.plan_train_step(compile_k, 2, [1, 2, 4], what='t', free=free)
  fp = memory_plan.footprint(program)
  assert fp is not None and fp.temp > 0 and fp.argument > 0
  assert k == 2 and int(program(state, images, labels, idx, hyper)[0].step) == 1
  with pytest.raises(MemoryPlanError, match='microbatch'):
    memory_plan.plan_train_step(compile_k, 1, [1, 2, 4], what='t', free=1000)


def test_eval_plan_chunks_the_attack_and_then_suggests_a_batch_size():
  # Temporaries 1000/k MB at k chunks; 90% of 300 MB fits k = 4, of 600 MB k = 2, of 2 GB k = 1.
  for free, want in ((2_000_000_000, 1), (600_000_000, 2), (300_000_000, 4)):
    k, program = memory_plan.plan_eval_step(_FakeProgram, [1, 2, 4], batch_size=20, what='AR 8', free=free)
    assert (k, program.k) == (want, want), free
  with pytest.raises(MemoryPlanError, match=r'up to 4 chunks fits; lower --config.eval.batch_size \(about 12 would fit\)'):
    memory_plan.plan_eval_step(_FakeProgram, [1, 2, 4], batch_size=20, what='AR 8', free=170_000_000)


def test_microbatches_report_their_progress_to_the_host():
  cfg, spec, state, images, labels = _setup()
  seen = []
  s, m = _step(cfg, spec, state, images, labels, 4, progress=lambda step, i: seen.append((step, i)))
  jax.block_until_ready(m)
  jax.effects_barrier()
  assert sorted(set(seen)) == [(0, 0), (0, 1), (0, 2), (0, 3)]
  seen.clear()
  _step(cfg, spec, s, images, labels, 4)  # no progress callback: nothing is called, nothing fails
  jax.effects_barrier()
  assert not seen
