"""host_devices.use_every_cpu_core: one XLA:CPU device per core unless the user or the platform says otherwise."""

import os
import subprocess
import sys

import pytest

from arreg_jax import host_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fresh(code, **env):
  """Runs ``code`` in a new interpreter (whose JAX backend has not started) with the variables that choose the
  platform or the CPU device count unset."""
  base = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS', 'JAX_NUM_CPU_DEVICES')}
  r = subprocess.run([sys.executable, '-c', code], cwd=REPO, env={**base, **env}, capture_output=True, text=True,
                     timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  return r.stdout.split()


def test_auto_gives_one_device_per_core_and_n_gives_n():
  code = ('import jax; from arreg_jax import host_devices as h; n = h.use_every_cpu_core({}); '
          'print(n, h.cpu_cores(), jax.device_count())')
  n, cores, count = map(int, _fresh(code.format("'auto'")))
  assert n == cores == count
  assert _fresh(code.format(3)) == [str(3), str(cores), str(3)]


def test_auto_uses_the_public_option_only():
  code = ('import os, jax; from arreg_jax import host_devices as h; n = h.use_every_cpu_core(2); '
          "print(n, jax.config.jax_num_cpu_devices, 'XLA_FLAGS' in os.environ, jax.device_count())")
  assert _fresh(code) == ['2', '2', 'False', '2']


@pytest.mark.parametrize('env', [{'XLA_FLAGS': '--xla_force_host_platform_device_count=3'},
                                 {'JAX_NUM_CPU_DEVICES': '3'}])
def test_a_count_the_user_set_wins(env):
  out = _fresh('import jax; from arreg_jax import host_devices as h; print(h.use_every_cpu_core(), jax.device_count())',
               **env)
  assert out == ['None', '3']


def test_a_count_set_in_code_before_wins():
  out = _fresh("import jax; jax.config.update('jax_num_cpu_devices', 3); from arreg_jax import host_devices as h; "
               'print(h.use_every_cpu_core(), jax.device_count())')
  assert out == ['None', '3']


def test_nothing_changes_on_an_accelerator(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  before = jax.config.jax_num_cpu_devices
  monkeypatch.delenv('XLA_FLAGS', raising=False)
  monkeypatch.delenv('JAX_NUM_CPU_DEVICES', raising=False)
  monkeypatch.setenv('JAX_PLATFORMS', 'cuda,cpu')
  assert host_devices.use_every_cpu_core() is None
  assert jax.config.jax_num_cpu_devices == before and 'XLA_FLAGS' not in os.environ


def test_a_started_backend_is_left_alone_with_a_warning():
  # In a fresh process: the backend starts with XLA's one CPU device, then the call is too late and says so.
  code = ('import jax; from arreg_jax import host_devices as h; '
          'n0 = jax.device_count(); n = h.use_every_cpu_core(3); '
          'print(n0, n, jax.config.jax_num_cpu_devices, jax.device_count())')
  base = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_PLATFORMS', 'JAX_NUM_CPU_DEVICES')}
  r = subprocess.run([sys.executable, '-c', code], cwd=REPO, env=base, capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split() == ['1', 'None', '-1', '1']
  assert 'backend has already started' in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize('bad', [0, -2, '4', 2.0, True])
def test_bad_counts_are_refused(bad):
  with pytest.raises(ValueError, match="'auto' or an integer"):
    host_devices.use_every_cpu_core(bad)


def test_main_cpu_devices_flag_and_a_batch_that_does_not_split(tmp_path):
  base = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  cmd = [sys.executable, '-m', 'arreg_jax.main', '--workdir', str(tmp_path), '--config', 'configs/mnist.py:smoke',
         '--cpu_devices=3', '--config.sweep=(0.0,)', '--config.train.epochs=1', '--config.analysis.enabled=False']
  r = subprocess.run(cmd, cwd=REPO, env=base, capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert '2 of 3 device(s)' in r.stderr, r.stderr[-2000:]  # batch 64 splits over 2 of the 3 devices
  bad = subprocess.run(cmd[:-3] + ['--cpu_devices=many'], cwd=REPO, env=base, capture_output=True, text=True,
                       timeout=120)
  assert bad.returncode == 2 and "--cpu_devices must be 'auto'" in bad.stderr, bad.stderr[-2000:]
