"""End to end: ``python -m arreg_jax.main`` on smoke configs; kill and resume; bad input fails cleanly."""

import json
import os
import signal
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(workdir, *args, env=None, **kw):
  cmd = [sys.executable, '-m', 'arreg_jax.main', '--workdir', str(workdir), *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})}, **kw)


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_smoke_sweep_end_to_end(tmp_path):
  r = _main(tmp_path, '--config', 'configs/mnist.py:smoke', timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert '[ar0] epoch 2/2' in r.stdout and '[ar0.1] final:' in r.stdout
  summary = json.load(open(tmp_path / 'summary.json'))
  assert [row['strength'] for row in summary['rows']] == [0.0, 0.1]
  for name in ('ar0', 'ar0.1'):
    run = tmp_path / name
    rows = _jsonl(run / 'metrics.jsonl')
    assert [r['epoch'] for r in rows] == [1, 2]
    for key in ('train_loss', 'train_acc', 'test_acc', 'pgd_acc', 'images_per_s'):
      assert key in rows[-1]
    assert sorted(os.listdir(run / 'checkpoints')) == ['1', '2']
    final = json.load(open(run / 'final.json'))
    assert 0 <= final['test']['pgd_acc'] <= 1 and final['train']['count'] == 256
    assert json.load(open(run / 'config.json'))['strength'] == float(name[2:])
  # A finished sweep is skipped when run again.
  r = _main(tmp_path, '--config', 'configs/mnist.py:smoke', timeout=300)
  assert r.returncode == 0 and r.stdout.count('already finished') == 2, r.stdout


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
  args = ['--config', 'configs/mnist.py:smoke', '--config.sweep=(0.1,)', '--config.train.epochs=3']
  no_analysis = '--config.analysis.enabled=False'
  ref = _main(tmp_path / 'ref', *args, no_analysis, timeout=300)
  assert ref.returncode == 0, ref.stderr[-3000:]

  workdir = tmp_path / 'killed'
  cmd = [sys.executable, '-m', 'arreg_jax.main', '--workdir', str(workdir), *args, no_analysis]
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  for line in proc.stdout:
    if 'epoch 1/3' in line:
      proc.send_signal(signal.SIGKILL)
      break
  proc.wait(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  assert not (workdir / 'ar0.1' / 'final.json').exists()

  # Resumed with the analysis switched on: the analysis block does not change training, so the run resumes (any
  # other config difference is refused) and the sweep ends with its report.
  resumed = _main(workdir, *args, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert 'resuming after epoch 1' in resumed.stdout
  assert (workdir / 'report.md').exists() and not (tmp_path / 'ref' / 'report.md').exists()
  (workdir / 'ar0.1' / 'final.json').rename(workdir / 'ar0.1' / 'final.json.bak')
  refused = _main(workdir, *args, '--config.train.learning_rate=0.5', timeout=120)
  assert refused.returncode == 2 and 'differs in: train' in refused.stderr, refused.stderr[-2000:]
  (workdir / 'ar0.1' / 'final.json.bak').rename(workdir / 'ar0.1' / 'final.json')
  a = json.load(open(tmp_path / 'ref' / 'ar0.1' / 'final.json'))
  b = json.load(open(workdir / 'ar0.1' / 'final.json'))
  assert a['row'] == b['row'] and a['train'] == b['train'] and a['test'] == b['test']
  strip = lambda rows: [{k: v for k, v in r.items() if 'time' not in k and 'per_s' not in k} for r in rows]
  assert strip(_jsonl(workdir / 'ar0.1' / 'metrics.jsonl')) == strip(_jsonl(tmp_path / 'ref' / 'ar0.1' /
                                                                           'metrics.jsonl'))


@pytest.mark.parametrize('args,message', [
    (['--config.train.epoch=3'], 'Did you mean "epochs"'),
    (['--config.model.name=resnet57'], 'unknown model'),
    (['--config.data.name=svhn'], 'unknown dataset'),
    (['--config.sweep=(-0.1,)'], 'must be >= 0'),
    (['--config.eval.pgd_eps=-0.5'], 'pgd_eps'),
    (['--config.data.source=files', '--config.data.data_dir=/nonexistent/mnist'], '/nonexistent/mnist'),
    (['--config.train.batch_size=100000'], 'exceeds the 256 training examples'),
])
def test_bad_input_is_one_clear_error(tmp_path, args, message):
  workdir = tmp_path / 'w'
  r = _main(workdir, '--config', 'configs/mnist.py:smoke', *args, timeout=120)
  assert r.returncode == 2
  assert message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]
  assert not workdir.exists()  # nothing half-written


def test_missing_config_file(tmp_path):
  r = _main(tmp_path / 'w', '--config', 'configs/does_not_exist.py', timeout=120)
  assert r.returncode == 2 and 'does_not_exist.py does not exist' in r.stderr and 'Traceback' not in r.stderr


def test_batch_not_divisible_by_devices_uses_fewer_devices(tmp_path):
  # 60 does not split over 8 devices: training uses the 6 that it splits over, and says so; evaluation pads.
  r = _main(tmp_path / 'w', '--config', 'configs/mnist.py:smoke', '--config.train.batch_size=60',
            '--config.sweep=(0.0,)', '--config.train.epochs=1', '--config.analysis.enabled=False', timeout=300,
            env={'XLA_FLAGS': '--xla_force_host_platform_device_count=8'})
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'splits evenly over 6 of the 8 devices' in r.stderr and '6 of 8 device(s)' in r.stderr, r.stderr[-3000:]
  assert (tmp_path / 'w' / 'ar0' / 'final.json').exists()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  # A learning rate of 1e6 makes the loss overflow in the second epoch (after a ramped first one)
  args = ['--config', 'configs/mnist.py:smoke', '--config.sweep=(0.0,)', '--config.train.epochs=3',
          '--config.train.lr_boundaries=()', '--config.train.learning_rate=1e30']
  r = _main(tmp_path, *args, timeout=300)
  assert r.returncode == 2, r.stdout + r.stderr[-2000:]
  assert 'training loss became' in r.stderr and 'Traceback' not in r.stderr
  run = tmp_path / 'ar0'
  assert not (run / 'final.json').exists()
  epochs = sorted(int(e) for e in os.listdir(run / 'checkpoints') if e.isdigit())
  rows = _jsonl(run / 'metrics.jsonl') if (run / 'metrics.jsonl').exists() else []
  assert [r['epoch'] for r in rows] == epochs  # no metrics line or checkpoint for the diverged epoch
  for row in rows:
    assert row['train_loss'] == row['train_loss']  # finite, not NaN
