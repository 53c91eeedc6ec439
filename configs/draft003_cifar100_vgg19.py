"""Draft 003, CIFAR-100: VGG-19 without BatchNorm, spectral normalization, adversarial training (Table 1).

    python -m arreg_jax.main --config configs/draft003_cifar100_vgg19.py --workdir runs/draft003_cifar100_vgg19 \\
        --config.data.data_dir=/path/to/folder/holding/cifar-100-python

Same settings as configs/draft003_cifar10_vgg16.py (appendix A of the draft: batch 512, 160 epochs, lr 0.05 halved
every 30 epochs, PGD-10 of 2/255 at ε ∈ {0, 4, 8, 16}/255, Miyato SN, orthogonal init, no BN/dropout), with VGG-19
('vgg19_sn', 100 outputs) on CIFAR-100. Set --config.model.name=vgg16_sn for the draft's VGG-16 row on CIFAR-100.
"""

from arreg_jax import presets


def get_config(arg=None):
  return presets.from_arg(presets.spectral_norm_cifar('cifar100', 'vgg19_sn'), arg)
