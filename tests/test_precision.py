"""precision='bfloat16': compute in bf16 with float32 parameters, optimizer state and loss; still learns, and
attacks on the bf16 model stay inside their ε-ball."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import functools

from arreg_jax import attacks, configuration, models, sharding
from arreg_jax.training import state as state_lib, step as step_lib


@pytest.mark.slow  # 32 s: three adversarial epochs
def test_bfloat16_training_learns_and_attacks_stay_in_ball(mnist_small):
  cfg = configuration.base_config()
  cfg.precision = 'bfloat16'
  cfg.attack.strength_unit, cfg.attack.step_size, cfg.attack.step_size_rel = 1.0, None, 0.25
  ds = mnist_small
  module = models.get_module('small_cnn', num_classes=10, dtype=models.compute_dtype(cfg.precision))
  _, variables = models.create('small_cnn', num_classes=10, key=jax.random.key(0))
  steps = ds.num_train // 128
  mesh = sharding.make_mesh()
  spec = step_lib.step_spec(cfg, module=module, adversarial=True, augment='none', steps_per_epoch=steps,
                            batch_sharding=sharding.batch_sharding(mesh), steps_per_call=steps)
  state = jax.device_put(state_lib.init_state(variables, spec.optimizer), sharding.replicated(mesh))
  multi = functools.partial(step_lib.train_steps, spec)
  hyper = step_lib.step_hyper(cfg, 0.1, jax.random.key(1))
  images, labels = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
  for epoch in range(3):
    perm = jnp.asarray(np.random.default_rng(epoch).permutation(ds.num_train), jnp.int32)
    state, _ = multi(state, images, labels, perm, hyper)
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32)
  x = jnp.asarray(ds.test_images, jnp.float32) / 255
  y = jnp.asarray(ds.test_labels)
  logits_fn = lambda z: module.apply(state.variables(), z)
  assert logits_fn(x[:2]).dtype == jnp.float32
  acc = float(jnp.mean(jnp.argmax(logits_fn(x), -1) == y))
  assert acc > 0.85, acc  # three adversarial epochs (ε = 0.1) on 4k digits; float32 reaches ≈ 0.9
  adv = attacks.pgd(logits_fn, x[:128], y[:128], jax.random.key(2), eps=0.1, step_size=0.025, steps=10)
  assert adv.dtype == jnp.float32
  assert float(jnp.max(jnp.abs(adv - x[:128]))) <= 0.1 + 1e-6
  assert float(jnp.mean(jnp.argmax(logits_fn(adv), -1) == y[:128])) < acc
