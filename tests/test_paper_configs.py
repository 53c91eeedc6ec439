"""The paper configs end to end through ``python -m arreg_jax.main`` in their ``:smoke`` versions: CIFAR from files
the test writes in the upstream format, Tiny-ImageNet from ../shared/data where present, draft 003's LeNet-SN on the
embedded MNIST. Slow (minutes on 2 CPU cores): ``python -m pytest -m slow``."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from test_data import _make_cifar10_py, _shared_data

REPO = pathlib.Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _main(workdir, config, *args, timeout=1200):
  cmd = [sys.executable, '-m', 'arreg_jax.main', '--config', config, '--workdir', str(workdir), *args]
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def _check_sweep(workdir, runs):
  summary = json.loads((workdir / 'summary.json').read_text())
  assert len(summary['rows']) == len(runs)
  for run in runs:
    final = json.loads((workdir / run / 'final.json').read_text())
    assert 0 <= final['row']['test_acc'] <= 100 and 0 <= final['row']['pgd_acc'] <= 100
    assert (workdir / run / 'analysis.json').exists()
  assert (workdir / 'report.md').exists() and (workdir / 'claims.json').exists()
  return (workdir / 'report.md').read_text()


@pytest.fixture
def cifar10_dir(tmp_path):
  _make_cifar10_py(tmp_path / 'data' / 'cifar-10-batches-py', per_batch=52, n_test=128)
  return tmp_path / 'data'


def test_cifar10_resnet56_smoke(tmp_path, cifar10_dir):
  r = _main(tmp_path / 'w', 'configs/cifar10_resnet56.py:smoke', f'--config.data.data_dir={cifar10_dir}')
  assert r.returncode == 0, r.stderr[-3000:]
  md = _check_sweep(tmp_path / 'w', ['ar4', 'ar8'])
  assert 'paper' in md.lower() and 'Table 3' in md  # the published numbers beside ours


def test_cifar10_spectral_clipping_grid_smoke(tmp_path, cifar10_dir):
  r = _main(tmp_path / 'w', 'configs/cifar10_resnet56_sn.py:smoke', f'--config.data.data_dir={cifar10_dir}',
            '--config.spectral.sweep=(1.0, None)', '--config.train.epochs=1')
  assert r.returncode == 0, r.stderr[-3000:]
  md = _check_sweep(tmp_path / 'w', ['ar4_sp1', 'ar4_spnone', 'ar8_sp1', 'ar8_spnone'])
  assert (tmp_path / 'w' / 'figures' / 'fig6_spectral_clipping.png').exists() and 'Table 6' in md


def test_tiny_imagenet_smoke_on_the_shared_files(tmp_path):
  root = _shared_data()
  if root is None or not (root / 'tiny-imagenet-200' / 'wnids.txt').is_file():
    pytest.skip('shared tiny-imagenet-200 not present (set ARREG_SHARED_DATA or provide ../shared/data)')
  r = _main(tmp_path / 'w', 'configs/tiny_imagenet.py:smoke', f'--config.data.data_dir={root}',
            f'--config.data.cache_dir={tmp_path / "cache"}', '--config.train.epochs=1')
  assert r.returncode == 0, r.stderr[-3000:]
  _check_sweep(tmp_path / 'w', ['ar0', 'ar4'])


def test_draft003_mnist_lenet_smoke(tmp_path):
  """Draft 003's LeNet with Miyato SN on the embedded MNIST: its Table 1 layout and the training-set loss variation."""
  r = _main(tmp_path / 'w', 'configs/draft003_mnist_lenet.py:smoke', '--config.train.epochs=1')
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads((tmp_path / 'w' / 'summary.json').read_text())
  runs = [f"ar{row['strength']:g}" for row in summary['rows']]
  md = _check_sweep(tmp_path / 'w', runs)
  a = json.loads((tmp_path / 'w' / runs[-1] / 'analysis.json').read_text())
  assert a['settings']['loss_variation_split'] == 'train_correct'
  assert 'draft' in md.lower()
