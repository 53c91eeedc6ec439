"""Draft 003 ("Sample-wise Adversarial Robustness Regularizes Neural Networks"), MNIST: LeNet + spectral norm.

    python -m arreg_jax.main --config configs/draft003_mnist_lenet.py --workdir runs/draft003_mnist_lenet

The draft's appendix A and Table 1 (MNIST block):

* model: LeNet of Madry et al. (2018) — conv 5×5×32 → pool → conv 5×5×64 → pool → dense 1024 → dense 10 — with
  Miyato power-iteration spectral normalization on every conv and dense layer ('lenet_sn'; A.2 "We constrain the
  spectral norm of the convolutional layers and linear layers ... following Miyato et al.");
* training (A.2): batch 256, 160 epochs, SGD momentum 0.9, lr 0.1 "multiplied by 0.01 at epochs 80 and 120" (taken
  literally: ×0.01 twice), no weight decay, raw images (no augmentation);
* adversarial training (A.3): L∞ PGD from a random start, 40 steps of 2.55/255, ε ∈ {51, 76.5, 102}/255, plus
  defensive strength 0 (Table 1), every batch replaced by its adversarial examples;
* evaluation (A.4, Table 1): PGD at ε = 76.5/255, "10 iterations with steps of size 2.55/255" (as written; 10 such
  steps reach at most 25.5/255 — the draft is inconsistent here, we follow the text), over the clean-correct test
  examples (A.4 also describes counting every test example; we use the main paper's convention, SPEC §5);
* loss variation within covering balls (Fig. 3): on the correctly classified **training** examples
  (analysis.loss_variation_split='train_correct'), radii 25.5, 51, 76.5 /255 (the draft does not state them).

Where the draft is silent we chose: the MNIST source (the embedded 10k/2k subset so that it runs anywhere; pass
--config.data.source=files --config.data.data_dir=... for the full 60k/10k set the draft used) and the 40-step PGD's
random start (uniform in the ε-ball). Strengths are in units of 1/255 (strength_unit = 1/255).
"""

from arreg_jax import configuration, presets


def get_config(arg=None):
  c = configuration.base_config()
  c.paper = 'draft003_mnist_lenet'
  c.data.name = 'mnist'
  c.data.source = 'embedded'
  c.model.name = 'lenet_sn'
  c.train.epochs = 160
  c.train.batch_size = 256
  c.train.learning_rate = 0.1
  c.train.lr_boundaries = (80, 120)
  c.train.lr_decay = 0.01
  c.attack.kind = 'pgd'
  c.attack.strength_unit = 1 / 255
  c.attack.steps = 40
  c.attack.step_size = 2.55 / 255
  c.sweep = (0.0, 51.0, 76.5, 102.0)
  c.eval.pgd_eps = 76.5 / 255
  c.eval.pgd_step_size = 2.55 / 255
  c.eval.pgd_steps = 10
  c.analysis.loss_variation_split = 'train_correct'
  c.analysis.loss_variation_eps_rel = (1 / 3, 2 / 3, 1.0)  # × eval.pgd_eps = 25.5, 51, 76.5 /255
  return presets.from_arg(c, arg)
