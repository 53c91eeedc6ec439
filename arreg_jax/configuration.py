"""The config schema: every key a run config may set, its default, and the checks run before anything is written.

Config files in ``configs/`` start from :func:`base_config` — a *locked* ``ConfigDict``, so that assigning a
misspelt key in a config file or on the command line (``--config.train.epoch=5``) fails at once instead of being
silently ignored — and override what their experiment changes. Optional fields are ``config_dict.placeholder``s
(typed ``FieldReference``s where the default is not None); ``--config.<key>=None`` sets one back to None
(:func:`set_to_none`). :func:`validate` holds every value rule, once. ``--config configs/x.py:smoke`` passes
``'smoke'`` to the file's ``get_config``, which applies :func:`arreg_jax.presets.smoke` — a tiny version of the same experiment
(small data, a few steps, the same code paths) that finishes in under a minute on a CPU.
"""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from arreg_jax import config_json
from arreg_jax.attacks.robust_accuracy import ATTACK_NAMES
from arreg_jax.data import DATASETS, SOURCES
from arreg_jax.errors import ConfigError

ATTACKS = ('pgd', 'fgsm', 'none')
# The attacks a run's robustness evaluation can use: the registry arreg_jax.attacks.robust_accuracy.ATTACKS
# ('autoattack' is the authors' standard cascade, also computed whenever one of its stages is listed).
ROBUSTNESS_ATTACKS = ATTACK_NAMES


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.precision = 'float32'             # 'float32' | 'bfloat16' (compute in bf16; params, optimizer, loss in f32)
  # The paper experiment this config reproduces (a key of arreg_jax.report.paper), or None.
  c.paper = config_dict.placeholder(str)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'mnist'
  c.data.source = 'embedded'          # 'embedded' (MNIST subset in the package) | 'files' | 'tfds'
  c.data.data_dir = config_dict.placeholder(str)
  c.data.cache_dir = config_dict.placeholder(str)
  c.data.train_size = config_dict.placeholder(int)
  c.data.test_size = config_dict.placeholder(int)
  c.data.classes = config_dict.placeholder(int)  # Tiny-ImageNet: first K classes only
  # Keep only these classes, relabelled 0..K-1 in this order (e.g. (0, 1): MNIST 0 vs 1, poster 004); () = all.
  # Applied before train_size / test_size.
  c.data.keep_classes = ()
  c.data.tfds_download = False

  c.model = ml_collections.ConfigDict()
  c.model.name = 'small_cnn'

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 10
  c.train.batch_size = 128
  c.train.optimizer = 'sgd'           # 'sgd' (with momentum) | 'adam'
  c.train.learning_rate = 0.05
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.weight_decay = 0.0          # not stated in the paper; draft 003 uses none
  c.train.lr_boundaries = (100, 150)  # epochs at which the learning rate is multiplied by lr_decay
  c.train.lr_decay = 0.1
  c.train.eps_ramp_epochs = 0.0       # ramp the attack's ε linearly from 0 over this many epochs
  c.train.steps_per_call = 1          # training steps per host dispatch (a lax.scan inside one program)
  # Gradient accumulation inside the step (arreg_jax.train): the batch is split into k equal microbatches, each
  # attacked and differentiated in turn (a lax.scan), one optimizer update per batch. An int k >= 1 dividing
  # batch_size, or 'auto': the smallest k whose compiled step fits the device memory (arreg_jax.memory_plan).
  c.train.microbatches = ml_collections.FieldReference(1, field_type=object)

  # The training attack. AR strength s (an entry of `sweep`) means ε = s × strength_unit.
  c.attack = ml_collections.ConfigDict()
  c.attack.kind = 'pgd'               # 'pgd' | 'fgsm' | 'none'
  c.attack.norm = 'linf'
  c.attack.strength_unit = 1 / 255
  c.attack.steps = 10
  c.attack.step_size = ml_collections.FieldReference(2 / 255, field_type=float)  # absolute; or None and …
  c.attack.step_size_rel = config_dict.placeholder(float)  # … a fraction of ε
  c.attack.random_start = True
  c.attack.bn_mode = 'eval'           # BatchNorm during the attack: 'eval' (running stats) | 'batch'

  c.sweep = (4, 8, 16)                # AR strengths; one model per entry (0 = standard training)

  # Evaluation: PGD accuracy over clean-correct test examples (SPEC §5).
  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 500
  c.eval.pgd_eps = 8 / 255
  c.eval.pgd_step_size = 2 / 255
  c.eval.pgd_steps = 10
  c.eval.pgd_examples_per_epoch = ml_collections.FieldReference(1000, field_type=int)  # None = whole test set
  c.eval.every_epochs = 1
  # Robust accuracy of the final models, run with the analysis (arreg_jax.analysis.robustness): first `examples`
  # test examples (None = all), ε = `eps` (None = pgd_eps), 'autoattack' when apgd_ce, apgd_t and square all run;
  # "Is the robustness real?" adds PGD-10 at ε × eps_grid_rel (capped at 1). Changes nothing that is trained.
  c.eval.robustness = ml_collections.ConfigDict()
  c.eval.robustness.enabled = True
  c.eval.robustness.attacks = ('fgsm', 'pgd10', 'pgd100', 'apgd_ce', 'apgd_t', 'square')
  c.eval.robustness.examples = config_dict.placeholder(int)
  c.eval.robustness.eps = config_dict.placeholder(float)
  c.eval.robustness.n_targets = 9        # APGD-T target classes
  c.eval.robustness.square_queries = 5000
  c.eval.robustness.eps_grid_rel = (0.5, 1.0, 2.0, 4.0, 8.0)
  c.eval.robustness.check_examples = 256
  c.eval.robustness.batch_size = config_dict.placeholder(int)  # None = train.batch_size

  # Spectral clipping (appendix B.4.2, D.3; Sedghi et al. 2019): after the last step of every `every_epochs`-th
  # epoch, every conv/dense layer's singular values are clipped at `clip_to` (None: uncontrolled), `rounds`
  # project-and-clip rounds per conv kernel. `sweep` (e.g. (1, 3, 5, None)) makes clip_to a second sweep dimension:
  # one run per (AR strength, clip value), in directories ar<s>_sp<c>.
  c.spectral = ml_collections.ConfigDict()
  c.spectral.clip_to = config_dict.placeholder(float)
  c.spectral.every_epochs = 1
  c.spectral.rounds = 1
  c.spectral.sweep = ()

  # The average-margin regularizer of poster 004 (arreg_jax.regularizers), with or without adversarial training:
  # loss = mean CE − margin_lambda · mean clip_[0, margin_gamma](min_{k≠y} (w_y − w_k)ᵀΦ(x))
  #        + ortho_beta · Σ_l ‖W_l W_lᵀ − I‖²_F.   0 switches a term off (the step is then the unregularized one).
  # `sweep` (e.g. ((0.0, 0.0), (0.5, 1e-3))) makes (margin_lambda, ortho_beta) a further sweep dimension: one run
  # per (AR strength, [clip,] pair), in directories ar<s>_ml<λ>_ob<β>.
  c.regularizer = ml_collections.ConfigDict()
  c.regularizer.margin_lambda = 0.0
  c.regularizer.margin_gamma = 1.0
  c.regularizer.ortho_beta = 0.0
  c.regularizer.sweep = ()

  # Per-epoch margin tracking (poster 004; arreg_jax.analysis.margin_tracking): min and mean of the logit margin
  # (Definition 3) and of the feature-space margin min_k (f_y − f_k)/‖w_y − w_k‖ on the clean train and test sets,
  # added to metrics.jsonl; the per-example values of the epochs in `hist_epochs` (and the last epoch) are saved as
  # margins/epoch<k>.npz in the run directory (margin histograms).
  c.margins = ml_collections.ConfigDict()
  c.margins.track = False
  c.margins.max_examples = config_dict.placeholder(int)  # per split; None = all
  c.margins.hist_epochs = ()

  # Several hosts (arreg_jax.distributed): jax.distributed.initialize() before anything runs; the three values are
  # detected on Cloud TPU, Slurm and Open MPI when left None. Every host runs the same command and --workdir.
  c.distributed = ml_collections.ConfigDict()
  c.distributed.enabled = False
  c.distributed.coordinator_address = config_dict.placeholder(str)  # 'host:port' of process 0
  c.distributed.num_processes = config_dict.placeholder(int)
  c.distributed.process_id = config_dict.placeholder(int)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.keep = 3

  # What a run reports while it trains (arreg_jax.metrics_writer); changes nothing that is trained.
  c.logging = ml_collections.ConfigDict()
  c.logging.tensorboard = True        # TensorBoard scalars in <run>/tensorboard/ when tensorboardX is installed
  c.logging.progress_every_s = 30.0   # an in-epoch progress line at most this often (0: never)

  # The analysis and report run after the sweep (arreg_jax.analysis, arreg_jax.report; SPEC §5–6).
  c.analysis = ml_collections.ConfigDict()
  c.analysis.enabled = True           # analyse every finished run and write report.md at the end of run()
  # Margins, probabilities and losses (Fig. 1b, 4, 5a,b) over the first N examples of each split (None = all).
  c.analysis.max_train_examples = config_dict.placeholder(int)
  c.analysis.max_test_examples = config_dict.placeholder(int)
  c.analysis.bins = 60                # histogram bins; the edges are fixed, the same for every run
  c.analysis.margin_range = (-20.0, 20.0)  # margin histogram range (logits); outside values go to the end bins
  c.analysis.margin_tau = 1.0         # also report the fraction of examples with |margin| < tau
  c.analysis.loss_range = (0.0, 10.0)
  # Loss variation (B.5, Table 1): L∞ radii as fractions of eval.pgd_eps (1/8, 1/4, 1/2 of 8/255 = 1, 2, 4 /255),
  # PGD from the clean input with `steps` steps of step_rel·ε, over the first N test examples (None = all, as the
  # paper; 256 keeps the analysis of the MNIST default sweep shorter than one of its training epochs on a CPU).
  c.analysis.loss_variation_eps_rel = (0.125, 0.25, 0.5)
  c.analysis.loss_variation_examples = ml_collections.FieldReference(256, field_type=int)
  c.analysis.loss_variation_steps = 4
  c.analysis.loss_variation_step_rel = 0.5
  # Which examples: 'test' (B.5) or 'train_correct' — the correctly classified training examples, the maximum over
  # perturbed points still classified correctly (draft 003, Fig. 3), among the first loss_variation_examples.
  c.analysis.loss_variation_split = 'test'
  # v_min of Theorem 3.1 (arreg_jax.analysis.boundary): screen N training examples by their first-order distance
  # to the boundary, refine the K closest by bisection (rounds × L2 PGD steps).
  c.analysis.boundary_screen_examples = 512
  c.analysis.boundary_refine_examples = 16
  c.analysis.boundary_rounds = 8
  c.analysis.boundary_steps = 8
  # Constants of the bound (eq. 4): ramp width γ (None = the median training margin), covering constant C_X and
  # dimension k, covering radius ε (None = the run's training ε, or eval.pgd_eps at AR 0), confidence η.
  c.analysis.bound = ml_collections.ConfigDict()
  c.analysis.bound.gamma = config_dict.placeholder(float)
  c.analysis.bound.c_x = 1.0
  c.analysis.bound.k = 10.0
  c.analysis.bound.eps = config_dict.placeholder(float)
  c.analysis.bound.eta = 0.05
  c.lock()
  return c


