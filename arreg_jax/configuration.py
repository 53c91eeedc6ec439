"""The config schema: every key a run config may set, its default, and the checks run before anything is written.

Config files in ``configs/`` start from :func:`base_config` — a *locked* ``ConfigDict``, so that assigning a
misspelt key in a config file or on the command line (``--config.train.epoch=5``) fails at once instead of being
silently ignored — and override what their experiment changes. Optional fields are ``config_dict.placeholder``s
(typed ``FieldReference``s where the default is not None); ``--config.<key>=None`` sets one back to None
(:func:`set_to_none`). :func:`validate` holds every value rule, once, block by block; its enumerations come from the
registries they name (models, datasets, data sources, optimizers, training attacks). ``--config configs/x.py:smoke``
passes ``'smoke'`` to the file's ``get_config``, which applies :func:`arreg_jax.presets.smoke` — a tiny version of
the same experiment (small data, a few steps, the same code paths) that finishes in under a minute on a CPU.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections
from ml_collections import config_dict

from arreg_jax import config_json, models
from arreg_jax.attacks.robust_accuracy import ATTACK_NAMES
from arreg_jax.data import DATASETS, SOURCES
from arreg_jax.errors import ConfigError
from arreg_jax.training.state import OPTIMIZERS
from arreg_jax.training.step import ATTACK_KINDS, BN_MODES

# The attacks a run's robustness evaluation can use: the registry arreg_jax.attacks.robust_accuracy.ATTACKS
# ('autoattack' is the authors' standard cascade, also computed whenever one of its stages is listed).
ROBUSTNESS_ATTACKS = ATTACK_NAMES

PRECISIONS = ('float32', 'bfloat16')  # models.compute_dtype: bf16 activations, float32 parameters and loss
NORMS = ('linf', 'l2')  # the training attack's norm (arreg_jax.attacks.pgd)
LOSS_VARIATION_SPLITS = ('test', 'train_correct')  # arreg_jax.sweep_analysis


def _block(**fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(fields)


def _data() -> ml_collections.ConfigDict:
  d = _block(name='mnist',
             source='embedded',  # 'embedded' (MNIST subset in the package) | 'files' | 'tfds'
             data_dir=config_dict.placeholder(str), cache_dir=config_dict.placeholder(str),
             train_size=config_dict.placeholder(int), test_size=config_dict.placeholder(int),
             classes=config_dict.placeholder(int))  # Tiny-ImageNet: first K classes only
  # Keep only these classes, relabelled 0..K-1 in this order (e.g. (0, 1): MNIST 0 vs 1, poster 004); () = all.
  # Applied before train_size / test_size.
  d.keep_classes = ()
  d.tfds_download = False
  return d


def _train() -> ml_collections.ConfigDict:
  t = _block(epochs=10, batch_size=128,
             optimizer='sgd',  # 'sgd' (with momentum) | 'adam'
             learning_rate=0.05, momentum=0.9, nesterov=False,
             weight_decay=0.0,  # not stated in the paper; draft 003 uses none
             lr_boundaries=(100, 150),  # epochs at which the learning rate is multiplied by lr_decay
             lr_decay=0.1,
             eps_ramp_epochs=0.0,  # ramp the attack's ε linearly from 0 over this many epochs
             steps_per_call=1)  # training steps per host dispatch (a lax.scan inside one program)
  # Gradient accumulation inside the step (arreg_jax.training.step): the batch is split into k equal microbatches,
  # each attacked and differentiated in turn (a lax.scan), one optimizer update per batch. An int k >= 1 dividing
  # batch_size, or 'auto': the smallest k whose compiled step fits the device memory (arreg_jax.training.memory_plan).
  t.microbatches = ml_collections.FieldReference(1, field_type=object)
  return t


def _attack() -> ml_collections.ConfigDict:
  """The training attack. AR strength s (an entry of ``sweep``) means ε = s × strength_unit."""
  a = _block(kind='pgd',  # 'pgd' | 'fgsm' | 'none'
             norm='linf', strength_unit=1 / 255, steps=10)
  a.step_size = ml_collections.FieldReference(2 / 255, field_type=float)  # absolute; or None and …
  a.step_size_rel = config_dict.placeholder(float)  # … a fraction of ε
  a.random_start = True
  a.bn_mode = 'eval'  # BatchNorm during the attack: 'eval' (running stats) | 'batch'
  return a


def _eval() -> ml_collections.ConfigDict:
  """Evaluation: PGD accuracy over clean-correct test examples (SPEC §5)."""
  e = _block(batch_size=500, pgd_eps=8 / 255, pgd_step_size=2 / 255, pgd_steps=10)
  e.pgd_examples_per_epoch = ml_collections.FieldReference(1000, field_type=int)  # None = whole test set
  e.every_epochs = 1
  # Robust accuracy of the final models, run with the analysis (arreg_jax.analysis.robustness): first `examples`
  # test examples (None = all), ε = `eps` (None = pgd_eps), 'autoattack' when apgd_ce, apgd_t and square all run;
  # "Is the robustness real?" adds PGD-10 at ε × eps_grid_rel (capped at 1). Changes nothing that is trained.
  e.robustness = _block(enabled=True, attacks=('fgsm', 'pgd10', 'pgd100', 'apgd_ce', 'apgd_t', 'square'),
                        examples=config_dict.placeholder(int), eps=config_dict.placeholder(float),
                        n_targets=9,  # APGD-T target classes
                        square_queries=5000, eps_grid_rel=(0.5, 1.0, 2.0, 4.0, 8.0), check_examples=256,
                        batch_size=config_dict.placeholder(int))  # None = train.batch_size
  return e


def _spectral() -> ml_collections.ConfigDict:
  """Spectral clipping (appendix B.4.2, D.3; Sedghi et al. 2019): after the last step of every `every_epochs`-th
  epoch, every conv/dense layer's singular values are clipped at `clip_to` (None: uncontrolled), `rounds`
  project-and-clip rounds per conv kernel. `sweep` (e.g. (1, 3, 5, None)) makes clip_to a second sweep dimension:
  one run per (AR strength, clip value), in directories ar<s>_sp<c>."""
  return _block(clip_to=config_dict.placeholder(float), every_epochs=1, rounds=1, sweep=())


def _regularizer() -> ml_collections.ConfigDict:
  """The average-margin regularizer of poster 004 (arreg_jax.regularizers), with or without adversarial training:
  loss = mean CE − margin_lambda · mean clip_[0, margin_gamma](min_{k≠y} (w_y − w_k)ᵀΦ(x))
         + ortho_beta · Σ_l ‖W_l W_lᵀ − I‖²_F.   0 switches a term off (the step is then the unregularized one).
  `sweep` (e.g. ((0.0, 0.0), (0.5, 1e-3))) makes (margin_lambda, ortho_beta) a further sweep dimension: one run
  per (AR strength, [clip,] pair), in directories ar<s>_ml<λ>_ob<β>."""
  return _block(margin_lambda=0.0, margin_gamma=1.0, ortho_beta=0.0, sweep=())


def _margins() -> ml_collections.ConfigDict:
  """Per-epoch margin tracking (poster 004; arreg_jax.analysis.margin_tracking): min and mean of the logit margin
  (Definition 3) and of the feature-space margin min_k (f_y − f_k)/‖w_y − w_k‖ on the clean train and test sets,
  added to metrics.jsonl; the per-example values of the epochs in `hist_epochs` (and the last epoch) are saved as
  margins/epoch<k>.npz in the run directory (margin histograms)."""
  return _block(track=False, max_examples=config_dict.placeholder(int),  # per split; None = all
                hist_epochs=())


def _distributed() -> ml_collections.ConfigDict:
  """Several hosts (arreg_jax.distributed): jax.distributed.initialize() before anything runs; the three values are
  detected on Cloud TPU, Slurm and Open MPI when left None. Every host runs the same command and --workdir."""
  return _block(enabled=False,
                coordinator_address=config_dict.placeholder(str),  # 'host:port' of process 0
                num_processes=config_dict.placeholder(int), process_id=config_dict.placeholder(int))


def _logging() -> ml_collections.ConfigDict:
  """What a run reports while it trains (arreg_jax.training.metrics_writer); changes nothing that is trained."""
  return _block(tensorboard=True,  # TensorBoard scalars in <run>/tensorboard/ when tensorboardX is installed
                progress_every_s=30.0)  # an in-epoch progress line at most this often (0: never)


def _analysis() -> ml_collections.ConfigDict:
  """The analysis and report run after the sweep (arreg_jax.analysis, arreg_jax.report; SPEC §5–6)."""
  a = _block(enabled=True)  # analyze every finished run and write report.md at the end of run()
  # Margins, probabilities and losses (Fig. 1b, 4, 5a,b) over the first N examples of each split (None = all).
  a.max_train_examples = config_dict.placeholder(int)
  a.max_test_examples = config_dict.placeholder(int)
  a.bins = 60                 # histogram bins; the edges are fixed, the same for every run
  a.margin_range = (-20.0, 20.0)  # margin histogram range (logits); outside values go to the end bins
  a.margin_tau = 1.0          # also report the fraction of examples with |margin| < tau
  a.loss_range = (0.0, 10.0)
  # Loss variation (B.5, Table 1): L∞ radii as fractions of eval.pgd_eps (1/8, 1/4, 1/2 of 8/255 = 1, 2, 4 /255),
  # PGD from the clean input with `steps` steps of step_rel·ε, over the first N test examples (None = all, as the
  # paper; 256 keeps the analysis of the MNIST default sweep shorter than one of its training epochs on a CPU).
  a.loss_variation_eps_rel = (0.125, 0.25, 0.5)
  a.loss_variation_examples = ml_collections.FieldReference(256, field_type=int)
  a.loss_variation_steps = 4
  a.loss_variation_step_rel = 0.5
  # Which examples: 'test' (B.5) or 'train_correct' — the correctly classified training examples, the maximum over
  # perturbed points still classified correctly (draft 003, Fig. 3), among the first loss_variation_examples.
  a.loss_variation_split = 'test'
  # v_min of Theorem 3.1 (arreg_jax.analysis.boundary): screen N training examples by their first-order distance
  # to the boundary, refine the K closest by bisection (rounds × L2 PGD steps).
  a.boundary_screen_examples = 512
  a.boundary_refine_examples = 16
  a.boundary_rounds = 8
  a.boundary_steps = 8
  # Constants of the bound (eq. 4): ramp width γ (None = the median training margin), covering constant C_X and
  # dimension k, covering radius ε (None = the run's training ε, or eval.pgd_eps at AR 0), confidence η.
  a.bound = _block(gamma=config_dict.placeholder(float), c_x=1.0, k=10.0, eps=config_dict.placeholder(float),
                   eta=0.05)
  return a


def base_config() -> ml_collections.ConfigDict:
  """Every key a run config may set, with its default; locked (an unknown key is an error)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.precision = 'float32'  # 'float32' | 'bfloat16' (compute in bf16; params, optimizer, loss in f32)
  c.paper = config_dict.placeholder(str)  # the paper experiment this config reproduces (arreg_jax.report.paper)
  c.data = _data()
  c.model = _block(name='small_cnn')
  c.train = _train()
  c.attack = _attack()
  c.sweep = (4, 8, 16)  # AR strengths; one model per entry (0 = standard training)
  c.eval = _eval()
  c.spectral = _spectral()
  c.regularizer = _regularizer()
  c.margins = _margins()
  c.distributed = _distributed()
  c.checkpoint = _block(keep=3)
  c.logging = _logging()
  c.analysis = _analysis()
  c.lock()
  return c


