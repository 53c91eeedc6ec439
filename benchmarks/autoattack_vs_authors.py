r"""AutoAttack in arreg_jax against the authors' PyTorch code (fra31/auto-attack), same weights, same images.

Agreement and throughput, side by side, of
  * APGD-CE (L∞, 100 iterations, 1 restart): ``attacks.apgd(loss='ce')`` vs ``autopgd_base.APGDAttack``;
  * APGD-T (targeted DLR, 9 targets) vs ``APGDAttack_targeted`` and FAB-T (9 targets, 100 iterations, 1 restart,
    no random start) vs ``fab_pt.FABAttack_PT``: both sides attack each target on the points still robust (ours:
    ``attacks.AutoAttack(version='custom', attacks_to_run=[…], checks=False)``, the functional ``attacks.fab`` for
    FAB-T's minimum norms);
  * the standard cascade APGD-CE → APGD-T → FAB-T → Square (5000 queries): ``attacks.AutoAttack(...)
    .run_standard_evaluation`` vs the authors' ``AutoAttack(...).run_standard_evaluation``, both with their checks.
The authors' code comes from a checkout given by ``--autoattack_dir`` (it is not part of this repository).

Model: a trained arreg_jax run (``--run_dir``; the default benchmark uses the embedded MNIST default's AR 0.1 small
CNN — conv 3×3×16 → pool → conv 3×3×32 → pool → dense 128 → 10 — made by ``python -m arreg_jax.main --config
configs/mnist.py``), restored with ``checkpoints.restore_run``, its PyTorch twin built here with the same weights (HWIO →
OIHW; the NHWC flatten order kept). The logits and input gradients of both are compared first (float32, to 1e-4 of
their scale). Images: the first ``--images`` test images, as float in [0, 1]; ε = ``--eps``.

Agreement: robust accuracy after every stage (the random starts of APGD and Square differ between frameworks, so
those agree statistically; FAB-T has no random start, so its per-point norms are compared as well): FAB-T is also
run with ε = 1 (every adversarial point it finds counts) to compare the median L∞ norm of the points it finds.

Throughput: arreg_jax on the default device layout — one XLA:CPU device per core, the batch sharded over them, as
the other attack benchmarks — against PyTorch with as many threads as cores. Each side runs once to warm up (JAX
compiles there; the compile seconds are recorded), then ``--repeats`` timed runs on the same images, interleaved;
images/s = images ÷ the median timed run (and ÷ the fastest). Every timed run records the CPU share other
processes took; PyTorch's threads slow down far more than XLA's when another job takes a core, so read contended
runs as such.

  python benchmarks/autoattack_vs_authors.py --autoattack_dir /path/to/auto-attack --run_dir runs/mnist/ar0.1
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from arreg_jax import host_devices  # noqa: E402

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', 'autoattack_vs_authors_cpu.json')


def torch_twin(variables):
  """The small CNN (``arreg_jax.models.lenet.SmallCNN``) in PyTorch, NCHW, with the Flax weights."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  p = variables['params']

  class SmallCNN(nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(p['conv1']['kernel'].shape[2], p['conv1']['kernel'].shape[3], 3, padding=1)
      self.conv2 = nn.Conv2d(p['conv2']['kernel'].shape[2], p['conv2']['kernel'].shape[3], 3, padding=1)
      self.fc = nn.Linear(*p['fc1']['kernel'].shape)
      self.head = nn.Linear(*p['head']['kernel'].shape)

    def forward(self, x):
      x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
      x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
      x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # the NHWC flatten order of the JAX model
      return self.head(torch.relu(self.fc(x)))

  m = SmallCNN()
  t = lambda a: torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32)))
  with torch.no_grad():
    for name in ('conv1', 'conv2'):
      getattr(m, name).weight.copy_(t(np.transpose(p[name]['kernel'], (3, 2, 0, 1))))
      getattr(m, name).bias.copy_(t(p[name]['bias']))
    for mod, name in ((m.fc, 'fc1'), (m.head, 'head')):
      mod.weight.copy_(t(np.asarray(p[name]['kernel']).T))
      mod.bias.copy_(t(p[name]['bias']))
  for prm in m.parameters():
    prm.requires_grad_(False)
  return m.eval()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--autoattack_dir', required=True, help='a checkout of github.com/fra31/auto-attack')
  p.add_argument('--run_dir', required=True, help='a trained arreg_jax run of the small CNN (configs/mnist.py)')
  p.add_argument('--images', type=int, default=128)
  p.add_argument('--eps', type=float, default=0.2)
  p.add_argument('--repeats', type=int, default=2)
  p.add_argument('--parts', default='apgd_ce,apgd_t,fab_t,standard')
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--torch_threads', type=int, default=0, help='PyTorch threads (default: one per core)')
  p.add_argument('--jax_devices', default='auto', help="XLA:CPU devices: 'auto' (one per core) or N")
  p.add_argument('--wait_quiet', type=float, default=0.0, help='wait up to S s before each call for a quiet CPU')
  p.add_argument('--out', default=DEFAULT_OUT)
  args = p.parse_args(argv)
  # The default device layout: one XLA:CPU device per core.
  host_devices.use_every_cpu_core('auto' if args.jax_devices == 'auto' else int(args.jax_devices))

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import machine  # pylint: disable=g-import-not-at-top
  from arreg_jax import attacks, models, sharding  # pylint: disable=g-import-not-at-top
  from arreg_jax.training import checkpoints  # pylint: disable=g-import-not-at-top
  from arreg_jax.data import augment  # pylint: disable=g-import-not-at-top
  sys.path.insert(0, os.path.abspath(args.autoattack_dir))
  from autoattack import AutoAttack as AuthorsAutoAttack  # pylint: disable=g-import-not-at-top
  from autoattack.autopgd_base import APGDAttack, APGDAttack_targeted  # pylint: disable=g-import-not-at-top
  from autoattack.fab_pt import FABAttack_PT  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(args.torch_threads or host_devices.cpu_cores())

  config, module, variables, ds, _ = checkpoints.restore_run(args.run_dir)
  n = args.images
  x = np.asarray(augment.preprocess(None, jnp.asarray(ds.test_images[:n]), kind=ds.augment, train=False))
  y = np.asarray(ds.test_labels[:n], np.int32)
  pair = types.SimpleNamespace(apply_fn=models.inference_apply(module), params=variables)
  tmodel = torch_twin(jax.device_get(variables))
  xt, yt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), torch.from_numpy(y.astype(np.int64))

  # Same function first: logits and the input gradient of the summed CE.
  zj = np.asarray(pair.apply_fn(variables, x))
  gj = np.asarray(jax.grad(lambda z: attacks.cross_entropy_sum(lambda u: pair.apply_fn(variables, u), z, y))(x))
  xg = xt.clone().requires_grad_()
  zt = tmodel(xg)
  gt, = torch.autograd.grad(torch.nn.functional.cross_entropy(zt, yt, reduction='sum'), xg)
  equivalence = {'logits_max_abs_err': float(np.abs(zj - zt.detach().numpy()).max()),
                 'logits_max_abs': float(np.abs(zj).max()),
                 'grad_max_abs_err': float(np.abs(gj - gt.numpy().transpose(0, 2, 3, 1)).max()),
                 'grad_max_abs': float(np.abs(gj).max())}
  print('equivalence (float32):', equivalence, flush=True)
  # Logits must agree; input gradients differ where max-pooling ties (ReLU zeros): JAX splits the gradient among
  # tied maxima, PyTorch routes it to one.
  assert equivalence['logits_max_abs_err'] <= 1e-4 * max(1.0, equivalence['logits_max_abs'])

  eps, key = args.eps, jax.random.key(args.seed)
  mesh = sharding.make_mesh()
  data = sharding.batch_sharding(mesh)
  pair.params = jax.device_put(variables, sharding.replicated(mesh))  # the batch is sharded, the weights replicated
  xs, ys = jax.device_put(x, data), jax.device_put(y, data)
  lines = []

  def linf(a, b):
    return np.abs(np.asarray(a, np.float32).reshape(len(b), -1) - np.asarray(b).reshape(len(b), -1)).max(1)

  def jax_robust(adv):
    return np.asarray(jnp.argmax(pair.apply_fn(variables, np.asarray(adv)), -1)) == y

  def torch_robust(adv):
    with torch.no_grad():
      return (tmodel(adv).argmax(1) == yt).numpy()

  # Each part: (ours, authors'), each returning (per-point robust mask, the adversarial images as NHWC numpy).
  def ours(part, e):
    if part == 'standard':
      adv, res = attacks.AutoAttack(pair, norm='Linf', eps=e, version='standard', seed=args.seed,
                                    mesh=mesh, log=lines.append).run_standard_evaluation(x, y, bs=n)
      return res.robust, adv, res.stages
    if part == 'apgd_ce':  # one run: the functional attack on the whole batch
      adv = np.asarray(jax.block_until_ready(attacks.apgd(pair, xs, ys, key, eps=e, loss='ce')))
      return jax_robust(adv) & (np.asarray(jnp.argmax(pair.apply_fn(variables, x), -1)) == y), adv, None
    # Targeted attacks as the authors' classes run them: each target on the points still robust (the front end).
    adv, res = attacks.AutoAttack(pair, norm='Linf', eps=e, version='custom', attacks_to_run=[part], seed=args.seed,
                                  mesh=mesh, checks=False, verbose=False).run_standard_evaluation(x, y, bs=n)
    return res.robust, adv, None

  def authors(part, e):
    if part == 'standard':
      aa = AuthorsAutoAttack(tmodel, norm='Linf', eps=e, version='standard', seed=args.seed, device='cpu')
      aa.logger.log = lambda s: lines.append(s)
      adv = aa.run_standard_evaluation(xt, yt, bs=n)
      stages = {}
      for line in lines:
        if 'robust accuracy after' in line:
          stages[line.split('after ')[1].split(':')[0].lower()] = float(line.split(': ')[1].split('%')[0]) / 100
    else:
      stages = None
      if part == 'apgd_ce':
        atk = APGDAttack(tmodel, n_iter=100, norm='Linf', n_restarts=1, eps=e, seed=args.seed, loss='ce', rho=.75,
                         device='cpu')
      elif part == 'apgd_t':
        atk = APGDAttack_targeted(tmodel, n_iter=100, norm='Linf', n_restarts=1, eps=e, seed=args.seed,
                                  device='cpu')
        atk.n_target_classes = 9
      else:
        atk = FABAttack_PT(tmodel, norm='Linf', n_restarts=1, n_iter=100, eps=e, seed=args.seed, targeted=True,
                           device='cpu', n_target_classes=9)
      adv = atk.perturb(xt, yt)
    clean = torch_robust(xt)
    return torch_robust(adv) & clean, adv.detach().numpy().transpose(0, 2, 3, 1), stages

  results = []
  for part in args.parts.split(','):
    row = {'part': part, 'eps': eps, 'images': n,
           'layout': f'{mesh.size} XLA:CPU device(s) vs {torch.get_num_threads()} PyTorch thread(s)'}
    t0 = time.perf_counter()
    ours(part, eps)
    row['arreg_jax_compile_and_first_call_s'] = round(time.perf_counter() - t0, 2)
    authors(part, eps)  # warm-up
    times = {'arreg_jax': [], 'authors': []}
    others = {'arreg_jax': [], 'authors': []}
    for _ in range(args.repeats):
      for side, fn in (('arreg_jax', ours), ('authors', authors)):
        if args.wait_quiet:
          machine.wait_for_quiet(args.wait_quiet)
        lines.clear()
        with machine.CpuShare() as share:
          robust, adv, stages = fn(part, eps)
        times[side].append(round(share.wall, 3))
        others[side].append(share.others)
        row[side] = {'robust_accuracy': round(float(np.mean(robust)), 4), 'max_linf': float(linf(adv, x).max())}
        if stages:
          row[side]['stages'] = {k.replace('-', '_'): round(v, 4) for k, v in stages.items()}
        if part == 'fab_t':
          row[side]['_norms'] = linf(adv, x)
        print(f'[{side}] {part}: {share.wall:.2f} s, robust {np.mean(robust):.4f}, others {share.others}',
              flush=True)
    for side in ('arreg_jax', 'authors'):
      row[side].update({'seconds': times[side], 'others_cpu_share': others[side],
                        'images_per_s': round(n / statistics.median(times[side]), 2),
                        'images_per_s_best': round(n / min(times[side]), 2)})
    row['ratio_images_per_s'] = round(row['arreg_jax']['images_per_s'] / row['authors']['images_per_s'], 3)
    row['robust_accuracy_diff_points'] = round(
        100 * (row['arreg_jax']['robust_accuracy'] - row['authors']['robust_accuracy']), 2)
    if part == 'fab_t':  # FAB-T's minimum norms: with ε = 1 every adversarial point found counts
      found = {}
      for side, fn in (('arreg_jax', lambda p_, e: (None, np.asarray(attacks.fab(pair, xs, ys, key, eps=e)), None)),
                       ('authors', authors)):
        _, adv, _ = fn(part, 1.0)
        found[side] = linf(adv, x)
        row[side].pop('_norms', None)
      both = (found['arreg_jax'] > 0) & (found['authors'] > 0)
      row['fab_t_min_norm'] = {
          'found_arreg_jax': int((found['arreg_jax'] > 0).sum()), 'found_authors': int((found['authors'] > 0).sum()),
          'median_linf_arreg_jax': float(np.median(found['arreg_jax'][found['arreg_jax'] > 0])),
          'median_linf_authors': float(np.median(found['authors'][found['authors'] > 0])),
          'per_point_max_rel_diff': float(np.max(np.abs(found['arreg_jax'][both] - found['authors'][both])
                                                 / found['authors'][both])) if both.any() else None,
          'per_point_median_rel_diff': float(np.median(np.abs(found['arreg_jax'][both] - found['authors'][both])
                                                       / found['authors'][both])) if both.any() else None}
    results.append(row)

  print_table(results)
  aa_commit = machine.git_commit(args.autoattack_dir)
  out = {
      'benchmark': "AutoAttack (APGD-CE, APGD-T, FAB-T, standard cascade): arreg_jax vs the authors' PyTorch code",
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': machine.command_line(), 'device': machine.device_info(), 'versions': machine.versions(),
      'autoattack_commit': aa_commit, 'runs': [machine.command_line()],
      'config': {'model': f'{config.model.name} from {os.path.basename(os.path.normpath(args.run_dir))} '
                          f'(trained, {config.data.name})', 'images': n, 'eps': eps, 'norm': 'Linf',
                 'jax_devices': mesh.size, 'torch_threads': torch.get_num_threads(), 'repeats': args.repeats,
                 'seed': args.seed},
      'equivalence': equivalence, 'results': results,
  }
  machine.write_results(args.out, out, key_fields=('part', 'eps', 'images', 'layout'), merge=True)


def print_table(results):
  head = ['part', 'layout', 'img/s arreg_jax', 'img/s authors', 'ratio', 'robust arreg_jax', 'robust authors']
  print(' | '.join(head))
  for r in results:
    print(' | '.join([r['part'], r['layout'], f'{r["arreg_jax"]["images_per_s"]:.2f}', f'{r["authors"]["images_per_s"]:.2f}',
                      f'{r["ratio_images_per_s"]:.2f}', f'{100 * r["arreg_jax"]["robust_accuracy"]:.2f}%',
                      f'{100 * r["authors"]["robust_accuracy"]:.2f}%']))
    if 'fab_t_min_norm' in r:
      print('   FAB-T minimum norms:', r['fab_t_min_norm'])
    if 'stages' in r['arreg_jax']:
      print('   stages arreg_jax:', r['arreg_jax']['stages'], ' authors:', r['authors'].get('stages'))


if __name__ == '__main__':
  main()
