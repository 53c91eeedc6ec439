"""Draft 003's published numbers (its appendix Table 1) and the report table in its layout.

Draft 003 ("Sample-wise Adversarial Robustness Regularizes Neural Networks") reports, per defensive strength
(the training ε in units of 1/255), three rows: **Acc.** — clean test accuracy (%), **GE** — the loss gap between
test and training loss, **PGD** — accuracy (%) under the PGD attack of its appendix A.4 (MNIST ε = 76.5/255, CIFAR
ε = 8/255). All networks use Miyato spectral normalization and no BatchNorm: LeNet on MNIST, VGG-16/19 on CIFAR.
(Its Table 2, Tiny-ImageNet WRN with SN, is not reproduced by a config here.)
"""

from __future__ import annotations

import math

# {paper key: (title, {strength: (acc %, GE, PGD %)})}
TABLE1 = {
    'draft003_mnist_lenet': ('MNIST, LeNet + SP (draft 003, Table 1)', {
        0.0: (99.42, 0.0154, 45.93), 51.0: (99.51, 0.0126, 91.88), 76.5: (99.38, 0.0124, 95.12),
        102.0: (99.17, 0.0116, 95.73)}),
    'draft003_cifar10_vgg16': ('CIFAR-10, VGG16 + Adv Trn + SP (draft 003, Table 1)', {
        0.0: (86.50, 0.710, 6.91), 4.0: (86.25, 0.518, 42.53), 8.0: (84.56, 0.475, 52.58),
        16.0: (80.46, 0.324, 55.75)}),
    'draft003_cifar10_vgg19': ('CIFAR-10, VGG19 + Adv Trn + SP (draft 003, Table 1)', {
        0.0: (84.77, 0.683, 13.77), 4.0: (84.56, 0.433, 42.89), 8.0: (83.44, 0.442, 51.85),
        16.0: (78.96, 0.365, 55.40)}),
    'draft003_cifar100_vgg16': ('CIFAR-100, VGG16 + Adv Trn + SP (draft 003, Table 1)', {
        0.0: (49.27, 0.989, 1.55), 4.0: (49.94, 1.160, 11.85), 8.0: (48.08, 1.012, 16.67),
        16.0: (46.44, 0.835, 19.36)}),
    'draft003_cifar100_vgg19': ('CIFAR-100, VGG19 + Adv Trn + SP (draft 003, Table 1)', {
        0.0: (43.26, 1.420, 0.61), 4.0: (43.35, 1.433, 10.68), 8.0: (42.83, 1.325, 16.59),
        16.0: (42.31, 1.020, 17.71)}),
}


def paper_key(paper: str | None, model: str | None) -> str | None:
  """The Table 1 entry of a run: its ``config.paper``, with the model's depth if the run changed the model."""
  if not paper or not paper.startswith('draft003_'):
    return None
  if paper.startswith('draft003_cifar') and model:
    depth = 'vgg19' if model.startswith('vgg19') else 'vgg16' if model.startswith('vgg16') else None
    if depth:
      dataset = paper.split('_')[1]
      return f'draft003_{dataset}_{depth}'
  return paper if paper in TABLE1 else None


def _f(v, fmt):
  return '—' if v is None or (isinstance(v, float) and not math.isfinite(v)) else fmt.format(v)


def table(rows: list[dict], key: str | None) -> str:
  """Markdown in the layout of draft 003's Table 1: one column per defensive strength, rows Acc. / GE / PGD, ours
  and (when ``key`` is known) the draft's. ``rows`` are final rows (``trainer.final_row``: strength, test_acc
  in %, loss_gap, pgd_acc in %)."""
  rows = sorted(rows, key=lambda r: r['strength'])
  pub = TABLE1.get(key, (None, {}))[1] if key else {}
  strengths = [r['strength'] for r in rows]
  head = '| | | ' + ' | '.join(f'{s:g}' for s in strengths) + ' |'
  out = [head.replace('| | |', '| | defensive strength →|', 1), '|---|---|' + '---|' * len(strengths)]
  for name, field, fmt, idx in (('Acc.', 'test_acc', '{:.2f}', 0), ('GE', 'loss_gap', '{:.4f}', 1),
                                ('PGD', 'pgd_acc', '{:.2f}', 2)):
    out.append(f'| ours | {name} | ' + ' | '.join(_f(r.get(field), fmt) for r in rows) + ' |')
    if pub:
      out.append(f'| draft | {name} | ' + ' | '.join(_f(pub[s][idx] if s in pub else None, fmt)
                                                    for s in strengths) + ' |')
  return '\n'.join(out) + '\n'


def section(rows: list[dict], paper: str | None, model: str | None, pgd_eps: float | None) -> str:
  key = paper_key(paper, model)
  if key is None:
    return ''
  title = TABLE1.get(key, (key, {}))[0]
  eps = f' at ε = {pgd_eps * 255:.3g}/255' if pgd_eps else ''
  return ('## Draft 003, Tables 1–2 layout\n\n'
          f'The layout of the draft\'s Table 1 ({title}): per defensive strength (training ε in units of 1/255), '
          'Acc. = clean test accuracy (%), GE = test loss − training loss, PGD = accuracy (%) under PGD'
          f'{eps} over the clean-correct test examples (the draft\'s appendix A.4 describes two conventions; we use '
          'the main paper\'s). "draft" rows are the published numbers.\n\n' + table(rows, key))
