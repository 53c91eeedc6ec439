r"""One PGD-10 adversarial-training step: arreg_jax's compiled step against the PyTorch hand loop, same model.

Both sides train ResNet-56 (the Fixup CIFAR ResNet, no BatchNorm; PyTorch: the twin in ``torch_models.py`` with the
same weights) on CIFAR-shaped batches (``--batch``, default 128) with the recipe of ``configs/cifar10_resnet56.py``:
L∞ PGD-10 at ε = 8/255, step 2/255, uniform random start, then one SGD update (lr 0.1, momentum 0.9, weight decay
5e-4) on the mean cross-entropy of the adversarial batch.
  * ``arreg_jax``: ``training.step.train_steps`` — the program ``training.loop`` runs — one step per call, the
    batch split over the default device layout (one XLA:CPU device per core; ``--cpu_devices``), the data set
    resident on the devices, no augmentation (``augment_kind='none'``, as on the PyTorch side);
  * ``torch_loop``: the loop people write (Madry et al.; Rice et al.'s robust-overfitting code): ``model.eval()``
    for the attack, ``torch.autograd.grad`` of the summed cross-entropy w.r.t. δ only (no parameter gradients in
    the attack), then ``model.train()``, ``loss.backward()`` and ``torch.optim.SGD.step()``.
Timing: one warm-up step each, then ``--steps`` interleaved rounds (one step of each per round); the median step.

  python benchmarks/at_step_throughput.py --steps 5 --wait_quiet 20
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from arreg_jax import host_devices  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'at_step_throughput_cpu.json')
EPS, STEP, STEPS, LR, MOMENTUM, WD = 8 / 255, 2 / 255, 10, 0.1, 0.9, 5e-4
NUM_IMAGES = 2048  # the device-resident set the steps draw their batches from


def jax_side(batch: int, variables, images, labels):
  """(step(), devices): one arreg_jax training step per call on the next batch of the resident set."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  from arreg_jax import models, presets, sharding  # pylint: disable=g-import-not-at-top
  from arreg_jax.training import state as state_lib, step as step_lib  # pylint: disable=g-import-not-at-top
  config = presets.cifar_paper('cifar10', 'resnet56')
  config.train.batch_size = batch
  config.train.learning_rate, config.train.momentum, config.train.weight_decay = LR, MOMENTUM, WD
  config.attack.steps, config.attack.step_size, config.attack.random_start = STEPS, STEP, True
  config.attack.strength_unit = 1 / 255
  mesh = sharding.make_mesh(sharding.data_parallel_devices(batch))
  rep = sharding.replicated(mesh)
  steps_per_epoch = NUM_IMAGES // batch
  module = models.get_module('resnet56', num_classes=10)
  spec = step_lib.step_spec(config, module=module, adversarial=True, augment='none',
                            steps_per_epoch=steps_per_epoch, batch_sharding=sharding.batch_sharding(mesh))
  state = jax.device_put(state_lib.init_state(variables, spec.optimizer), rep)
  multi = functools.partial(step_lib.train_steps, spec)
  hyper = jax.device_put(step_lib.step_hyper(config, 8.0, jax.random.key(1)), rep)
  x, y = jax.device_put((images, labels), rep)
  perm = jax.device_put(jnp.arange(NUM_IMAGES, dtype=jnp.int32), rep)
  box = {'state': state}

  def step():
    box['state'], m = multi(box['state'], x, y, perm, hyper)
    jax.block_until_ready(m)
    return float(m['loss_sum']) / batch
  return step, mesh.size


