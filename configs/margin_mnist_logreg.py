"""Poster 004's motivating example: binary logistic regression on MNIST 0 vs 1, standard vs margin-regularized.

    python -m arreg_jax.main --config configs/margin_mnist_logreg.py --workdir runs/margin_mnist_logreg

Wu & Yu ("The Trade-off between Minimum and Average Margin") train a binary logistic regression on the MNIST digits
0 and 1 with gradient descent and track, per epoch, the minimum and the average margin (the signed distance of each
training image to the decision hyperplane): the minimum rises (Soudry et al. 2018: the direction converges to the
hard-margin SVM) while the average falls. Here:

* data: the embedded MNIST subset (10k train / 2k test; set data.source='files' for the full set), digits 0 and 1
  only (data.keep_classes=(0, 1), relabelled 0/1): about 2.1k training and 0.4k test images;
* model: 'logreg' — one dense layer on the 784 pixels with 2 outputs; its softmax cross-entropy is exactly the
  logistic loss of w = w_1 − w_0, and the tracked feature-space margin (Φ(x) = x) is exactly the input-space margin
  (w_yᵀx + b_y − w_kᵀx − b_k)/‖w_y − w_k‖;
* training: standard (AR strength 0); plain SGD without momentum (the poster's "gradient descent with small constant
  step size"), constant learning rate, 100 epochs — the poster does not give its step size, batch or epochs;
* two runs: ar0_ml0_ob0 (standard) and ar0_ml0.1_ob0.01 (regularized: λ = 0.1, γ = 2, β = 0.01). The poster does not
  give λ, γ or β; these are our choice;
* per-epoch margins on train and test (config.margins), histograms at epochs 1, 10, 100; PGD accuracy at ε = 0.1
  (10 steps of 0.025) for robustness.
"""

from arreg_jax import configuration, presets


def get_config(arg=None):
  c = configuration.base_config()
  c.paper = 'poster004_mnist_logreg'
  c.data.name = 'mnist'
  c.data.source = 'embedded'
  c.data.keep_classes = (0, 1)
  c.model.name = 'logreg'
  c.train.epochs = 100
  c.train.batch_size = 128
  c.train.optimizer = 'sgd'
  c.train.momentum = 0.0
  c.train.learning_rate = 0.1
  c.train.lr_boundaries = ()
  c.attack.kind = 'none'
  c.attack.strength_unit = 1.0
  c.sweep = (0.0,)
  c.regularizer.margin_gamma = 2.0
  c.regularizer.sweep = ((0.0, 0.0), (0.1, 0.01))
  c.margins.track = True
  c.margins.hist_epochs = (1, 10, 100)
  c.eval.pgd_eps = 0.1
  c.eval.pgd_step_size = 0.025
  c.eval.pgd_steps = 10
  c.eval.pgd_examples_per_epoch = None
  c.analysis.loss_variation_examples = 128
  c = presets.from_arg(c, arg)
  if arg == 'smoke':
    c.data.train_size = 512
    c.margins.hist_epochs = (1,)
  return c
