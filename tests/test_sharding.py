"""Data parallelism on 8 (fake CPU) devices matches 1 device: a few train steps and an evaluation."""

import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, ml_collections
    import functools
    from arreg_jax import configuration, models, sharding
    from arreg_jax.training import eval_step, state as state_lib, step as step_lib
    assert jax.device_count() == 8, jax.devices()
    cfg = configuration.base_config()
    cfg.attack.steps = 3
    module = models.get_module('resnet20', num_classes=10)
    _, variables = models.create('resnet20', num_classes=10, key=jax.random.key(0))
    # Non-zero classifier so the Fixup network's gradients reach every layer from the first step.
    variables['params']['head']['kernel'] = 0.1 * jax.random.normal(jax.random.key(5), (64, 10))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    labels = (np.arange(64) % 10).astype(np.int32)
    results = {}
    for n in (1, 8):
      mesh = sharding.make_mesh(jax.devices()[:n])
      rep = sharding.replicated(mesh)
      spec = step_lib.step_spec(cfg, module=module, adversarial=True, augment='cifar', steps_per_epoch=4,
                                batch_sharding=sharding.batch_sharding(mesh))
      state = jax.device_put(state_lib.init_state(jax.tree.map(jnp.copy, variables), spec.optimizer), rep)  # donated
      step = functools.partial(jax.jit(step_lib.train_step, static_argnums=0, donate_argnums=1), spec)
      hyper = step_lib.step_hyper(cfg, 8.0, jax.random.key(1))
      x, y = jax.device_put(images, rep), jax.device_put(labels, rep)
      for i in range(3):
        state, m = step(state, x, y, np.arange(16 * i, 16 * i + 16, dtype=np.int32), hyper)
      pgd = ml_collections.ConfigDict({'eps': 8 / 255, 'step_size': 2 / 255, 'steps': 3})
      ev = eval_step.make_eval_step(module, augment_kind='cifar', pgd_cfg=pgd)
      out = eval_step.evaluate(ev, state.variables(), x, y, batch_size=32, key=jax.random.key(2))
      results[n] = (state.params, out, float(m['loss_sum']))
    (p1, e1, l1), (p8, e8, l8) = results[1], results[8]
    np.testing.assert_allclose(l1, l8, rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
      np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
    for k in ('loss', 'acc', 'pgd_acc'):
      np.testing.assert_allclose(e1[k], e8[k], rtol=1e-3, atol=1e-6)
    print('OK', l1, l8, e1, e8)
''')


def test_eight_devices_match_one():
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8'}
  r = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0 and 'OK' in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
