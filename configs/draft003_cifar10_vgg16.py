"""Draft 003, CIFAR-10: VGG-16 without BatchNorm, spectral normalization, adversarial training (Table 1).

    python -m arreg_jax.main --config configs/draft003_cifar10_vgg16.py --workdir runs/draft003_cifar10_vgg16 \\
        --config.data.data_dir=/path/to/folder/holding/cifar-10-batches-py

From the draft's appendix A:

* model (A.2): VGG-16 without BN, FC-4096 layers replaced by FC-512, no dropout, orthogonal initialization, Miyato
  spectral normalization on every conv and dense layer ('vgg16_sn'; arreg_jax/models/vgg.py);
* data (A.1): pad 4 + random 32×32 crop + horizontal flip; original image for testing;
* training (A.2): batch 512, 160 epochs, SGD momentum 0.9, lr 0.05 "decay every 30 epochs by 2" (×0.5 at epochs
  30, 60, 90, 120, 150), no weight decay;
* adversarial training (A.3): L∞ PGD, random start, 10 steps of 2/255, ε ∈ {4, 8, 16}/255, plus strength 0;
* evaluation (A.4): PGD-10, step 2/255, ε = 8/255, over the clean-correct test examples;
* loss variation (Fig. 3): correctly classified training examples, radii 1, 2, 4 /255 (not stated in the draft;
  the main paper's Table 1 radii), over the first 1000 of them.

Set --config.model.name=vgg19_sn for the draft's VGG-19 row on CIFAR-10.
"""

from arreg_jax import presets


def get_config(arg=None):
  return presets.from_arg(presets.spectral_norm_cifar('cifar10', 'vgg16_sn'), arg)
