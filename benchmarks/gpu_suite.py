r"""The GPU hour in one command: what the issues ask of a GPU, measured within a wall-clock budget.

  python benchmarks/gpu_suite.py --out DIR [--budget_s 480] [--autoattack_dir .autoattack] [--parts a,b] [--tiny]

Parts, in order of importance (``gpu_parts.py`` measures them; ``benchmarks/README.md``, "GPU suite", gives the
device command, the wheels and the authors' code it carries):

1. ``pgd_attack`` — L∞ PGD-10 on ResNet-56 at batch 512 then 128, float32 and bfloat16: arreg_jax vs torchattacks
   vs the PyTorch hand loop vs ``torch.compile``, same weights, checked equal first (``attack_throughput.py``'s
   method; PyTorch on CUDA when it sees a GPU).
2. ``at_epoch`` — one CIFAR-10-sized PGD-10 adversarial-training epoch (50,000 random images, batch 256, ResNet-56)
   with the package's training program, float32 and bfloat16: img/s, s/epoch, XLA's FLOPs against the device's
   peak (MFU) and a measured matmul, and the projected time of the paper's Tables 3 and 4 sweep.
3. ``wrn_memory`` — WRN-50-2, batch 256, 56×56: the PGD-10 training step's time, what ``microbatches='auto'``
   picks, and the memory plan's bytes against ``memory_stats()['peak_bytes_in_use']``.
4. ``apgd_autoattack`` — APGD-CE and the standard AutoAttack cascade on 1,000 CIFAR-shaped images, against the
   authors' PyTorch code when its source is at ``--autoattack_dir``.
5. ``spectral_clip`` — clipping every ResNet-56 conv layer, also as a share of part 2's float32 epoch.
6. ``mnist_default`` — the embedded MNIST default end to end (``python -m arreg_jax.main``), timed.

Files: ``DIR/index.json`` (device, nvidia-smi's driver, the versions, the exact command, every part's status) and
``DIR/<n>_<part>.json``, each rewritten atomically (``machine.write_results``) the moment a measurement ends, with
``"status": "running"`` until its part ends: a run killed at its limit still leaves everything it finished.

Budget: before each part the time left is checked against the part's least useful time (``gpu_parts.PARTS``); a
part that cannot fit is recorded as skipped (``"budget"``), and inside a part each configuration starts only if the
time the previous one took still fits. A part also stops at its own cap, so that later parts keep some time. A
missing optional dependency (torch, torchattacks, the authors' code) skips what needs it, with the reason, and the
rest of the part still runs. An error in one part is recorded in its file (message and traceback) and the next part
runs.

``--tiny`` runs every part on small shapes (``gpu_parts.TINY``: ResNet-20, the small WRN, batches of a few images,
one attack step, MNIST ``:smoke`` for one epoch) in under a minute on a CPU: the check that the suite works before a
GPU hour is spent on it. It also sets ``jax_threefry_partitionable=False`` (same programs, random bits lowered the
older way, which XLA:CPU compiles 3× faster); its numbers are not measurements.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import subprocess
import sys
import time
import traceback
from typing import Any

import jax

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import machine  # noqa: E402  (device, versions, the JSON writer)
from gpu_parts import FULL, PARTS, TINY, Settings  # noqa: E402  (the measurements)


class Part:
  """One part's results, written to its JSON file after every change."""

  def __init__(self, suite: 'Suite', index: int, name: str, cap_s: float):
    self.suite, self.name = suite, name
    self.path = os.path.join(suite.out, f'{index}_{name}.json')
    self.t0, self.cpu0 = time.monotonic(), time.process_time()
    self.deadline = min(suite.deadline, self.t0 + cap_s)
    self.data: dict[str, Any] = {'part': name, 'status': 'running', 'device': suite.device_name,
                                 'command': suite.command, 'started_utc': _utc(), 'cap_s': round(cap_s, 1),
                                 'results': [], 'skipped': []}

  @property
  def settings(self) -> Settings:
    return self.suite.settings

  @property
  def shared(self) -> dict[str, Any]:
    """What one part measures for a later one (the float32 epoch time)."""
    return self.suite.shared

  @property
  def autoattack_dir(self) -> str:
    return self.suite.autoattack_dir

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def fits(self, estimate_s: float) -> bool:
    return self.left() >= estimate_s

  def record(self, **entries) -> None:
    self.data.update(entries)
    self.save()

  def add(self, row: dict) -> None:
    self.data['results'].append(row)
    self.save()

  def skip(self, what: str, reason: str) -> None:
    print(f'  [{self.name}] skipped {what}: {reason}', flush=True)
    self.data['skipped'].append({'what': what, 'reason': reason})
    self.save()

  def save(self) -> None:
    self.data['seconds'] = round(time.monotonic() - self.t0, 2)
    self.data['process_cpu_s'] = round(time.process_time() - self.cpu0, 2)  # this process's threads, not children
    machine.write_results(self.path, self.data)


