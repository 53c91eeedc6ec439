"""Adversarial attacks on any JAX model, as pure functions of ``(logits_fn, images, labels, key)``, and AutoAttack.

``logits_fn`` maps float images in [0, 1] to logits (N, K): ``lambda x: module.apply(variables, x)`` for Flax linen,
``lambda x: model(x)`` for NNX, ``jax.vmap(model)`` for Equinox. A model pair (anything with ``apply_fn(params,
images)`` and ``params`` attributes) works wherever ``logits_fn`` does, with its parameters traced. Every public
function checks its inputs and compiles once (:mod:`.compiled`).

* :mod:`.pgd` — PGD (Madry et al. 2018) and FGSM (Goodfellow et al. 2015): the attacks of adversarial training.
* :mod:`.apgd` — APGD with the CE, DLR or targeted-DLR loss, L∞ and L2 (Croce & Hein, ICML 2020).
* :mod:`.fab` — FAB and FAB-T, the minimum-norm fast adaptive boundary attack, L∞ and L2 (Croce & Hein, ICML 2020);
  :mod:`.hyperplane_projection` — its projection onto a hyperplane within the box.
* :mod:`.square` — the Square Attack, L∞ and L2, score-based (Andriushchenko et al., ECCV 2020).
* :mod:`.cascade` — the AutoAttack cascade on one batch ('standard', 'plus', 'custom'), with the robust mask
  after each stage; :mod:`.front_end` — :class:`AutoAttack`, the authors' API over a data set.
* :mod:`.robust_accuracy` — robust accuracies under a list of named attacks (:data:`ATTACK_NAMES`), batched.
* :mod:`.gradient_masking` — gradient-masking checks (Carlini et al. 2019, §5), each a dict {value, passed, detail}.
* :mod:`.losses` — per-example CE, margin, DLR and targeted DLR; :mod:`.norm_balls` — the L∞/L2 ball geometry;
  :mod:`.input_checks` — the checks at the door; :mod:`.noise` — per-example random draws.
"""

from arreg_jax.attacks import gradient_masking, input_checks, noise, norm_balls, robust_accuracy
from arreg_jax.attacks.apgd import apgd, checkpoints
from arreg_jax.attacks.cascade import ReducedCascadeWarning, STAGE_NAMES, Stage, autoattack
from arreg_jax.attacks.fab import fab
from arreg_jax.attacks.front_end import AutoAttack, AutoAttackResult
from arreg_jax.attacks.gradient_masking import GradientMaskingWarning
from arreg_jax.attacks.input_checks import ProbabilitiesWarning
from arreg_jax.attacks.losses import cross_entropy, dlr, dlr_targeted, margin
from arreg_jax.attacks.pgd import LogitsFn, cross_entropy_sum, fgsm, pgd, pgd_random_start
from arreg_jax.attacks.robust_accuracy import ATTACK_NAMES, robust_accuracies
from arreg_jax.attacks.square import square

__all__ = ['ATTACK_NAMES', 'AutoAttack', 'AutoAttackResult', 'GradientMaskingWarning', 'LogitsFn',
           'ProbabilitiesWarning', 'ReducedCascadeWarning', 'STAGE_NAMES', 'Stage', 'apgd', 'autoattack',
           'checkpoints', 'cross_entropy', 'cross_entropy_sum', 'dlr', 'dlr_targeted', 'fab', 'fgsm',
           'gradient_masking', 'input_checks', 'margin', 'noise', 'norm_balls', 'pgd', 'pgd_random_start',
           'robust_accuracies', 'robust_accuracy', 'square']
