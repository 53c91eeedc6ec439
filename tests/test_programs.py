"""One compilation per sweep: members that differ in ε (and λ, β, keys) share their compiled programs."""

import json

import jax
import pytest

from arreg_jax import configuration, programs, rundir, sweep, train, trainer


def _config(sweep_strengths=(0.0, 2.0, 4.0)):
  cfg = configuration.base_config()
  cfg.model.name = 'mlp'
  cfg.data.train_size, cfg.data.test_size = 256, 128
  cfg.train.epochs, cfg.train.batch_size = 2, 64
  cfg.attack.steps = 2
  cfg.sweep = sweep_strengths
  cfg.eval.batch_size = 64
  cfg.eval.pgd_examples_per_epoch = 64
  cfg.analysis.enabled = False
  return cfg


def test_program_key_ignores_only_the_traced_values():
  cfg = _config()
  key = lambda c, s: train.program_key(c, s)
  assert key(cfg, 2.0) == key(cfg, 4.0)  # ε is traced
  assert key(cfg, 0.0) != key(cfg, 2.0)  # no attack at all
  other_seed = cfg.copy_and_resolve_references()
  other_seed.seed = 7
  assert key(other_seed, 2.0) == key(cfg, 2.0)  # keys are traced
  for path, value in (('model.name', 'small_cnn'), ('attack.steps', 3), ('attack.kind', 'fgsm'),
                      ('train.learning_rate', 0.3), ('eval.pgd_eps', 0.1), ('train.microbatches', 2)):
    c = cfg.copy_and_resolve_references()
    block, field = path.split('.')
    c[block][field] = value
    assert key(c, 2.0) != key(cfg, 2.0), path
  a, b, off = (cfg.copy_and_resolve_references() for _ in range(3))
  a.regularizer.margin_lambda, b.regularizer.margin_lambda = 0.5, 1.0
  assert key(a, 2.0) == key(b, 2.0) != key(off, 2.0)  # λ traced; whether the term is on is not


def test_step_hyper_values():
  cfg = _config()
  cfg.attack.strength_unit = 0.5
  cfg.regularizer.margin_lambda, cfg.regularizer.ortho_beta = 0.25, 1e-3
  h = train.step_hyper(cfg, 3.0, jax.random.key(0))
  assert (float(h.eps), float(h.margin_lambda), float(h.ortho_beta)) == pytest.approx((1.5, 0.25, 1e-3))
  assert train.is_adversarial(cfg, 3.0) and not train.is_adversarial(cfg, 0.0)
  cfg.attack.kind = 'none'
  assert not train.is_adversarial(cfg, 3.0)


def test_a_sweep_compiles_each_program_once_and_members_train_as_alone(tmp_path, monkeypatch):
  built = []
  build = programs.build
  monkeypatch.setattr(programs, 'build', lambda config, strength, *a, **kw: built.append(strength) or
                      build(config, strength, *a, **kw))
  compiles = []
  listener = lambda event, *_, **__: (compiles.append(event) if event == '/jax/core/compile/backend_compile_duration'
                                      else None)
  jax.monitoring.register_event_duration_secs_listener(listener)
  marks = {}
  train_member = trainer.train_member

  def counted(config, member, *a, **kw):
    out = train_member(config, member, *a, **kw)
    marks[member.name] = len(compiles)
    return out

  monkeypatch.setattr(trainer, 'train_member', counted)
  try:
    trainer.train_sweep(_config(), str(tmp_path / 'sweep'))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert built == [0.0, 2.0]  # AR 4 runs the programs compiled for AR 2
  assert marks['ar4'] == marks['ar2'], 'the third member compiled something'

  trainer.train_sweep(_config((4.0,)), str(tmp_path / 'alone'))
  shared = rundir.read_json(str(tmp_path / 'sweep' / 'ar4' / rundir.FINAL))
  alone = rundir.read_json(str(tmp_path / 'alone' / 'ar4' / rundir.FINAL))
  assert json.dumps(shared['row'], sort_keys=True) == json.dumps(alone['row'], sort_keys=True)
  metrics = lambda d: [json.loads(l) for l in open(d / 'ar4' / rundir.METRICS)]
  strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith('_s') and k != 'images_per_s'} for r in rows]
  assert strip(metrics(tmp_path / 'sweep')) == strip(metrics(tmp_path / 'alone'))
  assert [m.name for m in sweep.members(_config())] == ['ar0', 'ar2', 'ar4']
