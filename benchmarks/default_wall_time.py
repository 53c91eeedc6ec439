r"""The embedded default's wall time as a new user meets it: fresh clone, fresh virtualenv, install, README command 1.

Clones this repository's HEAD into a temporary directory, creates a virtualenv there, runs ``pip install -e .``
(timed: the install) and then ``python -m arreg_jax.main --config configs/mnist.py --workdir runs/mnist`` (timed:
the command), and reads the phases from the command's own log (``sweep finished in`` for training, the
``[analysis]`` lines, the ``[report]`` line). Prints a table and writes JSON with device, versions and command.
The goal the project holds itself to: ≤ 300 s in all on 2 CPU cores.

  python benchmarks/default_wall_time.py
  python benchmarks/default_wall_time.py --extra_args=--cpu_devices=1    # one XLA:CPU device instead of one per core
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_OUT = os.path.join(REPO, 'benchmarks', 'results', 'default_wall_time_cpu.json')
GOAL_S = 300.0


def timed(cmd: str, cwd: str, log: str) -> float:
  t0 = time.perf_counter()
  with open(log, 'w') as f:
    subprocess.run(['bash', '-c', cmd], cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=True,
                   env={**os.environ, 'OPENBLAS_NUM_THREADS': '1'})
  return time.perf_counter() - t0


def phases(log_text: str) -> dict:
  """Training, analysis and report seconds as the command logged them."""
  out = {}
  m = re.search(r'sweep finished in ([\d.]+) s', log_text)
  out['training_s'] = float(m.group(1)) if m else None
  analysis = [float(x) for x in re.findall(r'^\[analysis\] \S+: ([\d.]+) s', log_text, re.M)]
  out['analysis_s'] = round(sum(analysis), 1) if analysis else None
  m = re.search(r'^\[report\] .*\(([\d.]+) s\)', log_text, re.M)
  out['report_s'] = float(m.group(1)) if m else None
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--extra_args', default='', help='appended to the README command')
  p.add_argument('--keep', action='store_true', help='keep the temporary clone (its runs/mnist) and print its path')
  p.add_argument('--out', default=DEFAULT_OUT)
  args = p.parse_args(argv)
  import machine as common  # pylint: disable=g-import-not-at-top  (machine description, JSON writer)

  head = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=REPO, capture_output=True, text=True,
                        check=True).stdout.strip()
  tmp = tempfile.mkdtemp(prefix='arreg_default_')
  clone = os.path.join(tmp, 'arreg_jax')
  subprocess.run(['git', 'clone', '-q', REPO, clone], check=True)
  uptime_before = subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
  install_cmd = 'python3 -m venv .venv && . .venv/bin/activate && pip install -q -e .'
  run_cmd = ('. .venv/bin/activate && python -m arreg_jax.main --config configs/mnist.py --workdir runs/mnist '
             + args.extra_args).strip()
  install_s = timed(install_cmd, clone, os.path.join(tmp, 'install.log'))
  command_s = timed(run_cmd, clone, os.path.join(tmp, 'main.log'))
  with open(os.path.join(tmp, 'main.log')) as f:
    log_text = f.read()
  total = install_s + command_s
  row = {'commit': head, 'install_s': round(install_s, 1), 'command_s': round(command_s, 1),
         'total_s': round(total, 1), 'goal_s': GOAL_S, 'meets_goal': total <= GOAL_S, **phases(log_text),
         'install_command': install_cmd, 'readme_command': run_cmd,
         'final_lines': [l for l in log_text.splitlines() if l.startswith('[') and 'final:' in l],
         'uptime_before': uptime_before,
         'uptime_after': subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}
  print(f'{"install s":>10} {"command s":>10} {"training s":>11} {"analysis s":>11} {"report s":>9} {"total s":>8}'
        f'  goal ≤ {GOAL_S:.0f} s')
  print(f'{row["install_s"]:10.1f} {row["command_s"]:10.1f} {row["training_s"] or 0:11.1f} '
        f'{row["analysis_s"] or 0:11.1f} {row["report_s"] or 0:9.1f} {row["total_s"]:8.1f}  '
        f'{"met" if row["meets_goal"] else "NOT met"}')
  out = {'benchmark': 'default_wall_time', 'date': datetime.datetime.now().isoformat(timespec='seconds'),
         'device': common.device_info(), 'versions': common.versions(),
         'notes': 'fresh clone + fresh virtualenv + pip install -e . (packages from the configured index) + README '
                  'command 1; phases read from the command\'s log',
         'runs': [common.command_line()], 'results': [row]}
  common.write_results(args.out, out, ('commit', 'readme_command'), merge=True)
  print(f'wrote {args.out}' + (f'; the clone is in {clone}' if args.keep else ''))
  if not args.keep:
    subprocess.run(['rm', '-rf', tmp], check=False)


if __name__ == '__main__':
  main()