# Blocks that do not change what a run trains: a run resumes (and a finished run is reused) under new values of
# these; any other difference from its saved config.json is refused.
NON_TRAINING_BLOCKS = ('analysis', 'distributed', 'logging', 'eval.robustness')


def training_differences(saved: dict, requested: dict) -> list[str]:
  """The dotted keys in which two run configs (as dicts) differ, outside :data:`NON_TRAINING_BLOCKS`. A key that
  one of them lacks (a config saved by an older version) counts with today's default, as ``from_saved`` reads it."""
  defaults = config_json.flatten(config_json.to_dict(base_config()))
  a, b = config_json.flatten(saved), config_json.flatten(requested)
  trains = lambda k: not any(k == blk or k.startswith(blk + '.') for blk in NON_TRAINING_BLOCKS)
  return sorted(k for k in set(a) | set(b) if trains(k) and a.get(k, defaults.get(k)) != b.get(k, defaults.get(k)))


# A value rule: (predicate on the value, what it requires in words); ConfigError names the key, the rule, the value.
Rule = Callable[[Any], bool]


def _at_least(lo) -> tuple[Rule, str]:
  return (lambda v: v >= lo), f'>= {lo}'


def _positive() -> tuple[Rule, str]:
  return (lambda v: v > 0), '> 0'


