"""Nothing lost, nothing silently wrong: damaged checkpoints and result files, results reused under another config,
failed writes, Ctrl-C, and a table of bad inputs that must each give one clear line, exit status 2 (130 for Ctrl-C),
and leave an existing workdir as it was."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading

import pytest

from arreg_jax.data import tiny_imagenet
from arreg_jax.errors import ConfigError
from arreg_jax.training import checkpoints

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ['--config', 'configs/mnist.py:smoke', '--config.sweep=(0.1,)', '--config.train.epochs=3',
        '--config.analysis.enabled=False']


def _main(workdir, *args, fsize_limit=False, timeout=300, module='arreg_jax.main'):
  cmd = [sys.executable, '-m', module, '--workdir', str(workdir), *args]
  if fsize_limit:  # a full disk: RLIMIT_FSIZE of 4 KiB (it holds for root too), set by the shell, not by a fork
    cmd = ['bash', '-c', 'ulimit -f 4 && exec "$@"', 'bash', *cmd]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _tree(root) -> dict[str, str]:
  """path → sha256 of every file under ``root`` (the workdir's exact state)."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      with open(p, 'rb') as fh:
        out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
  return out


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """A finished one-member sweep (3 epochs, checkpoints 1–3 kept) to copy from."""
  w = tmp_path_factory.mktemp('ref') / 'w'
  r = _main(w, *ARGS)
  assert r.returncode == 0, r.stderr[-3000:]
  return w


def _copy(finished, tmp_path, unfinish=False):
  w = tmp_path / 'w'
  shutil.copytree(finished, w)
  if unfinish:
    (w / 'ar0.1' / 'final.json').unlink()
  return w


def _one_clear_line(r):
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert 'Traceback' not in r.stderr, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith('error: ')]
  assert len(errors) == 1, r.stderr[-3000:]
  return errors[0]


@pytest.mark.slow
@pytest.mark.parametrize('damage', ['truncate', 'delete'])
def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(finished, tmp_path, damage):
  w = _copy(finished, tmp_path, unfinish=True)
  ckpt3 = w / 'ar0.1' / 'checkpoints' / '3'
  files = sorted(p for p in ckpt3.rglob('*') if p.is_file())
  if damage == 'truncate':  # a disk fault: every file of the newest checkpoint cut to 16 bytes
    for p in files:
      p.write_bytes(p.read_bytes()[:16])
  else:  # one data file gone
    next(p for p in files if '/d/' in str(p)).unlink()
  r = _main(w, *ARGS)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'checkpoint of epoch 3' in r.stdout and 'damaged' in r.stdout and 'resuming after epoch 2' in r.stdout
  assert (w / 'ar0.1' / 'checkpoints_damaged' / '3').is_dir()  # moved aside, never deleted
  ref = json.load(open(finished / 'ar0.1' / 'final.json'))
  got = json.load(open(w / 'ar0.1' / 'final.json'))
  assert got['row'] == ref['row']  # retrained from epoch 2: the same result as the uninterrupted run


@pytest.mark.slow
def test_no_intact_checkpoint_is_one_clear_error(finished, tmp_path):
  w = _copy(finished, tmp_path, unfinish=True)
  for p in (w / 'ar0.1' / 'checkpoints').rglob('*'):
    if p.is_file():
      p.write_bytes(b'')
  line = _one_clear_line(_main(w, *ARGS))
  assert 'no intact checkpoint in' in line and 'checkpoints' in line


@pytest.mark.slow
def test_a_stale_partial_checkpoint_write_is_ignored(finished, tmp_path):
  """A SIGKILL during a checkpoint write leaves orbax's temporary directory behind: the run resumes past it."""
  w = _copy(finished, tmp_path, unfinish=True)
  ck = w / 'ar0.1' / 'checkpoints'
  shutil.copytree(ck / '3', ck / '4.orbax-checkpoint-tmp-1234')
  shutil.rmtree(ck / '3')
  r = _main(w, *ARGS)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resuming after epoch 2' in r.stdout
  assert json.load(open(w / 'ar0.1' / 'final.json'))['row'] == json.load(open(finished / 'ar0.1' / 'final.json'))['row']


