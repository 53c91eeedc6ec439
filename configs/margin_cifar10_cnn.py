"""Poster 004 on CIFAR-10: a CNN, standard vs average-margin-regularized training.

    python -m arreg_jax.main --config configs/margin_cifar10_cnn.py --workdir runs/margin_cifar10_cnn \\
        --config.data.data_dir=/path/to/folder/holding/cifar-10-batches-py

The poster's "Avg Margin CIFAR-CNN" panel: the average feature-space margin of standard training falls while the
regularized model's does not, and the regularized model is more robust. The poster gives neither the CNN nor the
training settings; ours:

* model: 'cifar_cnn' — three [3×3 conv → ReLU → 2×2 max-pool] blocks of 32, 64, 128 channels, dense 256, dense 10;
* training: standard (AR 0), SGD momentum 0.9, batch 128, lr 0.05 ÷10 at epochs 50 and 75, 100 epochs, pad-4 crop +
  flip augmentation;
* two runs: ar0_ml0_ob0 (standard) and ar0_ml0.1_ob0.001 (λ = 0.1, γ = 5, β = 0.001);
* per-epoch margins on train and test, histograms at epochs 1, 25, 100; PGD-10 accuracy at ε = 8/255 (step 2/255).
"""

from arreg_jax import configuration, presets


def get_config(arg=None):
  c = configuration.base_config()
  c.paper = 'poster004_cifar10_cnn'
  c.data.name = 'cifar10'
  c.data.source = 'files'
  c.data.data_dir = 'data'
  c.model.name = 'cifar_cnn'
  c.train.epochs = 100
  c.train.batch_size = 128
  c.train.learning_rate = 0.05
  c.train.lr_boundaries = (50, 75)
  c.attack.kind = 'none'
  c.sweep = (0,)
  c.regularizer.margin_gamma = 5.0
  c.regularizer.sweep = ((0.0, 0.0), (0.1, 0.001))
  c.margins.track = True
  c.margins.hist_epochs = (1, 25, 100)
  c.margins.max_examples = 10000
  c = presets.from_arg(c, arg)
  if arg == 'smoke':
    c.margins.hist_epochs = (1,)
  return c
