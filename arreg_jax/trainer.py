"""Training a sweep: one model per member (:mod:`arreg_jax.sweep`), resumable, with per-epoch metrics.

:func:`train_sweep` trains every member of ``config``'s sweep into its run directory (layout:
:mod:`arreg_jax.rundir`) and writes ``summary.json``; it does not analyse (``arreg_jax.main`` runs train → analyse →
report in turn). A member's run is four named pieces:

* :func:`prepare_run_dir` — a finished run with the same config is reused; a run (finished or not) saved under a
  different training config is refused; otherwise its config is written;
* :func:`build_run` — model, optimizer, compiled steps, checkpoint manager, restored state (resume);
* :func:`train_epoch` — one epoch of compiled multi-step calls, with in-epoch progress lines at dispatch boundaries;
* :func:`evaluate_epoch` / :func:`final_evaluation` — the per-epoch and final metrics (SPEC §5).

Unfinished members resume from their last checkpoint and, on the same machine and seed, end with the same metrics as
an uninterrupted run: the step keys and epoch permutations are functions of the step and epoch numbers only.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

from absl import logging
import jax
import ml_collections
import numpy as np

from arreg_jax import epoch_margins as margin_tracking
from arreg_jax import checkpoint, config_json, configuration, distributed, evaluation, models, rundir, sharding
from arreg_jax import train
from arreg_jax import programs as programs_lib
from arreg_jax import sweep as sweep_lib
from arreg_jax.data import get_dataset
from arreg_jax.errors import ConfigError, DivergenceError, OutputError
from arreg_jax.metrics_writer import MetricsWriter


class DeviceData:
  """The dataset resident on the devices (uint8 images, int32 labels), replicated over the mesh."""

  def __init__(self, ds, mesh):
    rep = sharding.replicated(mesh)
    self.train_images = jax.device_put(ds.train_images, rep)
    self.train_labels = jax.device_put(ds.train_labels.astype(np.int32), rep)
    self.test_images = jax.device_put(ds.test_images, rep)
    self.test_labels = jax.device_put(ds.test_labels.astype(np.int32), rep)
    self.num_train = int(ds.train_images.shape[0])


def final_row(strength: float, final: dict) -> dict:
  """A summary row in the paper's columns (accuracies in %, SPEC §5: ΔAcc = train − test, ΔLoss = test − train)."""
  return {
      'strength': strength,
      'train_acc': 100 * final['train']['acc'], 'test_acc': 100 * final['test']['acc'],
      'acc_gap': 100 * (final['train']['acc'] - final['test']['acc']),
      'train_loss': final['train']['loss'], 'test_loss': final['test']['loss'],
      'loss_gap': final['test']['loss'] - final['train']['loss'],
      'pgd_acc': 100 * final['test']['pgd_acc'],
  }


def _training_key(dotted: str) -> bool:
  return not any(dotted == b or dotted.startswith(b + '.') for b in configuration.NON_TRAINING_BLOCKS)


def config_differences(saved: dict, requested: dict) -> list[str]:
  """The dotted keys in which two run configs differ, outside the blocks that do not change training. A key that
  one of them lacks (a config saved by an older version) counts with today's default, as ``from_saved`` reads it."""
  defaults = config_json.flatten(config_json.to_dict(configuration.base_config()))
  a, b = config_json.flatten(saved), config_json.flatten(requested)
  return sorted(k for k in set(a) | set(b)
                if _training_key(k) and a.get(k, defaults.get(k)) != b.get(k, defaults.get(k)))


def check_same_training(run_dir: str, saved: dict, requested: dict) -> None:
  """Raises ConfigError when ``run_dir``'s saved config differs from ``requested`` in what it trains."""
  keys = config_differences(saved, requested)
  if keys:
    state = 'a finished' if rundir.is_finished(run_dir) else 'an unfinished'
    shown = ', '.join(keys[:8]) + (f' and {len(keys) - 8} more' if len(keys) > 8 else '')
    raise ConfigError(f'{run_dir} holds {state} run with a different config (differs in: {shown}); run it with its '
                      'own config, or choose another --workdir')