@pytest.mark.slow
def test_a_full_disk_during_training_leaves_every_previous_file_intact(finished, tmp_path):
  """A run killed after its checkpoint of epoch 2 resumes on a full disk: the checkpoint of epoch 3 cannot be
  written. One line says so; every file of the workdir is as it was (metrics.jsonl rolled back to epoch 2)."""
  w = _copy(finished, tmp_path, unfinish=True)
  shutil.rmtree(w / 'ar0.1' / 'checkpoints' / '3')
  metrics = w / 'ar0.1' / 'metrics.jsonl'
  metrics.write_text(''.join(metrics.read_text().splitlines(keepends=True)[:2]))
  before = _tree(w)
  line = _one_clear_line(_main(w, *ARGS, fsize_limit=True))
  assert 'could not write the checkpoint of epoch 3' in line and 'intact' in line, line
  after = _tree(w)
  assert {k: v for k, v in after.items() if k in before} == before  # nothing earlier changed
  new = [k for k in after if k not in before and 'orbax-checkpoint-tmp' not in k and 'tensorboard' not in k]
  assert not new, new


@pytest.mark.slow
def test_a_full_disk_during_the_analysis_leaves_every_previous_file_intact(finished, tmp_path):
  w = _copy(finished, tmp_path)
  before = _tree(w)
  line = _one_clear_line(_main(w, fsize_limit=True, module='arreg_jax.analyze'))
  assert 'could not write' in line and 'per_example.npz' in line, line
  assert _tree(w) == before


BAD_INPUTS = [
    # (name, extra args, text the one error line must contain)
    ('misspelt key', ['--config.train.epoch=3'], 'Did you mean "epochs"'),
    ('unknown model', ['--config.model.name=resnet57'], 'unknown model'),
    ('unknown dataset', ['--config.data.name=svhn'], 'unknown dataset'),
    ('negative AR strength', ['--config.sweep=(-0.1,)'], 'must be >= 0'),
    ('negative ε', ['--config.eval.pgd_eps=-0.5'], 'pgd_eps'),
    # Against an existing sweep, a changed data source or batch is refused before any data is read.
    ('other data', ['--config.data.source=files', '--config.data.data_dir=/nonexistent/mnist'],
     'differs in: data.data_dir, data.source'),
    ('other batch size', ['--config.train.batch_size=100000'], 'differs in: train.batch_size'),
    ('a required value set to None', ['--config.train.epochs=None'], 'cannot be None'),
    ('an unknown key set to None', ['--config.train.epoch=None'], 'Did you mean "epochs"'),
    ('changed training config', ['--config.train.learning_rate=0.3'], 'differs in: train.learning_rate'),
    ('changed model', ['--config.model.name=mlp'], 'differs in: model.name'),
    ('stray positional argument', ['extra'], 'unexpected arguments: extra'),
    ('bad analysis setting', ['--config.analysis.bins=1'], 'analysis.bins'),
]


