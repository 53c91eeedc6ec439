r"""APGD-CE throughput and robust accuracy: arreg_jax's ``attacks.apgd`` against the authors' PyTorch APGD.

APGD-CE (Croce & Hein, ICML 2020), L∞, ε = 8/255 (``--eps``), 100 iterations, 1 restart, on the same model and
inputs in both frameworks:
  * ``arreg_jax``: ``arreg_jax.attacks.apgd(loss='ce')`` in one ``jax.jit`` (the iterations in a ``lax.fori_loop``);
  * ``authors``: ``autoattack.autopgd_base.APGDAttack(n_iter=100, norm='Linf', loss='ce', rho=0.75)``, imported from
    a checkout of https://github.com/fra31/auto-attack given by ``--autoattack_dir`` (its code is not part of this
    repository), run on the PyTorch twin of the model (``torch_models.py``) with the JAX weights copied in.

The model is ``--model`` (default ResNet-20, Fixup without BatchNorm) with random, non-zero weights, as
``attack_throughput.py`` draws them, and its head recalibrated on 64 random images so that each logit has mean 0 and
standard deviation 1 over inputs (a random deep ResNet otherwise gives every input the same class by a margin no
small perturbation can flip, and every robust accuracy would be a trivial 100%). The equivalence check of
``attack_throughput.py`` (float64: logits, input gradients and PGD without random start agree to 1e-6) runs first.
Inputs: uniform random 32×32 images labelled with the model's own clean prediction (so every point is clean-correct
and both attacks run on the whole batch). ``--eps`` takes a list: 8/255 (the paper's) breaks every point of this
undefended model, so 0.5/255, where about half survive, is the informative comparison of robust accuracies.

Timing: one warm-up call of each side (JAX compiles there), then ``--batches`` batches of ``--batch`` images, each
attacked by both sides in turn (interleaved, so load from other processes hits both alike); images/s = images ÷
the sum of the timed calls. The robust accuracy of each side is over the same ``--batches × --batch`` images (the
random starts differ, so they agree statistically, not exactly). For every call the share of the CPU other processes
used is recorded, and the load average (``uptime``) at the start and end.

  python benchmarks/apgd_throughput.py --autoattack_dir /path/to/auto-attack --batch 32 --batches 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import attack_throughput as at  # noqa: E402
import machine  # noqa: E402
from arreg_jax import attacks  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'apgd_throughput_cpu.json')


def _uptime() -> str:
  with open('/proc/loadavg') as f:
    return f.read().strip()


def calibrate_head(module, variables, images):
  """``variables`` with the Dense head rescaled and shifted so each logit has mean 0 and std 1 over ``images``."""
  z = np.asarray(jax.jit(module.apply)(variables, images), np.float64)  # compiled once, not op by op
  scale = 1.0 / z.std(0).mean()
  head = variables['params']['head']
  new_head = {'kernel': jnp.asarray(np.asarray(head['kernel']) * scale, jnp.float32),
              'bias': jnp.asarray((np.asarray(head['bias']) - z.mean(0)) * scale, jnp.float32)}
  return {**variables, 'params': {**variables['params'], 'head': new_head}}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--autoattack_dir', required=True, help='a checkout of github.com/fra31/auto-attack')
  p.add_argument('--model', default='resnet20')
  p.add_argument('--batch', type=int, default=32)
  p.add_argument('--batches', type=int, default=2)
  p.add_argument('--eps', default='8/255,0.5/255', help='comma-separated radii, e.g. 8/255,0.5/255')
  p.add_argument('--steps', type=int, default=100)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--wait_quiet', type=float, default=0.0, help='wait up to S s before each call for a quiet CPU')
  p.add_argument('--out', default=DEFAULT_OUT)
  args = p.parse_args(argv)

  import torch  # pylint: disable=g-import-not-at-top
  import torch_models  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(args.autoattack_dir))
  from autoattack.autopgd_base import APGDAttack  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  load_start = _uptime()

  name = args.model
  at.NUM_CLASSES.setdefault(name, 10)
  at.INPUT_SIZE.setdefault(name, 32)
  rng = np.random.default_rng(args.seed)
  size = at.INPUT_SIZE[name]
  calib = rng.random((8, size, size, 3), dtype=np.float32)
  module, variables = at.random_variables(name, jax.random.key(args.seed), calib)
  variables = calibrate_head(module, variables, rng.random((64, size, size, 3), dtype=np.float32))
  eps_list = [float(eval(e, {}, {})) for e in args.eps.split(',')]  # pylint: disable=eval-used
  tmodel = torch_models.build(name, at.NUM_CLASSES[name], jax.device_get(variables))
  for prm in tmodel.parameters():
    prm.requires_grad_(False)
  equivalence = at.check_equivalence(name, module, variables, tmodel, 4, args.seed)

  logits_jax = jax.jit(lambda v, x: module.apply(v, x))
  n = args.batch * (args.batches + 1)  # batch 0: warm-up
  images = rng.random((n, size, size, 3), dtype=np.float32)
  labels = np.asarray(jnp.argmax(logits_jax(variables, images), -1)).astype(np.int32)

  # eps is an argument of the compiled program: one compilation serves every radius.
  jax_apgd = jax.jit(lambda v, x, y, k, e: attacks.apgd(lambda z: module.apply(v, z), x, y, k, eps=e,
                                                        steps=args.steps, loss='ce'))
  def run_jax(b, eps):
    x, y = images[b * args.batch:(b + 1) * args.batch], labels[b * args.batch:(b + 1) * args.batch]
    adv = jax_apgd(variables, x, y, jax.random.key(args.seed + b), jnp.float32(eps))
    adv.block_until_ready()
    return np.asarray(jnp.argmax(logits_jax(variables, adv), -1) == y), float(np.abs(np.asarray(adv) - x).max())

  def run_authors(b, eps):
    x, y = images[b * args.batch:(b + 1) * args.batch], labels[b * args.batch:(b + 1) * args.batch]
    xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
    yt = torch.from_numpy(y.astype(np.int64))
    attack = APGDAttack(tmodel, n_iter=args.steps, norm='Linf', n_restarts=1, eps=eps, seed=args.seed + b,
                        loss='ce', rho=0.75, device='cpu')
    adv = attack.perturb(xt, yt)
    with torch.no_grad():
      ok = (tmodel(adv).argmax(1) == yt).numpy()
    return ok, float((adv.detach() - xt).abs().max())

  t0 = time.perf_counter()
  run_jax(0, eps_list[0])
  compile_s = time.perf_counter() - t0
  run_authors(0, eps_list[0])
  results = []
  for eps in eps_list:
    rows = {m: {'seconds': [], 'robust': [], 'linf': [], 'others_cpu_share': []} for m in ('arreg_jax', 'authors')}
    for b in range(1, args.batches + 1):
      for m, fn in (('arreg_jax', run_jax), ('authors', run_authors)):
        if args.wait_quiet:
          at.wait_for_quiet(args.wait_quiet)
        with at.CpuShare() as share:
          ok, linf = fn(b, eps)
        r = rows[m]
        r['seconds'].append(round(share.wall, 3))
        r['robust'].extend(bool(v) for v in ok)
        r['linf'].append(linf)
        r['others_cpu_share'].append(share.others)
        print(f'[{m}] ε = {eps * 255:.2f}/255, batch {b}: {share.wall:.2f} s, robust {ok.mean():.3f}, '
              f'max |δ|∞ {linf:.5f}, other processes {share.others}', flush=True)
    res = {'eps': eps, 'eps_times_255': round(eps * 255, 4)}
    for m, r in rows.items():
      res[m] = {'images_per_s': round(args.batch * args.batches / sum(r['seconds']), 3),
                'robust_accuracy': round(float(np.mean(r['robust'])), 4), 'seconds_per_batch': r['seconds'],
                'max_linf': max(r['linf']), 'others_cpu_share': r['others_cpu_share']}
    res['ratio_images_per_s'] = round(res['arreg_jax']['images_per_s'] / res['authors']['images_per_s'], 3)
    res['robust_accuracy_diff_points'] = round(
        100 * (res['arreg_jax']['robust_accuracy'] - res['authors']['robust_accuracy']), 2)
    results.append(res)

  aa_commit = machine.git_commit(args.autoattack_dir)
  out = {
      'benchmark': 'APGD-CE L∞ throughput and robust accuracy, arreg_jax vs the authors\' PyTorch APGD',
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': at.command_line(), 'device': at.device_info(), 'versions': at.versions(),
      'autoattack_commit': aa_commit,
      'config': {'model': name, 'weights': 'random non-zero (attack_throughput.random_variables)',
                 'head': 'recalibrated: logits mean 0, std 1 over 64 random images',
                 'inputs': 'uniform random, labels = clean prediction', 'eps': eps_list, 'steps': args.steps,
                 'restarts': 1, 'batch': args.batch, 'timed_batches': args.batches, 'seed': args.seed},
      'load_average_start': load_start, 'load_average_end': _uptime(),
      'jax_compile_and_first_call_s': round(compile_s, 2), 'equivalence': equivalence, 'results': results,
  }
  at.write_results(args.out, out, key_fields=('eps',), merge=False)  # machine.write_results
  print(json.dumps(results, indent=1))


if __name__ == '__main__':
  main()
