"""CIFAR-10 ResNet-56 with spectral clipping every epoch, c ∈ {1, 3, 5, none} × AR 4, 8, 16 — Table 6 / Fig. 6.

    python -m arreg_jax.main --config configs/cifar10_resnet56_sn.py --workdir runs/cifar10_resnet56_sn \\
        --config.data.data_dir=/path/to/folder/holding/cifar-10-batches-py

As configs/cifar10_resnet56.py, plus: after the last step of every epoch each layer's singular values (conv layers
through the FFT of their kernels at the input size they see, Sedghi et al. 2019) are clipped at c (appendix B.4.2,
D.3). Twelve runs, in ar<s>_sp<c>/. config.spectral.rounds sets the project-and-clip rounds per conv kernel.
"""

from arreg_jax import presets


def get_config(arg=None):
  c = presets.cifar_paper('cifar10', 'resnet56', attack='pgd')
  c.paper = 'cifar10_resnet56_sn'
  c.spectral.sweep = (1.0, 3.0, 5.0, None)
  c.spectral.every_epochs = 1
  c.spectral.rounds = 1
  return presets.from_arg(c, arg)
