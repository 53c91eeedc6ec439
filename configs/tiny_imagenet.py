"""Tiny-ImageNet, WRN-50-2 (BatchNorm), L∞ PGD-10 adversarial training at AR 0, 4, 8, 16 — Table 5 of the paper.

    python -m arreg_jax.main --config configs/tiny_imagenet.py --workdir runs/tiny_imagenet \
        --config.data.data_dir=/path/to/folder/holding/tiny-imagenet-200

The images are decoded once into a cached array file (config.data.cache_dir, default ~/.cache/arreg_jax).
Hyper-parameters (appendix D.2): batch 256, 90 epochs, SGD momentum 0.9, lr 0.1 ÷10 at epochs 30 and 60; random
resized 56×56 crops (scale and aspect-ratio jitter) + flips for training, one 56×56 center crop for testing; attack
ε = s/255, 10 steps of 2/255, random start, BatchNorm in inference mode during the attack (config.attack.bn_mode);
PGD-10 (ε = 8/255) accuracy over clean-correct validation images.

WRN-50-2 at batch 256 with PGD-10 needs ~39 GB of accelerator memory in one piece, so the batch is split into the
fewest microbatches whose compiled step fits the device (`config.train.microbatches='auto'`, chosen and logged
before the first step; one optimizer update per batch of 256; README, "Choices worth knowing"). Set an integer
(`--config.train.microbatches=1` on an 80 GB device) to fix it across machines.

`config.data.classes=K` keeps only the first K classes of wnids.txt (e.g. a partial copy of the training set);
`:smoke` uses 10 classes and a narrow, shallow WRN (`wrn_smoke`) to check the pipeline in about a minute.
"""

from arreg_jax import configuration, presets


def get_config(arg=None):
  c = configuration.base_config()
  c.paper = 'tiny_imagenet_wrn50_2'
  c.data.name = 'tiny_imagenet'
  c.data.source = 'files'
  c.data.data_dir = 'data'
  c.model.name = 'wrn50_2'
  c.train.epochs = 90
  c.train.batch_size = 256
  c.train.learning_rate = 0.1
  c.train.lr_boundaries = (30, 60)
  c.train.microbatches = 'auto'
  c.sweep = (0, 4, 8, 16)
  if arg == 'smoke':
    c.data.classes = 10
    c = presets.smoke(c)
    c.data.train_size, c.data.test_size = 128, 64
    return c
  return presets.from_arg(c, arg)
