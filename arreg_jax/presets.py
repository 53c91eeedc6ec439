"""Settings shared by the config files: the paper's CIFAR setting, draft 003's, and the ``:smoke`` shrinking.

Every preset starts from :func:`arreg_jax.configuration.base_config` (locked: a preset can only set known keys).
"""

from __future__ import annotations

import ml_collections

from arreg_jax.configuration import base_config
from arreg_jax.errors import ConfigError


def cifar_paper(dataset: str, model: str, attack: str = 'pgd') -> ml_collections.ConfigDict:
  """The CIFAR setting of appendix D.2/D.3 (SPEC §3): CIFAR-10/100 from the upstream files, batch 256, 200 epochs,
  SGD momentum 0.9, lr 0.05 ÷10 at epochs 100 and 150, pad-4 crop + flip; AR strengths 4, 8, 16 (ε = s/255),
  10 PGD steps of 2/255 with a random start (or FGSM for appendix B.6); PGD-10 evaluation at ε = 8/255."""
  c = base_config()
  c.paper = f'{dataset}_{model}' + ('_fgsm' if attack == 'fgsm' else '')
  c.data.name = dataset
  c.data.source = 'files'
  c.data.data_dir = 'data'
  c.model.name = model
  c.train.epochs = 200
  c.train.batch_size = 256
  c.train.learning_rate = 0.05
  c.train.lr_boundaries = (100, 150)
  c.attack.kind = attack
  c.attack.random_start = attack == 'pgd'
  if attack == 'fgsm':
    c.attack.step_size = None
    c.attack.step_size_rel = 1.0
  c.sweep = (4, 8, 16)
  return c


def spectral_norm_cifar(dataset: str, model: str) -> ml_collections.ConfigDict:
  """The CIFAR setting of draft 003's appendix A: :func:`cifar_paper` with batch 512, 160 epochs, lr 0.05 halved
  every 30 epochs, AR strengths 0, 4, 8, 16, and the loss variation on correctly classified training examples."""
  c = cifar_paper(dataset, model, attack='pgd')
  c.paper = f'draft003_{dataset}_{model.replace("_sn", "")}'
  c.train.epochs = 160
  c.train.batch_size = 512
  c.train.learning_rate = 0.05
  c.train.lr_boundaries = (30, 60, 90, 120, 150)
  c.train.lr_decay = 0.5
  c.sweep = (0, 4, 8, 16)
  c.analysis.loss_variation_split = 'train_correct'
  c.analysis.loss_variation_examples = 1000
  return c


def smoke(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks ``c`` in place to a tiny run of the same experiment (for tests and quick checks)."""
  c.data.train_size = 256
  c.data.test_size = 128
  c.train.epochs = 2
  c.train.batch_size = 64
  c.train.lr_boundaries = (1,)
  c.train.eps_ramp_epochs = min(c.train.eps_ramp_epochs, 1.0)
  c.eval.batch_size = 64
  c.eval.pgd_examples_per_epoch = 64
  c.eval.robustness.examples, c.eval.robustness.check_examples = 32, 32
  c.eval.robustness.n_targets, c.eval.robustness.square_queries = 1, 50
  c.analysis.loss_variation_examples = 64
  c.analysis.loss_variation_steps = 3
  c.analysis.boundary_screen_examples = 64
  c.analysis.boundary_refine_examples = 8
  c.analysis.boundary_rounds = 4
  c.analysis.boundary_steps = 3
  c.sweep = tuple(c.sweep)[:2]
  smoke_models = {'resnet56': 'resnet20', 'resnet110': 'resnet20', 'resnet56_bn': 'resnet20_bn',
                  'wrn50_2': 'wrn_smoke', 'lenet': 'small_cnn', 'lenet_sn': 'small_cnn_sn',
                  'vgg16': 'vgg_smoke', 'vgg19': 'vgg_smoke', 'vgg16_sn': 'vgg_smoke_sn', 'vgg19_sn': 'vgg_smoke_sn'}
  c.model.name = smoke_models.get(c.model.name, c.model.name)
  return c


def from_arg(c: ml_collections.ConfigDict, arg: str | None) -> ml_collections.ConfigDict:
  """Applies a config-file argument (``configs/x.py:ARG``): None/'' or 'smoke'."""
  if arg in (None, ''):
    return c
  if arg == 'smoke':
    return smoke(c)
  raise ConfigError(f"unknown config argument {arg!r}: use 'configs/<name>.py' or 'configs/<name>.py:smoke'")
