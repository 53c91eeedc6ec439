"""Shared fixtures: a small CNN trained briefly on the embedded MNIST subset, and the shared-data location."""

import os

# As arreg_jax.main does: scipy's OpenBLAS threads (jaxlib's CPU LAPACK) oversubscribe XLA's cores.
os.environ.setdefault('OPENBLAS_NUM_THREADS', '1')

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arreg_jax import configuration, models, sharding
from arreg_jax.data import get_dataset
from arreg_jax.training import state as state_lib, step as step_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def mnist_small():
  cfg = configuration.base_config()
  cfg.data.train_size = 4096
  cfg.data.test_size = 512
  return get_dataset(cfg.data)


@pytest.fixture(scope='session')
def trained_cnn(mnist_small):
  """(logits_fn, test images in [0, 1], test labels): a small CNN after two clean epochs on 4k MNIST digits."""
  cfg = configuration.base_config()
  cfg.attack.kind = 'none'
  ds = mnist_small
  module = models.get_module('small_cnn', num_classes=10)
  _, variables = models.create('small_cnn', num_classes=10, key=jax.random.key(0))
  steps = ds.num_train // 128
  mesh = sharding.make_mesh()
  spec = step_lib.step_spec(cfg, module=module, adversarial=False, augment='none', steps_per_epoch=steps,
                            batch_sharding=sharding.batch_sharding(mesh))
  state = state_lib.init_state(variables, spec.optimizer)
  step = jax.jit(lambda *a: step_lib.train_step(spec, *a), donate_argnums=(0,))
  hyper = step_lib.step_hyper(cfg, 0.0, jax.random.key(1))
  images, labels = jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels)
  for epoch in range(2):
    perm = np.random.default_rng(epoch).permutation(ds.num_train).astype(np.int32)
    for i in range(steps):
      state, _ = step(state, images, labels, perm[i * 128:(i + 1) * 128], hyper)
  variables = state.variables()
  logits_fn = jax.jit(lambda x: module.apply(variables, x))
  x = jnp.asarray(ds.test_images, jnp.float32) / 255.0
  return logits_fn, x, jnp.asarray(ds.test_labels)