def _optional(rule: tuple[Rule, str]) -> tuple[Rule, str]:
  check, text = rule
  return (lambda v: v is None or check(v)), f'None or {text}'


def _one_of(options) -> tuple[Rule, str]:
  return (lambda v: v in options), f'one of {tuple(options)}'


# Every rule on one key's value, block by block (rules relating several keys are in the _check_* functions below).
_RULES: tuple[tuple[str, tuple[Rule, str]], ...] = (
    ('train.epochs', _at_least(1)), ('train.batch_size', _at_least(1)), ('train.learning_rate', _positive()),
    ('train.momentum', ((lambda v: 0 <= v < 1), 'in [0, 1)')), ('train.weight_decay', _at_least(0)),
    ('train.steps_per_call', _at_least(1)), ('train.eps_ramp_epochs', _at_least(0)),
    ('train.optimizer', _one_of(OPTIMIZERS)), ('precision', _one_of(PRECISIONS)),
    ('attack.norm', _one_of(NORMS)), ('attack.bn_mode', _one_of(BN_MODES)),
    ('attack.strength_unit', _positive()), ('attack.steps', _at_least(1)),
    ('attack.step_size', _optional(_positive())), ('attack.step_size_rel', _optional(_positive())),
    ('eval.pgd_eps', _at_least(0)), ('eval.pgd_steps', _at_least(1)), ('eval.pgd_step_size', _at_least(0)),
    ('eval.batch_size', _at_least(1)), ('eval.every_epochs', _at_least(1)),
    ('spectral.every_epochs', _at_least(1)), ('spectral.rounds', _at_least(1)),
    ('checkpoint.keep', _at_least(1)), ('logging.progress_every_s', _at_least(0)),
    ('regularizer.margin_lambda', _at_least(0)), ('regularizer.ortho_beta', _at_least(0)),
    ('regularizer.margin_gamma', _positive()),
    ('margins.max_examples', _optional(_at_least(1))),
    ('analysis.max_train_examples', _optional(_at_least(1))), ('analysis.max_test_examples', _optional(_at_least(1))),
    ('analysis.loss_variation_examples', _optional(_at_least(1))), ('analysis.bins', _at_least(2)),
    ('analysis.margin_tau', _positive()), ('analysis.loss_variation_steps', _at_least(1)),
    ('analysis.loss_variation_step_rel', _positive()),
    ('analysis.loss_variation_split', _one_of(LOSS_VARIATION_SPLITS)),
    ('analysis.boundary_screen_examples', _at_least(1)), ('analysis.boundary_refine_examples', _at_least(1)),
    ('analysis.boundary_rounds', _at_least(1)), ('analysis.boundary_steps', _at_least(1)),
    ('analysis.bound.gamma', _optional(_positive())), ('analysis.bound.eps', _optional(_positive())),
    ('analysis.bound.c_x', _positive()), ('analysis.bound.k', _positive()),
    ('analysis.bound.eta', ((lambda v: 0 < v < 1), 'in (0, 1)')),
)


