"""Adversarial attacks as pure functions of ``(logits_fn, images, labels, key)``, and their evaluation.

* :mod:`.pgd` — PGD (Madry et al. 2018) and FGSM (Goodfellow et al. 2015): the attacks of adversarial training.
"""

from arreg_jax.attacks.pgd import LogitsFn, cross_entropy_sum, fgsm, pgd

__all__ = ['LogitsFn', 'cross_entropy_sum', 'fgsm', 'pgd']
