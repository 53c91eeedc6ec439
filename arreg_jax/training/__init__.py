"""Training, readable in one place (imported by module; this package imports nothing itself):

* :mod:`~arreg_jax.training.state` — the train state and the optimizer (SGD/Adam on a piecewise-constant rate);
* :mod:`~arreg_jax.training.step` — the compiled adversarial training step: its static spec, its traced
  hyper-parameters (ε, λ, β, keys), microbatches, several steps per call;
* :mod:`~arreg_jax.training.eval_step` — the compiled evaluation step (clean and PGD metrics, SPEC §5) and its loop;
* :mod:`~arreg_jax.training.memory_plan` — the compiled programs' memory against the device's, before the first step;
* :mod:`~arreg_jax.training.checkpoints` — checkpoints saved and restored, and a trained run back from its directory;
* :mod:`~arreg_jax.training.setup` — a sweep checked once (config, work directory, data, devices);
* :mod:`~arreg_jax.training.loop` — the epoch loop and the sweep: build, train, evaluate, save every member;
* :mod:`~arreg_jax.training.metrics_writer` — metrics.jsonl, the stdout lines, TensorBoard.
"""