def _value(c: ml_collections.ConfigDict, dotted: str):
  node = c
  for part in dotted.split('.'):
    node = node[part]
  return node


def need(ok: bool, msg: str) -> None:
  """Raises ConfigError(``msg``) unless ``ok``."""
  if not ok:
    raise ConfigError(msg)


def _check_rules(c: ml_collections.ConfigDict) -> None:
  for key, (rule, text) in _RULES:
    v = _value(c, key)
    try:
      ok = rule(v)
    except TypeError:  # a value of the wrong type (a string for a number, None for a required value)
      ok = False
    need(ok, f'config.{key} must be {text}, got {v!r}')


def _check_data(c: ml_collections.ConfigDict) -> None:
  d = c.data
  need(d.name in DATASETS, f'unknown dataset {d.name!r} (config.data.name); choose one of {DATASETS}')
  need(d.source in SOURCES, f'unknown data source {d.source!r} (config.data.source); choose one of {SOURCES}')
  need(d.source != 'embedded' or d.name == 'mnist',
       f"source 'embedded' ships MNIST only; for {d.name!r} set config.data.source='files' and "
       "config.data.data_dir, or 'tfds'")
  need(d.source != 'files' or d.data_dir,
       f"config.data.source='files' needs config.data.data_dir: the folder holding the {d.name} files")
  for k in ('train_size', 'test_size', 'classes'):
    need(d[k] is None or d[k] > 0, f'config.data.{k} must be positive or None, got {d[k]}')
  keep = list(d.keep_classes)
  need(all(isinstance(k, int) and k >= 0 for k in keep) and len(set(keep)) == len(keep) and len(keep) != 1,
       f'config.data.keep_classes must list at least two distinct class indices (or be empty), got {keep}')


