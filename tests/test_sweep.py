"""What a sweep is: members in order, their configs, run names and parsing them back, runs found on disk."""

import json

from arreg_jax import configuration, rundir, sweep


def test_members_are_ar_major_with_names_and_configs():
  c = configuration.base_config()
  c.sweep = (4, 8)
  c.spectral.sweep = (1.0, None)
  ms = sweep.members(c)
  assert [m.name for m in ms] == ['ar4_sp1', 'ar4_spnone', 'ar8_sp1', 'ar8_spnone']
  mc = sweep.member_config(c, ms[0])
  assert mc.spectral.clip_to == 1.0 and tuple(mc.spectral.sweep) == ()
  assert c.spectral.clip_to is None  # the sweep's own config is untouched
  d = sweep.member_config_dict(c, ms[3])
  assert d['strength'] == 8.0 and d['spectral']['clip_to'] is None


def test_regularizer_dimension():
  c = configuration.base_config()
  c.sweep = (0,)
  c.regularizer.sweep = ((0.0, 0.0), (0.5, 1e-3))
  ms = sweep.members(c)
  assert [m.name for m in ms] == ['ar0_ml0_ob0', 'ar0_ml0.5_ob0.001']
  mc = sweep.member_config(c, ms[1])
  assert (mc.regularizer.margin_lambda, mc.regularizer.ortho_beta) == (0.5, 1e-3) and not mc.regularizer.sweep


def test_run_names_parse_back():
  for s, c, r, clip_sweep in ((4.0, None, None, False), (0.1, 3.0, None, True), (8.0, None, None, True),
                              (0.0, None, (0.5, 0.001), False), (16.0, 1.0, (0.1, 0.0), True)):
    name = sweep.run_name(s, c, clip_sweep=clip_sweep, regularizer=r)
    assert sweep.parse_run_name(name) == (s, c, r), name
  assert sweep.parse_run_name('figures') is None and sweep.parse_run_name('arx') is None


def test_find_runs_reads_configs_not_names(tmp_path):
  for name, cfg in (('b', {'strength': 8, 'spectral': {'clip_to': None}}), ('a', {'strength': 4}),
                    ('c', {'strength': 4, 'spectral': {'clip_to': 1.0}, 'regularizer': {'margin_lambda': 0.5}}),
                    ('not_a_run', {'seed': 0})):
    (tmp_path / name).mkdir()
    (tmp_path / name / rundir.CONFIG).write_text(json.dumps(cfg))
  (tmp_path / 'b' / rundir.FINAL).write_text('{}')
  runs = sweep.find_runs(str(tmp_path))
  assert [(r.name, r.strength, r.clip, r.regularized, r.finished) for r in runs] == [
      ('c', 4.0, 1.0, True, False), ('a', 4.0, None, False, False), ('b', 8.0, None, False, True)]


def test_saved_configs_are_compared_outside_the_non_training_blocks():
  from arreg_jax import config_json  # pylint: disable=g-import-not-at-top
  now = config_json.to_dict(configuration.base_config())
  old = json.loads(json.dumps(now))
  del old['train']['microbatches'], old['logging']  # saved by a version without these keys
  old['analysis']['bins'] = 7
  old['eval']['robustness']['examples'] = 5
  assert configuration.training_differences(old, now) == []
  old['train']['learning_rate'] = 0.3
  old['eval']['pgd_eps'] = 0.1
  assert configuration.training_differences(old, now) == ['eval.pgd_eps', 'train.learning_rate']
