"""CIFAR10 ResNet-56 (Fixup, no BatchNorm), L∞ PGD-10 adversarial training at AR 4, 8, 16 — Table 3 of the paper.

    python -m arreg_jax.main --config configs/cifar10_resnet56.py --workdir runs/cifar10_resnet56 \
        --config.data.data_dir=/path/to/folder/holding/cifar-10-batches-py

Hyper-parameters (appendix D.2/D.3): batch 256, 200 epochs, SGD momentum 0.9, lr 0.05 ÷10 at epochs 100 and 150,
no weight decay, pad-4 crop + flip; attack ε = s/255, 10 steps of 2/255, random start; PGD-10 (ε = 8/255) accuracy
over clean-correct test images. Append :smoke to the config path for a one-minute check of the same pipeline.
"""

from arreg_jax import presets


def get_config(arg=None):
  c = presets.cifar_paper('cifar10', 'resnet56', attack='pgd')
  return presets.from_arg(c, arg)