def prepare_run_dir(run_dir: str, run_cfg: dict) -> bool:
  """Checks ``run_dir`` against the member's config dict; returns True when it holds the finished run already.

  Writes the config (the non-training blocks may have changed) unless the run is finished.
  """
  cfg_path = os.path.join(run_dir, rundir.CONFIG)
  if os.path.exists(cfg_path):
    check_same_training(run_dir, rundir.read_json(cfg_path), run_cfg)
  if rundir.is_finished(run_dir):
    return True
  os.makedirs(run_dir, exist_ok=True)
  rundir.write_json(cfg_path, run_cfg)
  return False


@dataclasses.dataclass
class Run:
  """Everything one member's training needs, built once (:func:`build_run`); its compiled programs may be shared
  with other members (:mod:`arreg_jax.programs`)."""
  config: ml_collections.ConfigDict
  strength: float
  run_dir: str
  programs: programs_lib.Programs
  schedule: Callable
  state: train.TrainState
  hyper: train.StepHyper  # the member's ε, λ, β and training key: arguments of the shared training program
  start_epoch: int
  steps_per_epoch: int
  perm_key: jax.Array
  eval_key: jax.Array
  ckpt: checkpoint.Checkpointer
  track: Callable | None

  @property
  def module(self):
    return self.programs.module

  def permutation(self, epoch: int) -> jax.Array:
    return self.programs.permutation(self.perm_key, epoch)

  def clip(self, params):
    return self.programs.clip(params, self.config.spectral.clip_to)


def build_run(config, strength: float, ds, data: DeviceData, mesh, run_dir: str,
              cache: programs_lib.ProgramCache | None = None) -> Run:
  """Builds one member's state (restoring its latest checkpoint, if any) and finds its compiled programs in
  ``cache`` (or compiles them there)."""
  root = jax.random.key(config.seed)
  init_key, train_key, eval_key = jax.random.split(root, 3)
  _, variables = models.create(config.model.name, num_classes=ds.num_classes, key=init_key,
                               input_shape=ds.image_shape)
  steps_per_epoch = data.num_train // config.train.batch_size
  tx = train.make_optimizer(config.train, steps_per_epoch)
  rep = sharding.replicated(mesh)
  state = jax.device_put(train.init_state(variables, tx), rep)
  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, rundir.CHECKPOINTS), keep=config.checkpoint.keep)
  start_epoch, state = ckpt.restore_latest_intact(state)
  if start_epoch:
    logging.info('AR %g: resumed from the checkpoint of epoch %d', strength, start_epoch)
  hyper = train.step_hyper(config, strength, train_key)
  if jax.process_count() == 1:  # placed once, not copied to every device per call; several processes cannot
    hyper, eval_key = jax.device_put((hyper, eval_key), rep)  # device_put typed keys: jit takes them as they are
  progs = (cache or programs_lib.ProgramCache()).get(config, strength, ds, data, mesh, state, hyper, eval_key,
                                                     f'AR {strength:g}')
  track = _margin_tracker(config, progs.module, ds, mesh, run_dir) if config.margins.track else None
  return Run(config=config, strength=strength, run_dir=run_dir, programs=progs,
             schedule=train.lr_schedule(config.train, steps_per_epoch), state=state, hyper=hyper,
             start_epoch=start_epoch, steps_per_epoch=steps_per_epoch, perm_key=jax.random.fold_in(root, 7),
             eval_key=eval_key, ckpt=ckpt, track=track)