def torch_side(batch: int, variables, images, labels):
  """step(): one PyTorch hand-loop training step per call on the next batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  import torch_models  # pylint: disable=g-import-not-at-top
  model = torch_models.build('resnet56', 10, jax.device_get(variables))
  opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WD)
  x_all = torch.from_numpy(images.transpose(0, 3, 1, 2).astype('float32') / 255)
  y_all = torch.from_numpy(labels.astype('int64'))
  box = {'i': 0}

  def step():
    i = box['i']
    box['i'] = (i + batch) % NUM_IMAGES
    x, y = x_all[i:i + batch], y_all[i:i + batch]
    model.eval()
    delta = torch.empty_like(x).uniform_(-EPS, EPS)
    delta = (torch.clamp(x + delta, 0, 1) - x).requires_grad_(True)
    for _ in range(STEPS):
      loss = F.cross_entropy(model(x + delta), y, reduction='sum')
      (g,) = torch.autograd.grad(loss, [delta])
      delta = (torch.clamp(x + torch.clamp(delta + STEP * g.sign(), -EPS, EPS), 0, 1) - x).detach()
      delta.requires_grad_(True)
    model.train()
    opt.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x + delta.detach()), y)
    loss.backward()
    opt.step()
    return float(loss)
  return step


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument('--batch', type=int, default=128)
  p.add_argument('--steps', type=int, default=5, help='timed steps per side (interleaved), after one warm-up')
  p.add_argument('--cpu_devices', default='auto', help="XLA:CPU devices ('auto': one per core, the default)")
  p.add_argument('--wait_quiet', type=float, default=0.0,
                 help='before each timed step, wait up to this many seconds for other processes to use < 25%% of '
                      'the CPU')
  p.add_argument('--out', default=DEFAULT_OUT)
  p.add_argument('--merge', action='store_true')
  args = p.parse_args(argv)
  host_devices.use_every_cpu_core(args.cpu_devices if args.cpu_devices == 'auto' else int(args.cpu_devices))

  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import attack_throughput as common  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count() or 1)
  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (NUM_IMAGES, 32, 32, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, NUM_IMAGES).astype(np.int32)
  calib = images[:16].astype(np.float32) / 255
  _, variables = common.random_variables('resnet56', jax.random.key(0), calib)
  print(f'devices: JAX {jax.devices()}; torch threads {torch.get_num_threads()}; load {os.getloadavg()}', flush=True)
  jstep, ndev = jax_side(args.batch, variables, images, labels)
  tstep = torch_side(args.batch, variables, images, labels)
  sides = {'arreg_jax': jstep, 'torch_loop': tstep}
  rows = {}
  for name, fn in sides.items():
    t0 = time.perf_counter()
    loss = fn()
    rows[name] = {'method': name, 'batch': args.batch, 'warmup_s': round(time.perf_counter() - t0, 2),
                  'first_loss': round(loss, 4), 'times_s': [], 'others_cpu': []}
    print(f'  {name}: warm-up {rows[name]["warmup_s"]} s, loss {loss:.4f}', flush=True)
  for _ in range(args.steps):
    for name, fn in sides.items():
      if args.wait_quiet:
        common.wait_for_quiet(args.wait_quiet)
      with common.CpuShare() as share:
        fn()
      rows[name]['times_s'].append(round(share.wall, 3))
      rows[name]['others_cpu'].append(share.others)
  base = statistics.median(rows['torch_loop']['times_s'])
  print(f'\n{"method":11} {"dev":>3} {"batch":>5} {"s/step":>7} {"img/s":>7} {"× torch":>7}  others CPU per step')
  for name, r in rows.items():
    r['median_s'] = statistics.median(r['times_s'])
    r['images_per_s'] = round(args.batch / r['median_s'], 2)
    r['ratio_vs_torch_loop'] = round(base / r['median_s'], 3)
    r['jax_devices'] = ndev if name == 'arreg_jax' else None
    shares = ' '.join('?' if o is None else format(o, '.0%') for o in r['others_cpu'])
    print(f'{name:11} {str(r["jax_devices"] or "-"):>3} {args.batch:>5} {r["median_s"]:7.2f} {r["images_per_s"]:7.2f} '
          f'{r["ratio_vs_torch_loop"]:7.2f}  {shares}')
  out = {'benchmark': 'at_step_throughput', 'device': common.device_info(), 'versions': common.versions(),
         'setting': f'ResNet-56 (Fixup), batch {args.batch}, L∞ PGD-10 (ε 8/255, step 2/255, random start) + '
                    'one SGD update (lr 0.1, momentum 0.9, wd 5e-4), no augmentation, random weights',
         'runs': [{'command': common.command_line(), 'started_utc': started,
                   'loadavg_at_end': [round(x, 2) for x in os.getloadavg()]}],
         'results': list(rows.values())}
  common.write_results(args.out, out, ('method', 'batch', 'jax_devices'), args.merge)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  main()
