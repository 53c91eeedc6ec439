"""Adversarial attacks as pure functions of ``(logits_fn, images, labels, key)``, and their evaluation.

* :mod:`.pgd` — PGD (Madry et al. 2018) and FGSM (Goodfellow et al. 2015): the attacks of adversarial training.
* :mod:`.losses` — per-example CE, margin, DLR and targeted DLR (Croce & Hein, ICML 2020).
* :mod:`.apgd` — APGD with the CE, DLR or targeted-DLR loss, L∞ and L2 (Croce & Hein, ICML 2020).
* :mod:`.square` — the Square Attack, L∞, score-based (Andriushchenko et al., ECCV 2020).
* :mod:`.autoattack` — the AutoAttack cascade (Croce & Hein, ICML 2020), with the robust accuracy after each attack.
* :mod:`.evaluation` — robust accuracies under a list of named attacks, in fixed-size padded (sharded) batches.
* :mod:`.sanity_checks` — gradient-masking checks (Carlini et al. 2019, §5), each a dict {value, passed, detail}.
* :mod:`.noise` — per-example random draws (example i uses ``fold_in(key, i)``).
"""

from arreg_jax.attacks import evaluation, noise, sanity_checks
from arreg_jax.attacks.apgd import apgd, checkpoints
from arreg_jax.attacks.autoattack import autoattack
from arreg_jax.attacks.evaluation import robust_accuracies
from arreg_jax.attacks.losses import cross_entropy, dlr, dlr_targeted, margin
from arreg_jax.attacks.pgd import LogitsFn, cross_entropy_sum, fgsm, pgd
from arreg_jax.attacks.pgd import random_start_delta as pgd_random_start
from arreg_jax.attacks.square import square

__all__ = ['LogitsFn', 'apgd', 'autoattack', 'checkpoints', 'cross_entropy', 'cross_entropy_sum', 'dlr',
           'dlr_targeted', 'evaluation', 'fgsm', 'margin', 'noise', 'pgd', 'pgd_random_start', 'robust_accuracies',
           'sanity_checks', 'square']