# Blocks that do not change what a run trains: a run resumes (and a finished run is reused) under new values of
# these; any other difference from its saved config.json is refused.
NON_TRAINING_BLOCKS = ('analysis', 'distributed', 'logging', 'eval.robustness')


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first problem found: bad names, impossible values (there are no unknown keys:
  the config is locked)."""
  def need(ok, msg):
    if not ok:
      raise ConfigError(msg)

  need(c.data.name in DATASETS, f'unknown dataset {c.data.name!r} (config.data.name); choose one of {DATASETS}')
  need(c.data.source in SOURCES, f'unknown data source {c.data.source!r} (config.data.source); choose one of {SOURCES}')
  need(c.data.source != 'embedded' or c.data.name == 'mnist',
       f"source 'embedded' ships MNIST only; for {c.data.name!r} set config.data.source='files' and "
       "config.data.data_dir, or 'tfds'")
  need(c.data.source != 'files' or c.data.data_dir,
       f"config.data.source='files' needs config.data.data_dir: the folder holding the {c.data.name} files")
  for k in ('train_size', 'test_size', 'classes'):
    v = c.data[k]
    need(v is None or v > 0, f'config.data.{k} must be positive or None, got {v}')
  from arreg_jax import models  # local import: models imports jax
  need(c.model.name in models.MODEL_NAMES,
       f'unknown model {c.model.name!r} (config.model.name); choose one of {", ".join(models.MODEL_NAMES)}')
  t = c.train
  need(t.epochs >= 1, f'config.train.epochs must be >= 1, got {t.epochs}')
  need(t.batch_size >= 1, f'config.train.batch_size must be >= 1, got {t.batch_size}')
  need(t.optimizer in ('sgd', 'adam'), f"config.train.optimizer must be 'sgd' or 'adam', got {t.optimizer!r}")
  need(t.learning_rate > 0, f'config.train.learning_rate must be > 0, got {t.learning_rate}')
  need(0 <= t.momentum < 1, f'config.train.momentum must be in [0, 1), got {t.momentum}')
  need(t.weight_decay >= 0, f'config.train.weight_decay must be >= 0, got {t.weight_decay}')
  need(t.steps_per_call >= 1, f'config.train.steps_per_call must be >= 1, got {t.steps_per_call}')
  check_microbatches(t.microbatches, t.batch_size)
  need(c.precision in ('float32', 'bfloat16'),
       f"config.precision must be 'float32' or 'bfloat16', got {c.precision!r}")
  need(t.eps_ramp_epochs >= 0, f'config.train.eps_ramp_epochs must be >= 0, got {t.eps_ramp_epochs}')
  need(list(t.lr_boundaries) == sorted(t.lr_boundaries), 'config.train.lr_boundaries must be increasing')
  a = c.attack
  need(a.kind in ATTACKS, f'unknown attack {a.kind!r} (config.attack.kind); choose one of {ATTACKS}')
  need(a.norm in ('linf', 'l2'), f"config.attack.norm must be 'linf' or 'l2', got {a.norm!r}")
  need(a.bn_mode in ('eval', 'batch'), f"config.attack.bn_mode must be 'eval' or 'batch', got {a.bn_mode!r}")
  need(a.strength_unit > 0, f'config.attack.strength_unit must be > 0, got {a.strength_unit}')
  need(a.steps >= 1, f'config.attack.steps must be >= 1, got {a.steps}')
  need((a.step_size is None) != (a.step_size_rel is None),
       'set exactly one of config.attack.step_size (absolute) and config.attack.step_size_rel (fraction of ε)')
  need((a.step_size or 0) >= 0 and (a.step_size_rel or 0) >= 0, 'attack step sizes must be >= 0')
  sweep = list(c.sweep)
  need(len(sweep) >= 1, 'config.sweep must list at least one AR strength')
  for s in sweep:
    need(isinstance(s, (int, float)) and s >= 0,
         f'AR strength {s!r} in config.sweep is invalid: ε = strength × unit must be >= 0')
  need(len(set(sweep)) == len(sweep), f'config.sweep has repeated strengths: {sweep}')
  e = c.eval
  need(e.pgd_eps >= 0, f'config.eval.pgd_eps (ε) must be >= 0, got {e.pgd_eps}')
  need(e.pgd_steps >= 1 and e.pgd_step_size >= 0, 'config.eval.pgd_steps must be >= 1 and pgd_step_size >= 0')
  need(e.batch_size >= 1, f'config.eval.batch_size must be >= 1, got {e.batch_size}')
  need(e.every_epochs >= 1, f'config.eval.every_epochs must be >= 1, got {e.every_epochs}')
  rb = e.robustness
  bad = [a for a in rb.attacks if a not in ROBUSTNESS_ATTACKS]
  need(not bad, f'config.eval.robustness.attacks: unknown attack(s) {bad}; choose from {ROBUSTNESS_ATTACKS}')
  for k in ('examples', 'eps', 'batch_size'):
    need(rb[k] is None or rb[k] > 0, f'config.eval.robustness.{k} must be None or > 0, got {rb[k]}')
  need(rb.eps is None or rb.eps <= 1, f'config.eval.robustness.eps is an L∞ radius on images in [0, 1] and must be '
       f'<= 1, got {rb.eps}' + (f' (did you mean {rb.eps:g}/255 = {rb.eps / 255:.6g}?)' if rb.eps else ''))
  for k in ('n_targets', 'square_queries', 'check_examples'):
    need(rb[k] >= 1, f'config.eval.robustness.{k} must be >= 1, got {rb[k]}')
  need(rb.n_targets <= 9, f'config.eval.robustness.n_targets must be <= 9 (AutoAttack), got {rb.n_targets}')
  need(all(v > 0 for v in rb.eps_grid_rel), 'config.eval.robustness.eps_grid_rel must list multiples of ε > 0')
  sp = c.spectral
  for v in list(sp.sweep) + [sp.clip_to]:
    need(v is None or (isinstance(v, (int, float)) and v > 0),
         f'spectral clipping thresholds must be > 0 or None, got {v!r} (config.spectral)')
  need(sp.every_epochs >= 1 and sp.rounds >= 1, 'config.spectral.every_epochs and .rounds must be >= 1')
  need(not (sp.sweep and sp.clip_to is not None),
       'set config.spectral.clip_to or config.spectral.sweep, not both')
  need(c.checkpoint.keep >= 1, f'config.checkpoint.keep must be >= 1, got {c.checkpoint.keep}')
  keep = list(c.data.keep_classes)
  need(all(isinstance(k, int) and k >= 0 for k in keep) and len(set(keep)) == len(keep) and len(keep) != 1,
       f'config.data.keep_classes must list at least two distinct class indices (or be empty), got {keep}')
  r = c.regularizer
  need(r.margin_lambda >= 0 and r.ortho_beta >= 0,
       f'config.regularizer.margin_lambda and .ortho_beta must be >= 0, got {r.margin_lambda}, {r.ortho_beta}')
  need(r.margin_gamma > 0, f'config.regularizer.margin_gamma (γ) must be > 0, got {r.margin_gamma}')
  for pair in r.sweep:
    need(isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, (int, float)) and v >= 0
                                                                    for v in pair),
         f'config.regularizer.sweep entries must be (margin_lambda, ortho_beta) pairs >= 0, got {pair!r}')
  need(len({tuple(p) for p in r.sweep}) == len(r.sweep), 'config.regularizer.sweep has repeated entries')
  need(not (r.sweep and (r.margin_lambda or r.ortho_beta)),
       'set config.regularizer.margin_lambda/ortho_beta or config.regularizer.sweep, not both')
  an = c.analysis
  for k in ('max_train_examples', 'max_test_examples', 'loss_variation_examples'):
    need(an[k] is None or an[k] >= 1, f'config.analysis.{k} must be None (all) or >= 1, got {an[k]}')
  need(an.bins >= 2, f'config.analysis.bins must be >= 2, got {an.bins}')
  for k in ('margin_range', 'loss_range'):
    need(len(an[k]) == 2 and an[k][0] < an[k][1], f'config.analysis.{k} must be (low, high) with low < high, '
         f'got {tuple(an[k])}')
  need(an.margin_tau > 0, f'config.analysis.margin_tau (τ) must be > 0, got {an.margin_tau}')
  need(len(an.loss_variation_eps_rel) >= 1 and all(v > 0 for v in an.loss_variation_eps_rel),
       f'config.analysis.loss_variation_eps_rel must list radii > 0 (fractions of eval.pgd_eps), got '
       f'{tuple(an.loss_variation_eps_rel)}')
  need(an.loss_variation_steps >= 1 and an.loss_variation_step_rel > 0,
       'config.analysis.loss_variation_steps must be >= 1 and loss_variation_step_rel > 0')
  for k in ('boundary_screen_examples', 'boundary_refine_examples', 'boundary_rounds', 'boundary_steps'):
    need(an[k] >= 1, f'config.analysis.{k} must be >= 1, got {an[k]}')
  need(an.boundary_refine_examples <= an.boundary_screen_examples,
       'config.analysis.boundary_refine_examples must be <= boundary_screen_examples')
  b = an.bound
  need(b.gamma is None or b.gamma > 0, f'config.analysis.bound.gamma (γ) must be None or > 0, got {b.gamma}')
  need(b.eps is None or b.eps > 0, f'config.analysis.bound.eps must be None or > 0, got {b.eps}')
  need(b.c_x > 0 and b.k > 0, f'config.analysis.bound.c_x and .k must be > 0, got {b.c_x}, {b.k}')
  need(0 < b.eta < 1, f'config.analysis.bound.eta (η) must be in (0, 1), got {b.eta}')
  need(c.analysis.loss_variation_split in ('test', 'train_correct'),
       f"config.analysis.loss_variation_split must be 'test' or 'train_correct', got "
       f'{c.analysis.loss_variation_split!r}')
  m = c.margins
  need(m.max_examples is None or m.max_examples >= 1, 'config.margins.max_examples must be None or >= 1')
  need(all(isinstance(e, int) and e >= 1 for e in m.hist_epochs),
       f'config.margins.hist_epochs must list epochs >= 1, got {tuple(m.hist_epochs)}')


def divisors(n: int) -> list[int]:
  return [k for k in range(1, int(n) + 1) if n % k == 0]


def check_microbatches(k, batch_size: int) -> None:
  """Raises ConfigError unless ``k`` is 'auto' or an int >= 1 that divides ``batch_size`` (the device count is
  checked once the devices are known: ``arreg_jax.trainer.check_sizes``)."""
  if k == 'auto':
    return
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"config.train.microbatches must be 'auto' or an integer >= 1, got {k!r}")
  if batch_size % k:
    shown = ', '.join(str(d) for d in divisors(batch_size) if d > 1)[:80]
    raise ConfigError(f'config.train.microbatches = {k} does not divide config.train.batch_size = {batch_size}; '
                      f'use a divisor of {batch_size} ({shown}), or change the batch size')


def nullable(dotted: str) -> bool:
  """Whether ``dotted`` is an optional field of the schema (a placeholder or typed reference: may be None)."""
  *parents, leaf = dotted.split('.')
  node = base_config()
  for part in parents:
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      return False
    node = node[part]
  refs = dict(node.items(preserve_field_references=True))
  return isinstance(refs.get(leaf), ml_collections.FieldReference)


def set_to_none(config: ml_collections.ConfigDict, dotted: str) -> None:
  """``--config.<dotted>=None``: sets an optional field to None; any other key is a ConfigError."""
  if not config_json.has_key(config, dotted):
    raise ConfigError(f'unknown config key {dotted!r} (--config.{dotted}=None). Check the spelling; the valid keys '
                      'and their defaults are in arreg_jax/configuration.py (base_config)')
  if not nullable(dotted):
    raise ConfigError(f'config.{dotted} cannot be None; give it a value (its default is in '
                      'arreg_jax/configuration.py, base_config)')
  *parents, leaf = dotted.split('.')
  node = config
  for part in parents:
    node = node[part]
  setattr(node, leaf, None)
