"""Every config in configs/ in its ``:smoke`` version, end to end through ``python -m arreg_jax.main`` (train →
analyse with the robustness evaluation → report), then ``python -m arreg_jax.evaluate`` on the sweep it made: no
config may crash — two-class models included (poster 004's logistic regression: AutoAttack without its DLR stage).
CIFAR data are written by the test in the upstream formats; Tiny-ImageNet comes from ../shared/data where present.
Slow (≈ 15 configs × 1 minute on 2 CPU cores): ``python -m pytest -m slow tests/test_every_config.py``."""

import json
import pathlib
import subprocess
import sys

import pytest

from test_data import _make_cifar100_py, _make_cifar10_py, _shared_data

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIGS = sorted(p.name for p in (REPO / 'configs').glob('*.py'))
pytestmark = pytest.mark.slow


def _data_args(config: str, tmp_path: pathlib.Path) -> list[str]:
  if 'cifar100' in config:
    _make_cifar100_py(tmp_path / 'data' / 'cifar-100-python', n_train=300, n_test=128)
  elif 'cifar10' in config:
    _make_cifar10_py(tmp_path / 'data' / 'cifar-10-batches-py', per_batch=60, n_test=128)
  elif 'tiny_imagenet' in config:
    root = _shared_data()
    if root is None or not (root / 'tiny-imagenet-200' / 'wnids.txt').is_file():
      pytest.skip('shared tiny-imagenet-200 not present (set ARREG_SHARED_DATA or provide ../shared/data)')
    return [f'--config.data.data_dir={root}']
  else:
    return []
  return [f'--config.data.data_dir={tmp_path / "data"}']


def test_every_config_is_listed():
  assert 'margin_mnist_logreg.py' in CONFIGS and 'mnist.py' in CONFIGS and len(CONFIGS) >= 15


@pytest.mark.parametrize('config', CONFIGS)
def test_config_smoke_end_to_end(config, tmp_path):
  work = tmp_path / 'w'
  cmd = [sys.executable, '-m', 'arreg_jax.main', '--config', f'configs/{config}:smoke', '--workdir', str(work),
         '--config.train.epochs=1', *_data_args(config, tmp_path)]
  r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (work / 'report.md').exists()
  runs = [p.parent for p in work.glob('*/analysis.json')]
  assert runs
  for run in runs:
    robust = json.loads((run / 'analysis.json').read_text())['robustness']
    if robust:
      assert 0.0 <= robust['accuracy']['autoattack'] <= robust['accuracy']['clean'] <= 1.0
      assert robust['autoattack']['stages'][0] == 'apgd_ce' and robust['autoattack']['stages'][-1] == 'square'
  r = subprocess.run([sys.executable, '-m', 'arreg_jax.evaluate', '--workdir', str(work), '--examples=16', '--bs=16',
                      '--steps=3', '--n_targets=1', '--queries=10'], cwd=REPO, capture_output=True, text=True,
                     timeout=1800)
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'robust accuracy (%) after each stage' in r.stdout
  for run in runs:
    result = json.loads((run / 'autoattack.json').read_text())
    assert result['version'] == 'standard' and len(result['robust']) == 16
