"""Poster 004 on a deep model: an MLP on MNIST, standard vs average-margin-regularized training.

    python -m arreg_jax.main --config configs/margin_mnist_mlp.py --workdir runs/margin_mnist_mlp

Wu & Yu observe the same minimum/average-margin trade-off for deep models, measured with the feature-space margin
(w_y − w_k)ᵀΦ(x)/‖w_y − w_k‖, and propose the regularizer
  Σ_i CE − λ [min_{k≠y_i} (w_{y_i} − w_k)ᵀΦ(x_i)]_0^γ + β Σ_l ‖W_l W_lᵀ − I‖²_F   (arreg_jax.regularizers).
Here:

* data: the embedded MNIST subset (10k/2k; data.source='files' for the full set);
* model: 'mlp' — 784 → 256 → 256 → 10, ReLU (the poster does not describe its MLP);
* training: standard (AR 0), SGD momentum 0.9, lr 0.05 ÷10 at epoch 20, 30 epochs, batch 128 (our choice);
* two runs: ar0_ml0_ob0 (standard) and ar0_ml0.1_ob0.001 (λ = 0.1, γ = 5, β = 0.001; the poster gives no values);
* per-epoch min/average logit and feature-space margins on train and test, histograms at epochs 1, 10, 30, and
  PGD accuracy at ε = 0.1 (10 steps of 0.025) over the clean-correct test examples.
"""

from arreg_jax import configuration, presets


def get_config(arg=None):
  c = configuration.base_config()
  c.paper = 'poster004_mnist_mlp'
  c.data.name = 'mnist'
  c.data.source = 'embedded'
  c.model.name = 'mlp'
  c.train.epochs = 30
  c.train.batch_size = 128
  c.train.learning_rate = 0.05
  c.train.lr_boundaries = (20,)
  c.attack.kind = 'none'
  c.attack.strength_unit = 1.0
  c.sweep = (0.0,)
  c.regularizer.margin_gamma = 5.0
  c.regularizer.sweep = ((0.0, 0.0), (0.1, 0.001))
  c.margins.track = True
  c.margins.hist_epochs = (1, 10, 30)
  c.eval.pgd_eps = 0.1
  c.eval.pgd_step_size = 0.025
  c.eval.pgd_steps = 10
  c.eval.pgd_examples_per_epoch = 500
  c.analysis.loss_variation_examples = 128
  c = presets.from_arg(c, arg)
  if arg == 'smoke':
    c.margins.hist_epochs = (1,)
  return c
