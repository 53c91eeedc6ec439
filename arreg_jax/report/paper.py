"""The published numbers of Wen, Li & Jia (ICML 2020) for side-by-side reports (SPEC §7; paper appendix D).

Keyed by ``config.paper``. Each :class:`PaperExperiment` holds the table of final metrics per AR ("defensive")
strength in the columns of Tables 2–6 — train/test accuracy (%), ΔAcc = train − test, train/test cross-entropy,
ΔLoss = test − train, PGD accuracy (% of the clean-correct test examples still correct after PGD-10, ε = 8/255) —
and, where the paper has them, the loss variation of Table 1 (mean ± std of the maximal loss increase in an L∞
ball of ε = 1, 2, 4 /255, appendix B.5), the spectral-clipping grid of Table 6, and the singular-value STD
comparison of appendix B.2. Table 2 (FGSM training) reports four of the seven columns only.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

COLUMNS = ('train_acc', 'test_acc', 'acc_gap', 'train_loss', 'test_loss', 'loss_gap', 'pgd_acc')
# Row labels of the paper's tables, in its order.
LABELS = {'train_acc': 'Trn Acc. (%)', 'test_acc': 'Test Acc. (%)', 'acc_gap': 'ΔAcc. (%)',
          'train_loss': 'Trn Loss', 'test_loss': 'Test Loss', 'loss_gap': 'ΔLoss', 'pgd_acc': 'PGD (%)'}
FGSM_COLUMNS = ('test_acc', 'train_loss', 'test_loss', 'loss_gap')

Row = Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class PaperExperiment:
  """One experiment of the paper.

  Attributes:
    key: the ``config.paper`` value.
    title: what was trained.
    table: where the final metrics are published.
    rows: AR strength -> {column: value} (only the columns the paper reports).
    loss_variation: AR strength -> ((mean, std) at ε = 1, 2, 4 /255), Table 1; empty if not published.
    loss_variation_eps_255: the attack radii of ``loss_variation`` in units of 1/255.
    spectral_clipping: clip c (None = uncontrolled) -> AR strength -> row, Table 6; empty if not published.
    sv_std_comparison: appendix B.2 (AR 4 vs AR 16): sums and means of the STD decreases and increases.
  """
  key: str
  title: str
  table: str
  rows: Mapping[float, Row]
  loss_variation: Mapping[float, tuple[tuple[float, float], ...]] = dataclasses.field(default_factory=dict)
  loss_variation_eps_255: tuple[float, ...] = (1.0, 2.0, 4.0)
  spectral_clipping: Mapping[float | None, Mapping[float, Row]] = dataclasses.field(default_factory=dict)
  sv_std_comparison: Mapping[str, float] = dataclasses.field(default_factory=dict)
  note: str = ''


def _row(values: tuple[float, ...], columns: tuple[str, ...] = COLUMNS) -> dict[str, float]:
  assert len(values) == len(columns), (values, columns)
  return dict(zip(columns, values))


def _rows(strengths: tuple[float, ...], *values: tuple[float, ...], columns=COLUMNS) -> dict[float, dict]:
  return {float(s): _row(v, columns) for s, v in zip(strengths, values)}


_AR = (4.0, 8.0, 16.0)

_TABLE6 = {
    1.0: _rows(_AR, (96.91, 90.47, 6.44, 0.092, 0.316, 0.224, 57.93),
               (94.38, 88.87, 5.51, 0.159, 0.353, 0.194, 69.98),
               (90.58, 85.82, 4.76, 0.265, 0.432, 0.168, 75.98)),
    3.0: _rows(_AR, (99.65, 90.02, 9.63, 0.010, 0.606, 0.596, 56.83),
               (98.51, 88.07, 10.44, 0.039, 0.580, 0.541, 67.73),
               (95.94, 85.43, 10.51, 0.107, 0.577, 0.470, 73.41)),
    5.0: _rows(_AR, (99.57, 89.53, 10.04, 0.012, 0.649, 0.638, 54.91),
               (98.33, 88.09, 10.24, 0.045, 0.602, 0.557, 65.96),
               (95.96, 85.32, 10.64, 0.105, 0.611, 0.506, 72.37)),
    None: _rows(_AR, (99.51, 88.86, 10.65, 0.014, 0.683, 0.669, 65.92),
                (98.45, 87.51, 10.94, 0.043, 0.649, 0.606, 65.24),
                (95.97, 84.89, 11.08, 0.105, 0.650, 0.545, 72.16)),
}

_CIFAR10_R56 = PaperExperiment(
    key='cifar10_resnet56', title='CIFAR-10, ResNet-56 (Fixup, no BN), PGD adversarial training', table='Table 3',
    rows=_TABLE6[None],
    loss_variation={4.0: ((0.0273, 0.0989), (0.0590, 0.1637), (0.1337, 0.2494)),
                    8.0: ((0.0236, 0.0778), (0.0477, 0.1337), (0.1006, 0.2137)),
                    16.0: ((0.0215, 0.0588), (0.0443, 0.1102), (0.0888, 0.1816))},
    spectral_clipping=_TABLE6,
    sv_std_comparison={'decrease_sum': 4.7465, 'decrease_mean': 0.1158, 'increase_sum': 0.4372,
                       'increase_mean': 0.0312})

EXPERIMENTS: dict[str, PaperExperiment] = {
    'cifar10_resnet56': _CIFAR10_R56,
    # The Table 6 sweep (spectral clipping × AR) of the same network; its uncontrolled column is Table 3's.
    'cifar10_resnet56_sn': dataclasses.replace(_CIFAR10_R56, key='cifar10_resnet56_sn', table='Table 6'),
    'cifar100_resnet56': PaperExperiment(
        key='cifar100_resnet56', title='CIFAR-100, ResNet-56 (Fixup, no BN), PGD adversarial training',
        table='Table 4',
        rows=_rows(_AR, (88.73, 61.31, 27.42, 0.357, 2.063, 1.706, 30.52),
                   (86.97, 60.87, 26.10, 0.413, 2.106, 1.693, 40.99),
                   (82.17, 59.43, 22.74, 0.570, 1.978, 1.408, 48.81)),
        loss_variation={4.0: ((0.0550, 0.1276), (0.1072, 0.2138), (0.1868, 0.2946)),
                        8.0: ((0.0430, 0.1043), (0.0839, 0.1802), (0.1563, 0.2712)),
                        16.0: ((0.0379, 0.0886), (0.0732, 0.1568), (0.1355, 0.2494))},
        # As printed; the paper repeats CIFAR-10's increase sum (0.4372) here although its mean (0.1103) differs.
        sv_std_comparison={'decrease_sum': 3.7511, 'decrease_mean': 0.09618, 'increase_sum': 0.4372,
                           'increase_mean': 0.1103}),
    'cifar10_resnet110': PaperExperiment(
        key='cifar10_resnet110', title='CIFAR-10, ResNet-110 (Fixup, no BN), PGD adversarial training',
        table='Table 3',
        rows=_rows(_AR, (99.95, 89.20, 10.75, 0.002, 0.825, 0.823, 58.02),
                   (99.62, 87.09, 12.53, 0.010, 0.813, 0.803, 66.94),
                   (98.42, 85.02, 13.40, 0.044, 0.729, 0.685, 72.40))),
    'cifar100_resnet110': PaperExperiment(
        key='cifar100_resnet110', title='CIFAR-100, ResNet-110 (Fixup, no BN), PGD adversarial training',
        table='Table 4',
        rows=_rows(_AR, (96.91, 61.48, 35.43, 0.098, 2.645, 2.547, 33.33),
                   (94.55, 61.26, 33.29, 0.171, 2.413, 2.241, 42.08),
                   (90.90, 59.56, 31.34, 0.278, 2.323, 2.045, 50.99))),
    'cifar10_resnet56_fgsm': PaperExperiment(
        key='cifar10_resnet56_fgsm', title='CIFAR-10, ResNet-56, FGSM adversarial training (appendix B.6)',
        table='Table 2',
        rows=_rows(_AR, (89.32, 0.038, 0.467, 0.429), (86.67, 0.086, 0.495, 0.409), (82.83, 0.252, 0.637, 0.385),
                   columns=FGSM_COLUMNS)),
    'cifar100_resnet56_fgsm': PaperExperiment(
        key='cifar100_resnet56_fgsm', title='CIFAR-100, ResNet-56, FGSM adversarial training (appendix B.6)',
        table='Table 2',
        rows=_rows(_AR, (62.01, 0.469, 1.776, 1.307), (59.78, 0.656, 1.723, 1.067), (56.30, 0.822, 1.797, 0.975),
                   columns=FGSM_COLUMNS)),
    'tiny_imagenet_wrn50_2': PaperExperiment(
        key='tiny_imagenet_wrn50_2', title='Tiny-ImageNet, WRN-50-2 (BN), PGD adversarial training',
        table='Table 5',
        rows=_rows((0.0, 4.0, 8.0, 16.0), (79.12, 63.43, 15.69, 0.874, 1.561, 0.687, 0.00),
                   (73.71, 62.09, 11.62, 1.080, 1.637, 0.557, 32.26), (66.17, 61.09, 5.08, 1.384, 1.689, 0.305, 41.20),
                   (60.73, 57.36, 3.37, 1.641, 1.806, 0.165, 53.12))),
}


def get(key: str | None) -> PaperExperiment | None:
  """The experiment named by ``config.paper``, or None (no published numbers to compare with)."""
  return EXPERIMENTS.get(key) if key else None
