"""tensorflow-datasets is optional (``pip install 'arreg_jax[tfds]'``): without it every module imports, the embedded
MNIST smoke run trains, and only ``data.source='tfds'`` fails, with one line that names the package and the fix.

Each case runs in a fresh interpreter in which ``import tensorflow_datasets`` fails as if it were not installed
(``sys.modules['tensorflow_datasets'] = None`` before anything else is imported).
"""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HIDE = "import sys; sys.modules['tensorflow_datasets'] = None; "


def _run(code: str, timeout: int):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'JAX_NUM_CPU_DEVICES')}
  return subprocess.run([sys.executable, '-c', _HIDE + code], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


def _main(*args: str, timeout: int):
  """``python -m arreg_jax.main ARGS`` with tensorflow_datasets hidden."""
  argv = ['arreg_jax.main', *args]
  return _run(f'import runpy; sys.argv = {argv!r}; runpy.run_module("arreg_jax.main", run_name="__main__", '
              'alter_sys=True)', timeout)


def test_the_hiding_works():
  r = _run('import tensorflow_datasets', 60)
  assert r.returncode != 0 and 'tensorflow_datasets' in r.stderr


def test_every_module_imports_without_tfds():
  r = _run('import importlib, pkgutil, arreg_jax\n'
           'names = [m.name for m in pkgutil.walk_packages(arreg_jax.__path__, "arreg_jax.")]\n'
           'for n in names: importlib.import_module(n)\n'
           'print(len(names), sorted(k for k in sys.modules if k.split(".")[0] in ("tensorflow", "tensorflow_datasets")'
           ' and sys.modules[k] is not None))', 300)
  assert r.returncode == 0, r.stderr[-3000:]
  count, loaded = r.stdout.split(maxsplit=1)
  assert int(count) > 50 and loaded.strip() == '[]', r.stdout


def test_smoke_run_trains_without_tfds(tmp_path):
  r = _main('--config', 'configs/mnist.py:smoke', '--workdir', str(tmp_path), '--cpu_devices=1', timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert (tmp_path / 'summary.json').exists() and (tmp_path / 'report.md').exists()


def test_tfds_source_without_tfds_is_one_clear_error(tmp_path):
  workdir = tmp_path / 'w'
  r = _main('--config', 'configs/mnist.py:smoke', '--workdir', str(workdir), '--cpu_devices=1',
            '--config.data.source=tfds', f'--config.data.data_dir={tmp_path}', timeout=300)
  assert r.returncode == 2, r.stderr[-3000:]
  errors = [line for line in r.stderr.splitlines() if line.startswith('error:')]
  assert len(errors) == 1 and 'Traceback' not in r.stderr, r.stderr[-3000:]
  assert 'tensorflow-datasets' in errors[0] and "pip install 'arreg_jax[tfds]'" in errors[0], errors[0]
  assert not workdir.exists()  # nothing written