def train_epoch(run: Run, data: DeviceData, epoch: int, writer: MetricsWriter) -> dict[str, float]:
  """Runs one epoch's compiled calls on ``run.state`` (:func:`train.run_epoch`, with in-epoch progress lines when
  they are due); returns the epoch's metric sums. Clips the spectra after the epoch's last step when configured."""
  batch, k, first = run.config.train.batch_size, run.programs.microbatches, (epoch - 1) * run.steps_per_epoch
  inside = lambda step, i: writer.microbatch_progress(epoch, step - first, i, k, run.steps_per_epoch, batch)
  with train.microbatch_listener(inside):
    run.state, sums = train.run_epoch(
        run.programs.multi_steps, run.programs.calls, run.state, data.train_images, data.train_labels,
        run.permutation(epoch), run.hyper,
        progress=lambda done: writer.progress(epoch, done, run.steps_per_epoch, done * batch),
        progress_due=writer.progress_due)
  if run.programs.clip is not None and epoch % run.config.spectral.every_epochs == 0:
    run.state = run.state.replace(params=run.clip(run.state.params))  # after the epoch's last step (appendix D.3)
  return sums


def evaluate_epoch(run: Run, data: DeviceData, num_test: int) -> dict:
  """Test loss, accuracy and PGD accuracy (on the first ``eval.pgd_examples_per_epoch`` clean-correct examples)."""
  e = run.config.eval
  variables = run.state.variables()
  test = evaluation.evaluate(run.programs.eval_step, variables, data.test_images, data.test_labels, batch_size=e.batch_size,
                        key=run.eval_key, limit=e.pgd_examples_per_epoch)
  if e.pgd_examples_per_epoch is not None and e.pgd_examples_per_epoch < num_test:
    full = evaluation.evaluate(run.programs.clean_eval_step, variables, data.test_images, data.test_labels,
                          batch_size=e.batch_size, key=run.eval_key)
    test = {**full, 'pgd_acc': test['pgd_acc'], 'pgd_examples': test['count']}
  else:
    test['pgd_examples'] = test['count']
  return dict(test_loss=test['loss'], test_acc=test['acc'], pgd_acc=test['pgd_acc'],
              pgd_examples=test['pgd_examples'])


def epoch_row(run: Run, epoch: int, sums: dict, train_time: float) -> dict:
  """The epoch's metrics row; raises DivergenceError (saving nothing) when the training loss is not finite."""
  train_loss = sums['loss_sum'] / sums['count']
  if not math.isfinite(train_loss):
    last = run.ckpt.latest_epoch()
    raise DivergenceError(
        f'AR {run.strength:g}: the training loss became {train_loss} in epoch {epoch}; stopped without saving it. '
        f'The last good checkpoint ({"epoch " + str(last) if last else "none"}) in {run.run_dir}/checkpoints is '
        'intact. Lower config.train.learning_rate (or ramp ε with config.train.eps_ramp_epochs) and rerun in a '
        'new --workdir')
  step = int(run.state.step)
  row = {'epoch': epoch, 'step': step, 'train_loss': train_loss, 'train_acc': sums['correct'] / sums['count'],
         'train_time_s': train_time, 'images_per_s': sums['count'] / train_time,
         'lr': float(run.schedule(step - 1))}  # the rate of the epoch's last update
  if 'margin_term_sum' in sums:
    row['train_margin_term'] = sums['margin_term_sum'] / sums['count']
  return row


def final_evaluation(run: Run, data: DeviceData) -> dict:
  """Final metrics: clean train set (no augmentation), clean test set, PGD over all clean-correct test examples."""
  c, reg = run.config, run.config.regularizer
  variables = run.state.variables()
  final = {
      'strength': run.strength,
      'clip_to': c.spectral.clip_to,
      'regularizer': {k: float(reg[k]) for k in ('margin_lambda', 'margin_gamma', 'ortho_beta')},
      'epsilon': run.strength * c.attack.strength_unit,
      'epochs': c.train.epochs,
      'train': evaluation.evaluate(run.programs.clean_eval_step, variables, data.train_images, data.train_labels,
                              batch_size=c.eval.batch_size, key=run.eval_key),
      'test': evaluation.evaluate(run.programs.eval_step, variables, data.test_images, data.test_labels,
                             batch_size=c.eval.batch_size, key=run.eval_key),
  }
  final['row'] = {**final_row(run.strength, final), 'clip_to': c.spectral.clip_to,
                  'margin_lambda': float(reg.margin_lambda), 'ortho_beta': float(reg.ortho_beta)}
  return final