def _check_names(c: ml_collections.ConfigDict) -> None:
  need(c.model.name in models.MODEL_NAMES,
       f'unknown model {c.model.name!r} (config.model.name); choose one of {", ".join(models.MODEL_NAMES)}')
  a = c.attack
  need(a.kind in ATTACK_KINDS, f'unknown attack {a.kind!r} (config.attack.kind); choose one of {ATTACK_KINDS}')


def _check_training(c: ml_collections.ConfigDict) -> None:
  check_microbatches(c.train.microbatches, c.train.batch_size)
  need(list(c.train.lr_boundaries) == sorted(c.train.lr_boundaries), 'config.train.lr_boundaries must be increasing')
  a = c.attack
  need((a.step_size is None) != (a.step_size_rel is None),
       'set exactly one of config.attack.step_size (absolute) and config.attack.step_size_rel (fraction of ε)')
  sweep = list(c.sweep)
  need(len(sweep) >= 1, 'config.sweep must list at least one AR strength')
  for s in sweep:
    need(isinstance(s, (int, float)) and s >= 0,
         f'AR strength {s!r} in config.sweep is invalid: ε = strength × unit must be >= 0')
  need(len(set(sweep)) == len(sweep), f'config.sweep has repeated strengths: {sweep}')


def _check_eval(c: ml_collections.ConfigDict) -> None:
  e = c.eval
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


def _check_sweep_dimensions(c: ml_collections.ConfigDict) -> None:
  sp = c.spectral
  for v in list(sp.sweep) + [sp.clip_to]:
    need(v is None or (isinstance(v, (int, float)) and v > 0),
         f'spectral clipping thresholds must be > 0 or None, got {v!r} (config.spectral)')
  need(not (sp.sweep and sp.clip_to is not None), 'set config.spectral.clip_to or config.spectral.sweep, not both')
  r = c.regularizer
  for pair in r.sweep:
    need(isinstance(pair, (tuple, list)) and len(pair) == 2 and all(isinstance(v, (int, float)) and v >= 0
                                                                     for v in pair),
         f'config.regularizer.sweep entries must be (margin_lambda, ortho_beta) pairs >= 0, got {pair!r}')
  need(len({tuple(p) for p in r.sweep}) == len(r.sweep), 'config.regularizer.sweep has repeated entries')
  need(not (r.sweep and (r.margin_lambda or r.ortho_beta)),
       'set config.regularizer.margin_lambda/ortho_beta or config.regularizer.sweep, not both')
  need(all(isinstance(e, int) and e >= 1 for e in c.margins.hist_epochs),
       f'config.margins.hist_epochs must list epochs >= 1, got {tuple(c.margins.hist_epochs)}')


def _check_analysis(c: ml_collections.ConfigDict) -> None:
  an = c.analysis
  for k in ('margin_range', 'loss_range'):
    need(len(an[k]) == 2 and an[k][0] < an[k][1],
         f'config.analysis.{k} must be (low, high) with low < high, got {tuple(an[k])}')
  need(len(an.loss_variation_eps_rel) >= 1 and all(v > 0 for v in an.loss_variation_eps_rel),
       f'config.analysis.loss_variation_eps_rel must list radii > 0 (fractions of eval.pgd_eps), got '
       f'{tuple(an.loss_variation_eps_rel)}')
  need(an.boundary_refine_examples <= an.boundary_screen_examples,
       'config.analysis.boundary_refine_examples must be <= boundary_screen_examples')


def validate(c: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for the first problem found: bad names, impossible values (there are no unknown keys:
  the config is locked). Names first (a misspelt dataset or model is the likeliest mistake), then every value
  rule of the table ``_RULES``, then the rules that relate several keys."""
  _check_data(c)
  _check_names(c)
  _check_rules(c)
  _check_training(c)
  _check_eval(c)
  _check_sweep_dimensions(c)
  _check_analysis(c)


def divisors(n: int) -> list[int]:
  return [k for k in range(1, int(n) + 1) if n % k == 0]


def check_microbatches(k, batch_size: int) -> None:
  """Raises ConfigError unless ``k`` is 'auto' or an int >= 1 that divides ``batch_size`` (the device count is
  checked once the devices are known: ``arreg_jax.training.setup.setup_sweep``)."""
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
