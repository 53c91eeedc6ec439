"""One compilation per sweep: members that differ in ε (and λ, β, keys) share their compiled programs, through
``jax.jit``'s own cache of the static step spec."""

import collections
import json

import jax
import pytest

from arreg_jax import configuration, models, rundir, sharding, sweep
from arreg_jax.training import eval_step, loop, setup
from arreg_jax.training import step as step_lib

COMPILE = '/jax/core/compile/backend_compile_duration'


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


def _spec(cfg, strength):
  module = models.get_module(cfg.model.name, num_classes=10)
  return step_lib.step_spec(cfg, module=module, adversarial=step_lib.is_adversarial(cfg, strength), augment='none',
                            steps_per_epoch=4, batch_sharding=sharding.batch_sharding(sharding.make_mesh()))


def test_the_static_spec_ignores_only_the_traced_values():
  cfg = _config()
  assert _spec(cfg, 2.0) == _spec(cfg, 4.0) and hash(_spec(cfg, 2.0)) == hash(_spec(cfg, 4.0))  # ε is traced
  assert _spec(cfg, 0.0) != _spec(cfg, 2.0)  # no attack at all
  other_seed = cfg.copy_and_resolve_references()
  other_seed.seed = 7
  assert _spec(other_seed, 2.0) == _spec(cfg, 2.0)  # keys are traced
  for path, value in (('model.name', 'small_cnn'), ('attack.steps', 3), ('attack.kind', 'fgsm'),
                      ('train.learning_rate', 0.3), ('train.microbatches', 2)):
    c = cfg.copy_and_resolve_references()
    block, field = path.split('.')
    c[block][field] = value
    assert _spec(c, 2.0) != _spec(cfg, 2.0), path
  a, b, off = (cfg.copy_and_resolve_references() for _ in range(3))
  a.regularizer.margin_lambda, b.regularizer.margin_lambda = 0.5, 1.0
  assert _spec(a, 2.0) == _spec(b, 2.0) != _spec(off, 2.0)  # λ traced; whether the term is on is not
  # The evaluation attack is the evaluation step's: a different ε there compiles another evaluation program.
  other_eval = cfg.copy_and_resolve_references()
  other_eval.eval.pgd_eps = 0.1
  assert eval_step.pgd_spec(other_eval) != eval_step.pgd_spec(cfg)


def test_step_hyper_values():
  cfg = _config()
  cfg.attack.strength_unit = 0.5
  cfg.regularizer.margin_lambda, cfg.regularizer.ortho_beta = 0.25, 1e-3
  h = step_lib.step_hyper(cfg, 3.0, jax.random.key(0))
  assert (float(h.eps), float(h.margin_lambda), float(h.ortho_beta)) == pytest.approx((1.5, 0.25, 1e-3))
  assert step_lib.is_adversarial(cfg, 3.0) and not step_lib.is_adversarial(cfg, 0.0)
  cfg.attack.kind = 'none'
  assert not step_lib.is_adversarial(cfg, 3.0)


def test_a_sweep_compiles_each_program_once_and_members_train_as_alone(tmp_path, monkeypatch):
  compiles = collections.Counter()  # function name -> backend compilations
  listener = lambda event, _, fun_name='', **__: compiles.update([fun_name]) if event == COMPILE else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  marks = {}
  train_member = loop.train_member

  def counted(config, member, *a, **kw):
    before = collections.Counter(compiles)
    out = train_member(config, member, *a, **kw)
    marks[member.name] = compiles - before
    return out

  monkeypatch.setattr(loop, 'train_member', counted)
  try:
    loop.train_sweep(setup.setup_sweep(_config(), str(tmp_path / 'sweep')))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  # Standard training and the first adversarial member each compile their training program once: the program the
  # memory plan compiled ahead of time is the one then called. AR 4 runs the programs compiled for AR 2.
  for name in ('ar0', 'ar2'):
    assert marks[name]['jit(train_steps)'] == 1, (name, marks[name])
  # Evaluation: PGD on the test set (planned ahead, then called), clean on the test set and on the training set;
  # they do not depend on the training attack, so the adversarial members reuse standard training's.
  assert marks['ar0']['jit(eval_batch)'] == 3 and marks['ar2']['jit(eval_batch)'] == 0, marks
  assert not marks['ar4'], f'the third member compiled something: {marks["ar4"]}'

  loop.train_sweep(setup.setup_sweep(_config((4.0,)), str(tmp_path / 'alone')))
  shared = rundir.read_json(str(tmp_path / 'sweep' / 'ar4' / rundir.FINAL))
  alone = rundir.read_json(str(tmp_path / 'alone' / 'ar4' / rundir.FINAL))
  assert json.dumps(shared['row'], sort_keys=True) == json.dumps(alone['row'], sort_keys=True)
  metrics = lambda d: [json.loads(l) for l in open(d / 'ar4' / rundir.METRICS)]
  strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith('_s') and k != 'images_per_s'} for r in rows]
  assert strip(metrics(tmp_path / 'sweep')) == strip(metrics(tmp_path / 'alone'))
  assert [m.name for m in sweep.members(_config())] == ['ar0', 'ar2', 'ar4']