def train_member(config, member: sweep_lib.Member, ds, data: DeviceData, mesh, run_dir: str,
                 cache: programs_lib.ProgramCache | None = None) -> dict:
  """Trains (or resumes, or reuses) one member; returns its final metrics (``final.json``). ``cache`` holds the
  compiled programs of the sweep's earlier members."""
  run_cfg = sweep_lib.member_config_dict(config, member)
  if prepare_run_dir(run_dir, run_cfg):
    logging.info('%s: finished earlier, reusing it', run_dir)
    if distributed.is_main_process():
      print(f'[{member.name}] already finished: {os.path.join(run_dir, rundir.FINAL)}', flush=True)
    return rundir.read_json(os.path.join(run_dir, rundir.FINAL))
  config = sweep_lib.member_config(config, member)
  run = build_run(config, member.strength, ds, data, mesh, run_dir, cache)
  writer = MetricsWriter(run_dir, epochs=config.train.epochs, tensorboard=config.logging.tensorboard,
                         progress_every_s=config.logging.progress_every_s)
  writer.resume(run.start_epoch)
  try:
    for epoch in range(run.start_epoch + 1, config.train.epochs + 1):
      t0 = time.time()
      writer.start_epoch()
      sums = train_epoch(run, data, epoch, writer)
      row = epoch_row(run, epoch, sums, time.time() - t0)
      if run.programs.ortho is not None:
        row['ortho_penalty'] = float(run.programs.ortho(run.state.params))
      if run.track is not None:
        row.update(run.track(run.state.variables(), epoch))
      if epoch % config.eval.every_epochs == 0 or epoch == config.train.epochs:
        row.update(evaluate_epoch(run, data, ds.num_test))
      row['epoch_time_s'] = time.time() - t0
      writer.record_epoch(row)
      try:
        run.ckpt.save(epoch, run.state)
      except OutputError:
        writer.rollback(epoch - 1)  # metrics.jsonl back to the epochs that have a checkpoint
        raise
      writer.print_epoch(row)
    final = final_evaluation(run, data)
    rundir.write_json(os.path.join(run_dir, rundir.FINAL), final)
    writer.write_final(final['row'], config.train.epochs)
  finally:
    writer.close()
    run.ckpt.close()
  return final