class Suite:
  """The budget, the output folder and the index of the parts."""

  def __init__(self, out: str, budget_s: float, settings: Settings, autoattack_dir: str):
    self.out, self.settings, self.autoattack_dir = out, settings, autoattack_dir
    self.start = time.monotonic()
    self.deadline = self.start + budget_s
    self.command = machine.command_line()
    self.device_name = jax.devices()[0].device_kind
    self.shared: dict[str, Any] = {}  # what one part measures for a later one (the float32 epoch time)
    self.index: dict[str, Any] = {
        'suite': 'gpu_suite', 'command': self.command, 'python': sys.executable, 'started_utc': _utc(),
        'budget_s': budget_s, 'tiny': settings.tiny, 'settings': dataclasses.asdict(settings),
        'device': machine.device_info(), 'versions': machine.versions(), 'git_commit': _git_commit(),
        'jax_config': {'jax_default_matmul_precision': jax.config.jax_default_matmul_precision,
                       'jax_enable_x64': jax.config.jax_enable_x64,
                       'jax_threefry_partitionable': jax.config.jax_threefry_partitionable},
        'env': {k: os.environ.get(k) for k in ('XLA_FLAGS', 'XLA_PYTHON_CLIENT_PREALLOCATE',
                                               'XLA_PYTHON_CLIENT_MEM_FRACTION', 'JAX_PLATFORMS', 'PYTHONPATH',
                                               'CUDA_VISIBLE_DEVICES')},
        'parts': [{'name': spec.name, 'file': f'{i}_{spec.name}.json', 'status': 'pending'}
                  for i, spec in enumerate(PARTS, 1)],
        'finished': False,
    }
    os.makedirs(out, exist_ok=True)
    self.save_index()

  def left(self) -> float:
    return self.deadline - time.monotonic()

  def save_index(self) -> None:
    self.index['elapsed_s'] = round(time.monotonic() - self.start, 2)
    machine.write_results(os.path.join(self.out, 'index.json'), self.index)

  def run(self, selected: set[str]) -> None:
    for i, spec in enumerate(PARTS, 1):
      entry = self.index['parts'][i - 1]
      least = spec.least_s[self.settings.tiny]
      cap = spec.cap_s[self.settings.tiny]
      part = Part(self, i, spec.name, cap_s=max(min(cap, self.left()), 0.0))
      if spec.name not in selected:
        status, reason = 'skipped', 'not selected (--parts)'
      elif self.left() < least:
        status, reason = 'skipped', f'budget: needs at least {least:.0f} s, {max(self.left(), 0):.0f} s left'
      else:
        status, reason = None, None
      if status:
        part.record(status=status, reason=reason)
        entry.update(status=status, reason=reason)
        self.save_index()
        print(f'[{spec.name}] {status}: {reason}', flush=True)
        continue
      print(f'\n[{spec.name}] {spec.title} (at most {part.left():.0f} s; {self.left():.0f} s of the budget left)',
            flush=True)
      entry['status'] = 'running'
      self.save_index()
      try:
        spec.run(part)
        part.data['status'] = 'done'
      except Exception as e:  # pylint: disable=broad-except  # one part's failure must not lose the others
        part.data.update(status='error', error=f'{type(e).__name__}: {e}'[:2000],
                         traceback=traceback.format_exc()[-6000:])
        print(f'[{spec.name}] ERROR {type(e).__name__}: {e}', flush=True)
      part.save()
      entry.update(status=part.data['status'], seconds=part.data['seconds'],
                   skipped=len(part.data['skipped']), error=part.data.get('error'))
      self.save_index()
      _free_torch_cache()
    self.index['finished'] = True
    self.save_index()


def _free_torch_cache() -> None:
  torch = sys.modules.get('torch')
  if torch is not None and torch.cuda.is_available():
    torch.cuda.empty_cache()


def _utc() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def _git_commit() -> str | None:
  try:
    out = subprocess.run(['git', '-C', REPO, 'rev-parse', 'HEAD'], capture_output=True, text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def print_summary(suite: Suite) -> None:
  """The parts' status, last in the output (what a remote run's reply shows)."""
  print('\n| part | status | s | skipped | note |\n|---|---|---:|---:|---|')
  for e in suite.index['parts']:
    note = e.get('reason') or e.get('error') or ''
    print(f'| {e["name"]} | {e["status"]} | {e.get("seconds", "")} | {e.get("skipped", "")} | {note[:80]} |')
  print(f'\nresults: {suite.out} ({suite.index["elapsed_s"]:.0f} s of a {suite.index["budget_s"]:.0f} s budget)')


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--out', required=True, help='folder for index.json and one JSON per part (created)')
  p.add_argument('--budget_s', type=float, default=480.0, help='wall-clock budget of the whole run, in seconds')
  p.add_argument('--tiny', action='store_true', help='small shapes: checks the suite in under a minute on a CPU')
  p.add_argument('--parts', default=','.join(spec.name for spec in PARTS),
                 help='comma-separated subset of: ' + ', '.join(spec.name for spec in PARTS))
  p.add_argument('--autoattack_dir', default=os.path.join(REPO, '.autoattack'),
                 help='a folder holding the authors\' autoattack package (github.com/fra31/auto-attack)')
  args = p.parse_args(argv)
  if not args.budget_s >= 0:
    p.error(f'--budget_s must be >= 0, got {args.budget_s}')
  selected = {x.strip() for x in args.parts.split(',') if x.strip()}
  unknown = selected - {spec.name for spec in PARTS}
  if unknown:
    p.error(f'unknown part(s) {", ".join(sorted(unknown))}; choose from {", ".join(spec.name for spec in PARTS)}')
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    p.error(f'--out {args.out} is a file')
  if args.tiny:
    # The same programs with the older random-bit lowering: XLA:CPU compiles the threefry-heavy model inits 3× faster
    # (ResNet-20: 4.4 → 1.4 s), which is most of a tiny run. Tiny numbers are a check of the suite, not measurements.
    jax.config.update('jax_threefry_partitionable', False)
  suite = Suite(args.out, args.budget_s, TINY if args.tiny else FULL, args.autoattack_dir)
  print(f'gpu_suite: {suite.device_name} ({jax.devices()[0].platform}), budget {args.budget_s:.0f} s, '
        f'{"tiny" if args.tiny else "full"} shapes → {args.out}', flush=True)
  suite.run(selected)
  print_summary(suite)
  return 0


if __name__ == '__main__':
  sys.exit(main())
