"""Analysis of trained models (Wen, Li & Jia, ICML 2020, §4 and appendix B; SPEC §5).

Pure, jit-able, batched kernels, one module per idea:

* :mod:`margins` — margin f_y − max_{i≠y} f_i (Definition 3), true-class probability, per-example cross-entropy;
* :mod:`distributions` — histogram with fixed bin edges, mean, std, quantiles, skewness, fraction |v| < τ;
* :mod:`singular_values` — per-layer singular-value statistics and the two-model comparison of appendix B.2;
* :mod:`smoothness` — loss variation inside L∞ balls (appendix B.5, Table 1);
* :mod:`boundary` — instance-space margins and v_min (Definition 6) by bisection on an L2 PGD radius;
* :mod:`bounds` — the terms of Theorem 3.1 (eq. 4–5);
* :mod:`margin_tracking` — per-epoch minimum and average margins during training (poster 004).

They import nothing above the models and attacks; running them over a sweep directory is
:mod:`arreg_jax.sweep_analysis`.
"""