def _margin_tracker(config, module, ds, mesh, run_dir: str):
  """``track(variables, epoch) -> row entries``: min / mean logit and feature-space margins on the clean train and
  test sets (:mod:`arreg_jax.analysis.margin_tracking`); saves the per-example values of the epochs in
  ``config.margins.hist_epochs`` and of the last epoch to ``margins/epoch<k>.npz``."""
  limit = config.margins.max_examples
  hist = set(int(e) for e in config.margins.hist_epochs) | {int(config.train.epochs)}
  batch = max(config.eval.batch_size // mesh.size, 1) * mesh.size

  def track(variables, epoch: int) -> dict:
    t0 = time.time()
    row, arrays = {}, {}
    for split in ('train', 'test'):
      summary, a = margin_tracking.track(module, variables, getattr(ds, f'{split}_images'),
                                         getattr(ds, f'{split}_labels'), split=split, augment_kind=ds.augment,
                                         batch_size=batch, mesh=mesh, limit=limit)
      row.update(summary)
      arrays.update(a)
    if epoch in hist:
      rundir.write_npz(os.path.join(run_dir, rundir.MARGINS, f'epoch{epoch}.npz'), {'epoch': np.int32(epoch), **arrays})
    row['margin_time_s'] = time.time() - t0
    return row

  return track


def microbatch_size(config) -> int:
  """The examples of one microbatch (the whole batch with microbatches = 1 or 'auto', until it is resolved)."""
  k = config.train.microbatches
  return config.train.batch_size // (k if isinstance(k, int) and k >= 1 else 1)


def training_mesh(config):
  """The training mesh: the largest device count that divides the (micro)batch."""
  return sharding.make_mesh(sharding.data_parallel_devices(microbatch_size(config)))


def check_sizes(config, ds, mesh) -> None:
  """Raises ConfigError when the batch sizes do not fit the data or the devices."""
  sharding.check_divisible(config.train.batch_size, mesh, 'config.train.batch_size')  # only fails on several hosts
  if microbatch_size(config) % mesh.size:
    raise ConfigError(f'config.train.microbatches = {config.train.microbatches} gives microbatches of '
                      f'{microbatch_size(config)} examples, which do not split over the {mesh.size} devices; choose '
                      f'microbatches so that batch_size / microbatches is a multiple of {mesh.size}, or auto')
  n = ds.train_images.shape[0]
  if config.train.batch_size > n:
    raise ConfigError(f'config.train.batch_size = {config.train.batch_size} exceeds the {n} training examples of '
                      f'{ds.name}; lower the batch size or raise config.data.train_size')


SWEEP_KEYS = ('sweep', 'spectral.sweep', 'regularizer.sweep')


def check_sweep_dir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses a ``workdir`` that is a file, or that holds a sweep (or runs) of a different training config."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is an existing file, not a directory; choose another --workdir')
  cfg_path = os.path.join(workdir, rundir.CONFIG)
  if os.path.exists(cfg_path):  # the sweep dimensions may grow: members are checked one by one below
    keys = [k for k in config_differences(rundir.read_json(cfg_path), config_json.to_dict(config))
            if k not in SWEEP_KEYS]
    if keys:
      raise ConfigError(f'{workdir} holds a sweep with a different config (differs in: {", ".join(keys[:8])}); '
                        'run it with its own config, or choose another --workdir')
  for m in sweep_lib.members(config):
    run_dir = os.path.join(workdir, m.name)
    cfg = os.path.join(run_dir, rundir.CONFIG)
    if os.path.exists(cfg):
      check_same_training(run_dir, rundir.read_json(cfg), sweep_lib.member_config_dict(config, m))


def train_sweep(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> dict:
  """Validates ``config``, loads the data, trains every member of the sweep into ``workdir``.

  Returns the summary (also written to ``workdir/summary.json``). Nothing is written before the config, the data
  and the work directory have been checked.
  """
  configuration.validate(config)
  mesh = mesh or training_mesh(config)
  check_sweep_dir(workdir, config)
  ds = get_dataset(config.data)
  check_sizes(config, ds, mesh)
  logging.info('%s: %d train / %d test examples, %d classes, image %s; %d of %d device(s)', ds.name,
               ds.train_images.shape[0], ds.test_images.shape[0], ds.num_classes, ds.image_shape, mesh.size,
               jax.device_count())
  os.makedirs(workdir, exist_ok=True)
  rundir.write_json(os.path.join(workdir, rundir.CONFIG), config_json.to_dict(config))
  data = DeviceData(ds, mesh)
  rows = []
  t0 = time.time()
  summary = {}
  cache = programs_lib.ProgramCache()
  for member in sweep_lib.members(config):
    final = train_member(config, member, ds, data, mesh, os.path.join(workdir, member.name), cache)
    rows.append({**final['row'], 'run': member.name})
    summary = {'dataset': ds.name, 'model': config.model.name, 'paper': config.paper,
               'attack': config.attack.kind, 'strength_unit': config.attack.strength_unit, 'rows': rows}
    rundir.write_json(os.path.join(workdir, rundir.SUMMARY), summary)
  logging.info('sweep finished in %.1f s; %d set(s) of compiled programs for %d member(s)', time.time() - t0,
               cache.built, cache.built + cache.reused)
  return summary
