"""CIFAR10 ResNet-56 (Fixup, no BatchNorm), FGSM adversarial training at AR 4, 8, 16 — appendix B.6, Table 2.

    python -m arreg_jax.main --config configs/cifar10_resnet56_fgsm.py --workdir runs/cifar10_resnet56_fgsm \
        --config.data.data_dir=/path/to/folder/holding/cifar-10-batches-py

As configs/cifar10_resnet56.py, but the training attack is one FGSM step of size ε = s/255 from the clean image (no
random start). Evaluation is still PGD-10 at ε = 8/255.
"""

from arreg_jax import presets


def get_config(arg=None):
  c = presets.cifar_paper('cifar10', 'resnet56', attack='fgsm')
  return presets.from_arg(c, arg)
