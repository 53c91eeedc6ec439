"""Training on several XLA:CPU devices (issue 10): the two-device deadlock stays fixed, and 1, 2 and 8 devices train
and evaluate to the same metrics.

Each case is ``python -m arreg_jax.main`` in a subprocess with ``--xla_force_host_platform_device_count`` set (the
device count is fixed when the backend starts).
"""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The default model (small_cnn on the embedded MNIST), shrunk. 3200 / 64 = 50 steps an epoch: more than the 32
# programs XLA:CPU lets a device have in flight, which is what deadlocked two devices before the dispatch window.
TINY = ['--config', 'configs/mnist.py', '--config.train.epochs=2', '--config.data.train_size=3200',
        '--config.data.test_size=200', '--config.train.batch_size=64', '--config.eval.batch_size=100',
        '--config.eval.pgd_examples_per_epoch=100', '--config.eval.pgd_steps=2', '--config.analysis.enabled=False']


def _train(workdir, devices: int, *args):
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}', 'JAX_PLATFORMS': 'cpu'}
  cmd = [sys.executable, '-m', 'arreg_jax.main', '--workdir', str(workdir), *TINY, *args]
  # Before the fix the two-device run aborted after XLA's 40 s rendezvous timeout; 240 s only bounds a new hang.
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, f'exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}'
  assert f'{devices} of {devices} device(s)' in r.stderr, r.stderr[-2000:]
  return r


def test_two_devices_train_two_epochs(tmp_path):
  r = _train(tmp_path, 2, '--config.sweep=(0.0,)')
  assert '[ar0] epoch 2/2' in r.stdout and '[ar0] final:' in r.stdout, r.stdout


def test_one_two_and_eight_devices_give_the_same_metrics(tmp_path):
  # Clean training, 10 steps; the evaluation includes PGD. Eval batch 100 is not a multiple of 8: each batch is padded
  # to 104 rows, which must change nothing. (Adversarial training is not compared: PGD's sign(∇) turns the all-reduce's
  # float rounding into different adversarial examples, and runs drift apart by a few % within an epoch.)
  args = ['--config.sweep=(0.0,)', '--config.train.epochs=1', '--config.data.train_size=640']
  finals = {}
  for n in (1, 2, 8):
    _train(tmp_path / str(n), n, *args)
    finals[n] = json.load(open(tmp_path / str(n) / 'ar0' / 'final.json'))
  for n in (2, 8):
    for split in ('train', 'test'):
      a, b = finals[1][split], finals[n][split]
      assert a['count'] == b['count'] and a['acc'] == b['acc'], (n, split, a, b)
      assert abs(a['loss'] - b['loss']) < 1e-4 * max(1.0, abs(a['loss'])), (n, split, a, b)
    assert finals[1]['test']['clean_correct'] == finals[n]['test']['clean_correct']
    assert abs(finals[1]['test']['pgd_acc'] - finals[n]['test']['pgd_acc']) <= 1 / finals[1]['test']['clean_correct']
  