"""benchmarks/gpu_suite.py: every part writes its JSON (skipped ones with their reason), within the budget.

``--tiny`` runs the whole suite on small shapes in well under a minute on a CPU; with a zero budget every part is
skipped for the budget and still leaves its file. The pure helpers (peaks, projection) are checked directly.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTS = ('pgd_attack', 'at_epoch', 'wrn_memory', 'apgd_autoattack', 'spectral_clip', 'mnist_default')
sys.path.insert(0, os.path.join(REPO, 'benchmarks'))

import gpu_parts  # noqa: E402  pylint: disable=wrong-import-position


def _env(tmp_path):
  """The environment of a suite run: no CPU device count of the caller's, scratch files (the MNIST run's) under
  ``tmp_path``."""
  scratch = tmp_path / 'scratch'
  scratch.mkdir(exist_ok=True)
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  return {**env, 'TMPDIR': str(scratch)}


def _suite(out, *args, timeout=300):
  r = subprocess.run([sys.executable, 'benchmarks/gpu_suite.py', '--out', str(out), *args], cwd=REPO,
                     env=_env(out.parent), capture_output=True, text=True, timeout=timeout)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
  index = json.loads((out / 'index.json').read_text())
  parts = {name: json.loads((out / f'{i}_{name}.json').read_text()) for i, name in enumerate(PARTS, 1)}
  return index, parts


def _installed(name):
  try:
    __import__(name)
    return True
  except ImportError:
    return False


def test_tiny_suite_writes_every_part(tmp_path):
  out = tmp_path / 'out'
  index, parts = _suite(out, '--tiny', '--autoattack_dir', str(tmp_path / 'no_authors_code'))
  assert index['finished'] and index['tiny'] and [p['name'] for p in index['parts']] == list(PARTS)
  assert index['device']['jax_device_kind'] and index['versions']['jax'] and 'gpu_suite.py' in index['command']
  assert sorted(os.listdir(out)) == sorted(['index.json'] + [f'{i}_{n}.json' for i, n in enumerate(PARTS, 1)])
  for entry in index['parts']:
    part = parts[entry['name']]
    assert part['status'] == entry['status'] == 'done', (entry, part.get('error'), part.get('traceback'))
    assert part['command'] == index['command'] and part['device'] == index['device']['jax_device_kind']

  attack = {r['method']: r for r in parts['pgd_attack']['results'] if r['precision'] == 'f32'}
  assert attack['arreg_jax']['images_per_s'] > 0 and attack['arreg_jax']['linf_from_clean'] <= 8 / 255 + 1e-6
  skipped = {s['what']: s['reason'] for s in parts['pgd_attack']['skipped']}
  assert 'tiny mode' in skipped['torch_compile'] or skipped['torch_compile'] == 'torch is not installed'
  if not _installed('torch'):  # a missing optional package: the part still ran, and says what it left out
    assert skipped['torchattacks'] == skipped['torch_eager'] == 'torch is not installed'

  epoch = parts['at_epoch']['results']
  assert [r['precision'] for r in epoch] == ['float32', 'bfloat16']
  for r in epoch:
    assert r['epoch_measured'] and r['images_per_s'] > 0 and r['achieved_flops_per_s'] > 0
    assert r['table3_and_4_sweep']['total_hours'] > 0 and 'training steps only' in r['table3_and_4_sweep']['covers']
  assert parts['at_epoch']['flops_per_step']['xla']['step'] > 0
  assert parts['at_epoch']['peak']['device'] is None  # a CPU is no known GPU: no MFU, and it says so
  assert epoch[0]['mfu'] is None

  wrn = parts['wrn_memory']
  assert wrn['microbatches_chosen'] >= 1 and wrn['memory_plan']['new_bytes'] > 0 and wrn['results'][0]['step_s']

  apgd = parts['apgd_autoattack']
  methods = {(r['attack'], r['method']) for r in apgd['results']}
  assert {('apgd_ce', 'arreg_jax'), ('autoattack_standard', 'arreg_jax')} <= methods
  assert any(s['what'] == 'authors' and 'not' in s['reason'] for s in apgd['skipped'])
  aa = next(r for r in apgd['results'] if r['attack'] == 'autoattack_standard')
  assert list(aa['robust_after']) == ['clean', 'apgd_ce', 'apgd_t', 'fab_t', 'square']

  spectral = parts['spectral_clip']['results']
  assert [r['pass'] for r in spectral] == ['once', 'repeats'] and 'eigh_vs_svd' in spectral[1]
  assert all(r['timings']['batched']['median_s'] > 0 for r in spectral)
  mnist = parts['mnist_default']['results'][0]
  assert mnist['returncode'] == 0 and mnist['summary_rows'] and mnist['training_s'] > 0


def test_a_killed_run_leaves_what_it_finished(tmp_path):
  # Killed while its second part runs: the first part's file is complete, the second's and the index say 'running'.
  out = tmp_path / 'out'
  proc = subprocess.Popen([sys.executable, 'benchmarks/gpu_suite.py', '--out', str(out), '--tiny',
                           '--parts', 'spectral_clip,mnist_default'], cwd=REPO, env=_env(tmp_path),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  try:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
      mnist = out / '6_mnist_default.json'
      if mnist.exists() and json.loads(mnist.read_text())['status'] == 'running':
        break
      time.sleep(0.2)
    assert proc.poll() is None, 'the run ended before it could be killed'
  finally:
    os.killpg(proc.pid, signal.SIGKILL)  # the suite and the MNIST run it started (its own process group)
    proc.wait(timeout=60)
  index = json.loads((out / 'index.json').read_text())
  status = {p['name']: p['status'] for p in index['parts']}
  assert not index['finished'] and status['spectral_clip'] == 'done' and status['mnist_default'] == 'running'
  assert json.loads((out / '5_spectral_clip.json').read_text())['results']
  assert json.loads((out / '6_mnist_default.json').read_text())['status'] == 'running'
  assert not [f for f in os.listdir(out) if '.tmp' in f]  # no half-written file left behind


def test_no_budget_skips_every_part_and_says_why(tmp_path):
  index, parts = _suite(tmp_path / 'out', '--budget_s', '0', timeout=120)
  assert index['finished']
  for name, part in parts.items():
    assert part['status'] == 'skipped' and part['reason'].startswith('budget'), (name, part)
  assert {p['status'] for p in index['parts']} == {'skipped'}


def test_parts_can_be_chosen_and_bad_arguments_are_refused(tmp_path):
  index, parts = _suite(tmp_path / 'a', '--budget_s', '0', '--parts', 'spectral_clip', timeout=120)
  assert parts['spectral_clip']['reason'].startswith('budget')
  assert parts['pgd_attack']['reason'] == 'not selected (--parts)'
  for bad in (['--parts', 'nope'], ['--budget_s', '-1']):
    r = subprocess.run([sys.executable, 'benchmarks/gpu_suite.py', '--out', str(tmp_path / 'b'), *bad], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'error' in r.stderr


@pytest.mark.parametrize('kind, name', [('NVIDIA H100 80GB HBM3', 'H100 SXM'),
                                        ('NVIDIA H200', 'H200 (H100 SXM compute)'), ('NVIDIA H100 PCIe', 'H100 PCIe'),
                                        ('NVIDIA A100-SXM4-80GB', 'A100'), ('NVIDIA H200 NVL', None), ('cpu', None)])
def test_known_peaks(kind, name):
  peak = gpu_parts.known_peak(kind)
  assert peak['device'] == name
  if name is None:
    assert peak['flops_per_s'] is None and 'unknown' in peak['source']
    assert gpu_parts.mfu(1e12, 'float32', peak) == {'mfu': None}


def test_mfu_and_projection_arithmetic():
  peak = gpu_parts.known_peak('NVIDIA H100 80GB HBM3')
  assert gpu_parts.mfu(98.9e12, 'bfloat16', peak)['mfu'] == pytest.approx(0.1)
  f32 = gpu_parts.mfu(6.7e12, 'float32', peak)
  assert f32['mfu_vs_f32'] == pytest.approx(0.1) and f32['mfu_vs_tf32'] == pytest.approx(6.7 / 495)
  proj = gpu_parts.sweep_projection(10.0, 56)
  r56, r110 = proj['models']['resnet56'], proj['models']['resnet110']
  assert r56['epoch_s'] == 10.0 and r56['runs'] == 6 and r56['hours'] == pytest.approx(10 * 200 * 6 / 3600)
  assert 1.9 < r110['epoch_s'] / r56['epoch_s'] < 2.1  # 108 vs 54 residual layers
  assert proj['total_hours'] == pytest.approx(r56['hours'] + r110['hours'])
  with pytest.raises(ValueError):
    gpu_parts.sweep_projection(0.0, 56)
