"""Spectral clipping inside training (config.spectral): every layer of the trained model ends clipped, and a
two-dimensional sweep (AR × clip threshold) names its runs by both."""

import os

import numpy as np

from arreg_jax import configuration, presets, spectral
from arreg_jax.training import checkpoints as restore, loop, setup


def _config(**spectral_kw):
  c = presets.smoke(configuration.base_config())
  c.attack.strength_unit, c.attack.step_size, c.attack.step_size_rel = 1.0, None, 0.25
  c.eval.pgd_eps, c.eval.pgd_step_size = 0.1, 0.025
  c.train.epochs = 1
  c.sweep = (0.1,)
  for k, v in spectral_kw.items():
    c.spectral[k] = v
  return c


def test_clipping_every_epoch_bounds_every_layer(tmp_path):
  c = _config(clip_to=1.0, rounds=10)
  loop.train_sweep(setup.setup_sweep(c, str(tmp_path)))
  config, module, variables, ds, _ = restore.restore_run(str(tmp_path / 'ar0.1'))
  assert config.spectral.clip_to == 1.0
  layers = spectral.layer_singular_values(module, variables, (1, *ds.image_shape), train=False)
  assert [l.kind for l in layers] == ['conv', 'conv', 'dense', 'dense']
  for layer in layers:
    top = float(layer.singular_values.max())
    # Dense layers are clipped exactly; convs after 10 project-and-clip rounds to within a few percent.
    assert top <= (1.0 + 1e-4 if layer.kind == 'dense' else 1.1), (layer.name, top)


def test_two_dimensional_sweep_names_runs_by_both(tmp_path):
  c = _config(sweep=(2.0, None))
  summary = loop.train_sweep(setup.setup_sweep(c, str(tmp_path)))
  assert sorted(d for d in os.listdir(tmp_path) if d.startswith('ar')) == ['ar0.1_sp2', 'ar0.1_spnone']
  assert [(r['strength'], r['clip_to']) for r in summary['rows']] == [(0.1, 2.0), (0.1, None)]
  config, _, _, _, _ = restore.restore_run(str(tmp_path / 'ar0.1_sp2'))
  assert config.spectral.clip_to == 2.0 and tuple(config.spectral.sweep) == ()
  unclipped = restore.restore_run(str(tmp_path / 'ar0.1_spnone'))
  layers = spectral.layer_singular_values(unclipped[1], unclipped[2], (1, 28, 28, 1), train=False)
  assert max(float(l.singular_values.max()) for l in layers) > 2.0  # the control run is not clipped
  assert np.isfinite(summary['rows'][0]['test_acc'])