@pytest.mark.slow
@pytest.mark.parametrize('name,extra,message', BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_against_an_existing_workdir(finished, tmp_path, name, extra, message):
  w = _copy(finished, tmp_path)
  before = _tree(w)
  base = [a for a in ARGS if not a.startswith('--config.analysis')]
  line = _one_clear_line(_main(w, *base, '--config.analysis.enabled=False', *extra, timeout=120))
  assert message in line, (name, line)
  assert _tree(w) == before, name


@pytest.mark.parametrize('case', ['syntax error', 'workdir is a file', 'missing config file'])
def test_inputs_that_fail_before_the_config_loads(tmp_path, case):
  if case == 'syntax error':
    bad = tmp_path / 'bad.py'
    bad.write_text('def get_config(arg=None):\n  return (\n')
    r, want = _main(tmp_path / 'w', '--config', str(bad), timeout=120), 'syntax error'
  elif case == 'workdir is a file':
    f = tmp_path / 'file'
    f.write_text('x')
    r, want = _main(f, '--config', 'configs/mnist.py:smoke', timeout=120), 'is an existing file'
    assert f.read_text() == 'x'
  else:
    r, want = _main(tmp_path / 'w', '--config', 'configs/does_not_exist.py', timeout=120), 'does not exist'
  line = _one_clear_line(r)
  assert want in line, line
  assert not (tmp_path / 'w').exists()


def test_an_optional_value_can_be_set_back_to_none(tmp_path):
  r = _main(tmp_path / 'w', '--config', 'configs/mnist.py:smoke', '--config.sweep=(0.0,)', '--config.train.epochs=1',
            '--config.analysis.enabled=False', '--config.eval.pgd_examples_per_epoch=None', timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  cfg = json.load(open(tmp_path / 'w' / 'ar0' / 'config.json'))
  assert cfg['eval']['pgd_examples_per_epoch'] is None
  rows = [json.loads(line) for line in open(tmp_path / 'w' / 'ar0' / 'metrics.jsonl')]
  assert rows[-1]['pgd_examples'] == 128  # the whole smoke test set


# Every way a run ends is the entry point's: damaged files, requests the data cannot meet, impossible values, Ctrl-C.

def test_analyze_on_a_truncated_final_json_is_one_clear_line(tmp_path):
  """A sweep whose run's final.json was cut short: one line naming the file and what to do, nothing changed."""
  w = tmp_path / 'w'
  for name, final in (('ar0', '{"row": {"strength": 0.0}}\n'), ('ar0.1', '{"row": {"stren')):
    (w / name).mkdir(parents=True)
    (w / name / 'config.json').write_text(json.dumps({'strength': float(name[2:])}))
    (w / name / 'final.json').write_text(final)
  before = _tree(w)
  line = _one_clear_line(_main(w, module='arreg_jax.analyze', timeout=120))
  assert f'{w / "ar0.1" / "final.json"} is damaged' in line and 'delete it and run the training command' in line, line
  assert _tree(w) == before


def test_a_corrupt_sweep_config_json_is_one_clear_line(tmp_path):
  w = tmp_path / 'w'
  w.mkdir()
  (w / 'config.json').write_text('{"seed": 0, "train": {')
  before = _tree(w)
  line = _one_clear_line(_main(w, '--config', 'configs/mnist.py:smoke', timeout=120))
  assert f'{w / "config.json"} is damaged' in line and 'delete it' in line, line
  assert _tree(w) == before


def test_more_tiny_imagenet_classes_than_the_copy_holds_is_an_error(tmp_path):
  from test_data import _make_tiny  # pylint: disable=g-import-not-at-top
  _make_tiny(tmp_path / 'data')  # 4 wnids, training images for 3 of them
  with pytest.raises(ConfigError, match=r'classes=4, but .* only 3 of the first 4 classes'):
    tiny_imagenet.load_files(str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache'), classes=4)
  assert tiny_imagenet.load_files(str(tmp_path / 'data'), cache_dir=str(tmp_path / 'cache'), classes=2).num_classes == 2
  line = _one_clear_line(_main(tmp_path / 'w', '--config', 'configs/tiny_imagenet.py:smoke',
                               f'--config.data.data_dir={tmp_path / "data"}', '--config.data.classes=4',
                               f'--config.data.cache_dir={tmp_path / "cache"}', timeout=120))
  assert 'only 3 of the first 4 classes' in line, line
  assert not (tmp_path / 'w').exists()


@pytest.mark.parametrize('args,message', [
    (['--config.logging.progress_every_s=-1.0'], 'config.logging.progress_every_s must be >= 0, got -1.0'),
    (['--config.attack.step_size=-0.1'], 'config.attack.step_size must be None or > 0, got -0.1'),
    (['--config.attack.step_size_rel=0.0'], 'config.attack.step_size_rel must be None or > 0, got 0.0'),
])
def test_impossible_values_name_the_rule(tmp_path, args, message):
  line = _one_clear_line(_main(tmp_path / 'w', '--config', 'configs/mnist.py:smoke', *args, timeout=120))
  assert message in line, line
  assert not (tmp_path / 'w').exists()


@pytest.mark.slow
def test_ctrl_c_during_training_is_one_line_and_the_resume_is_exact(finished, tmp_path):
  w = tmp_path / 'w'
  proc = subprocess.Popen([sys.executable, '-m', 'arreg_jax.main', '--workdir', str(w), *ARGS], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stdout:
    if 'epoch 1/3' in line:
      proc.send_signal(signal.SIGINT)
      break
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, (proc.returncode, err[-3000:])
  assert 'Traceback' not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.startswith('interrupted: ')]
  assert len(lines) == 1 and 'run the same command again' in lines[0], err[-3000:]
  r = _main(w, *ARGS)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'resuming after epoch' in r.stdout
  assert json.load(open(w / 'ar0.1' / 'final.json'))['row'] == json.load(open(finished / 'ar0.1' / 'final.json'))['row']


def test_checkpoint_writer_hooks_are_restored_even_after_a_failed_save():
  """The hooks that turn orbax's writer-thread errors into log lines are installed around a save only."""
  saved = (sys.excepthook, sys.unraisablehook, threading.excepthook)
  with pytest.raises(OSError, match='No space left'):
    with checkpoints.writer_errors_logged():
      assert sys.excepthook is not saved[0] and threading.excepthook is not saved[2]
      raise OSError(28, 'No space left on device')
  assert (sys.excepthook, sys.unraisablehook, threading.excepthook) == saved
