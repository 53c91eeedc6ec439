"""Training a checked sweep (:class:`arreg_jax.training.setup.SweepSetup`): one model per member, resumable, with
per-epoch metrics; writes ``summary.json``. It does not analyze (``arreg_jax.main`` runs train → analyze → report).

A member's run is four named pieces:

* :func:`build_run` — model, optimizer, the static specs of its compiled programs (memory-planned), checkpoint
  manager, restored state (resume);
* :func:`run_epoch` / :func:`train_epoch` — one epoch of compiled multi-step calls
  (:func:`arreg_jax.training.step.train_steps`), with in-epoch progress lines at dispatch boundaries;
* :func:`evaluate_epoch` / :func:`final_evaluation` — the per-epoch and final metrics (SPEC §5,
  :mod:`arreg_jax.training.eval_step`);
* :func:`train_member` — the epochs, each recorded, checkpointed and then printed.

Compiled programs are shared by ``jax.jit``'s own cache: members whose static specs are equal (the AR-trained
members of a sweep differ only in the traced ε) run the programs the first of them compiled. Unfinished members
resume from their last checkpoint and, on the same machine and seed, end with the same metrics as an uninterrupted
run: the step keys and epoch permutations are functions of the step and epoch numbers only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from arreg_jax import config_json, distributed, models, regularizers, rundir, sharding, spectral
from arreg_jax.training import epoch_margins
from arreg_jax.errors import DivergenceError, OutputError
from arreg_jax.training import eval_step, memory_plan
from arreg_jax.training import step as step_lib
from arreg_jax.training.checkpoints import Checkpointer
from arreg_jax.training.metrics_writer import MetricsWriter
from arreg_jax.training.setup import MemberRun, SweepSetup
from arreg_jax.training.state import Optimizer, TrainState, init_state

orthogonality_penalty = jax.jit(regularizers.orthogonality_penalty)


class DeviceData:
  """The dataset resident on the devices (uint8 images, int32 labels), replicated over the mesh."""

  def __init__(self, ds, mesh):
    rep = sharding.replicated(mesh)
    self.train_images = jax.device_put(ds.train_images, rep)
    self.train_labels = jax.device_put(ds.train_labels.astype(np.int32), rep)
    self.test_images = jax.device_put(ds.test_images, rep)
    self.test_labels = jax.device_put(ds.test_labels.astype(np.int32), rep)
    self.num_train = int(ds.train_images.shape[0])


class MicrobatchRelay:
  """The host end of the in-step progress callback of microbatched steps, one per sweep: the compiled steps hold
  it in their static spec (so that the members share their program) and it forwards to the member training now
  (:meth:`to`)."""

  def __init__(self):
    self._target: step_lib.MicrobatchProgress | None = None

  def __call__(self, step: int, i: int) -> None:
    target = self._target
    if target is not None:
      target(step, i)

  @contextlib.contextmanager
  def to(self, target: step_lib.MicrobatchProgress):
    self._target = target
    try:
      yield
    finally:
      self._target = None


@functools.partial(jax.jit, static_argnames=('num_examples', 'out_sharding'))
def epoch_permutation(key: jax.Array, epoch, *, num_examples: int, out_sharding) -> jax.Array:
  """The int32 permutation of the training set that epoch ``epoch`` trains in (a function of the key and the
  epoch only, so a resumed run draws the permutations of an uninterrupted one), placed with ``out_sharding``."""
  perm = jax.random.permutation(jax.random.fold_in(key, epoch), num_examples).astype(jnp.int32)
  return jax.lax.with_sharding_constraint(perm, out_sharding)


def epoch_calls(steps_per_epoch: int, steps_per_call: int) -> list[int]:
  """The steps of each dispatch of one epoch: ``steps_per_call`` at a time, the leftover in a shorter last call."""
  per_call = min(steps_per_call, steps_per_epoch)
  return [per_call] * (steps_per_epoch // per_call) + ([steps_per_epoch % per_call] if steps_per_epoch % per_call
                                                         else [])


@dataclasses.dataclass
class Run:
  """Everything one member's training needs, built once (:func:`build_run`)."""
  config: ml_collections.ConfigDict
  strength: float
  run_dir: str
  module: nn.Module
  mesh: jax.sharding.Mesh
  specs: dict[int, step_lib.StepSpec]  # steps per call -> the training program's spec
  calls: list[int]  # steps per dispatch over one epoch
  eval_pgd: eval_step.EvalStep  # clean + PGD metrics, memory-planned on the test set
  eval_clean: eval_step.EvalStep
  clip: Callable | None  # params -> params with every layer's spectrum clipped at spectral.clip_to
  state: TrainState
  hyper: step_lib.StepHyper  # the member's ε, λ, β and training key: arguments of the shared training program
  start_epoch: int
  steps_per_epoch: int
  perm_key: jax.Array
  eval_key: jax.Array
  ckpt: Checkpointer
  track: Callable | None

  @property
  def microbatches(self) -> int:
    return self.specs[self.calls[0]].microbatches

  def schedule(self, update: int) -> float:
    """The learning rate of update ``update`` (0-based)."""
    return float(self.specs[self.calls[0]].optimizer.schedule()(update))


def _spectral_clip(config, module, variables, image_shape, mesh) -> Callable:
  specs = spectral.layer_specs(module, variables, (1, *image_shape), train=False)
  return lambda params: jax.device_put(
      spectral.clip_params(params, specs, config.spectral.clip_to, rounds=config.spectral.rounds),
      sharding.replicated(mesh))


def build_run(config, strength: float, ds, data: DeviceData, mesh, run_dir: str,
              relay: MicrobatchRelay | None = None) -> Run:
  """Builds one member's state (restoring its latest checkpoint, if any) and the specs of its compiled programs,
  the training step's microbatches and the evaluation's attack chunks planned against the device memory."""
  root = jax.random.key(config.seed)
  init_key, train_key, eval_key = jax.random.split(root, 3)
  _, variables = models.create(config.model.name, num_classes=ds.num_classes, key=init_key,
                               input_shape=ds.image_shape)
  module = models.get_module(config.model.name, num_classes=ds.num_classes,
                             dtype=models.compute_dtype(config.precision))
  steps_per_epoch = data.num_train // config.train.batch_size
  calls = epoch_calls(steps_per_epoch, config.train.steps_per_call)
  spec_of = lambda k: step_lib.step_spec(
      config, module=module, adversarial=step_lib.is_adversarial(config, strength), augment=ds.augment,
      steps_per_epoch=steps_per_epoch, batch_sharding=sharding.batch_sharding(mesh), steps_per_call=calls[0],
      microbatches=k, progress=relay)
  rep = sharding.replicated(mesh)
  state = jax.device_put(init_state(variables, Optimizer.from_config(config.train, steps_per_epoch)), rep)
  ckpt = Checkpointer(os.path.join(run_dir, rundir.CHECKPOINTS), keep=config.checkpoint.keep)
  start_epoch, state = ckpt.restore_latest_intact(state)
  if start_epoch:
    logging.info('AR %g: resumed from the checkpoint of epoch %d', strength, start_epoch)
  hyper = step_lib.step_hyper(config, strength, train_key)
  if jax.process_count() == 1:  # placed once, not copied to every device per call; several processes cannot
    hyper, eval_key = jax.device_put((hyper, eval_key), rep)  # device_put typed keys: jit takes them as they are
  what = f'AR {strength:g}'
  spec = memory_plan.plan_training(spec_of, config.train.microbatches, state, hyper, data.train_images,
                                   data.train_labels, mesh, what)
  eval_pgd = memory_plan.plan_evaluation(
      eval_step.make_eval_step(module, augment_kind=ds.augment, pgd_cfg=eval_step.pgd_spec(config)),
      config.eval.batch_size, state.variables(), data.test_images, data.test_labels, eval_key, mesh, what)
  clip = (_spectral_clip(config, module, state.variables(), ds.image_shape, mesh)
          if config.spectral.clip_to is not None else None)
  track = _margin_tracker(config, module, ds, mesh, run_dir) if config.margins.track else None
  return Run(config=config, strength=strength, run_dir=run_dir, module=module, mesh=mesh,
             specs={n: spec.replace(steps_per_call=n) for n in set(calls)}, calls=calls, eval_pgd=eval_pgd,
             eval_clean=eval_step.make_eval_step(module, augment_kind=ds.augment), clip=clip, state=state,
             hyper=hyper, start_epoch=start_epoch, steps_per_epoch=steps_per_epoch,
             perm_key=jax.random.fold_in(root, 7), eval_key=eval_key, ckpt=ckpt, track=track)


def run_epoch(specs: dict[int, step_lib.StepSpec], calls: list[int], state: TrainState, images, labels, perm,
              hyper: step_lib.StepHyper, *, progress: Callable[[int], None] | None = None,
              progress_due: Callable[[], bool] | None = None) -> tuple[TrainState, dict[str, float]]:
  """Runs one epoch as ``train_steps(specs[k], state, images, labels, perm, hyper)`` for each ``k`` in ``calls``
  (:func:`epoch_calls`); returns the new state and the epoch's metric sums as floats (one device→host copy).

  The host keeps at most :data:`arreg_jax.sharding.MAX_IN_FLIGHT` calls in flight (:class:`~arreg_jax.sharding.
  DispatchWindow`): on several XLA:CPU devices a host that runs 32 programs ahead deadlocks the next all-reduce.
  When ``progress_due()`` says so at a dispatch boundary, the host waits for the oldest call in flight (the newer
  ones stay queued, so the devices never idle) and calls ``progress(steps finished)``; no other host sync happens.
  """
  total = sum(calls)
  window = sharding.DispatchWindow()
  sums, done = None, 0
  for k in calls:
    state, m = step_lib.train_steps(specs[k], state, images, labels, perm, hyper)
    sums = m if sums is None else step_lib.add_metrics(sums, m)
    done += k
    window.push(sums, tag=done)
    finished = window.finished
    if progress is not None and done < total and progress_due():
      if finished is None and len(window) >= 2:
        finished = window.wait_oldest()
      if finished is not None:
        progress(finished)
  return state, {k: float(v) for k, v in jax.device_get(sums).items()}


def train_epoch(run: Run, data: DeviceData, epoch: int, writer: MetricsWriter, relay: MicrobatchRelay
                ) -> dict[str, float]:
  """Runs one epoch on ``run.state`` (:func:`run_epoch`, with in-epoch progress lines when they are due); returns
  the epoch's metric sums. Clips the spectra after the epoch's last step when configured."""
  batch, k, first = run.config.train.batch_size, run.microbatches, (epoch - 1) * run.steps_per_epoch
  inside = lambda step, i: writer.microbatch_progress(epoch, step - first, i, k, run.steps_per_epoch, batch)
  perm = epoch_permutation(run.perm_key, epoch, num_examples=data.num_train,
                           out_sharding=sharding.replicated(run.mesh))
  with relay.to(inside):
    run.state, sums = run_epoch(
        run.specs, run.calls, run.state, data.train_images, data.train_labels, perm, run.hyper,
        progress=lambda done: writer.progress(epoch, done, run.steps_per_epoch, done * batch),
        progress_due=writer.progress_due)
  if run.clip is not None and epoch % run.config.spectral.every_epochs == 0:
    run.state = run.state.replace(params=run.clip(run.state.params))  # after the epoch's last step (appendix D.3)
  return sums


def evaluate_epoch(run: Run, data: DeviceData, num_test: int) -> dict:
  """Test loss, accuracy and PGD accuracy (on the first ``eval.pgd_examples_per_epoch`` clean-correct examples)."""
  e = run.config.eval
  variables = run.state.variables()
  test = eval_step.evaluate(run.eval_pgd, variables, data.test_images, data.test_labels, batch_size=e.batch_size,
                            key=run.eval_key, limit=e.pgd_examples_per_epoch)
  if e.pgd_examples_per_epoch is not None and e.pgd_examples_per_epoch < num_test:
    full = eval_step.evaluate(run.eval_clean, variables, data.test_images, data.test_labels,
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
         'lr': run.schedule(step - 1)}  # the rate of the epoch's last update
  if 'margin_term_sum' in sums:
    row['train_margin_term'] = sums['margin_term_sum'] / sums['count']
  return row


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
      'train': eval_step.evaluate(run.eval_clean, variables, data.train_images, data.train_labels,
                                  batch_size=c.eval.batch_size, key=run.eval_key),
      'test': eval_step.evaluate(run.eval_pgd, variables, data.test_images, data.test_labels,
                                 batch_size=c.eval.batch_size, key=run.eval_key),
  }
  final['row'] = {**final_row(run.strength, final), 'clip_to': c.spectral.clip_to,
                  'margin_lambda': float(reg.margin_lambda), 'ortho_beta': float(reg.ortho_beta)}
  return final


def _train_epochs(run: Run, data: DeviceData, num_test: int, writer: MetricsWriter, relay: MicrobatchRelay) -> None:
  """The member's remaining epochs: each trained, measured, recorded, checkpointed, then printed."""
  config = run.config
  for epoch in range(run.start_epoch + 1, config.train.epochs + 1):
    t0 = time.time()
    writer.start_epoch()
    sums = train_epoch(run, data, epoch, writer, relay)
    row = epoch_row(run, epoch, sums, time.time() - t0)
    if config.regularizer.ortho_beta or config.margins.track:
      row['ortho_penalty'] = float(orthogonality_penalty(run.state.params))
    if run.track is not None:
      row.update(run.track(run.state.variables(), epoch))
    if epoch % config.eval.every_epochs == 0 or epoch == config.train.epochs:
      row.update(evaluate_epoch(run, data, num_test))
    row['epoch_time_s'] = time.time() - t0
    writer.record_epoch(row)
    try:
      run.ckpt.save(epoch, run.state)
    except OutputError:
      writer.rollback(epoch - 1)  # metrics.jsonl back to the epochs that have a checkpoint
      raise
    writer.print_epoch(row)


def train_member(config, member: MemberRun, ds, data: DeviceData, mesh, relay: MicrobatchRelay) -> dict:
  """Trains (or resumes, or reuses) one member of the sweep ``config``; returns its final metrics
  (``final.json``)."""
  if member.finished:
    logging.info('%s: finished earlier, reusing it', member.run_dir)
    if distributed.is_main_process():
      print(f'[{member.name}] already finished: {os.path.join(member.run_dir, rundir.FINAL)}', flush=True)
    return rundir.read_json(os.path.join(member.run_dir, rundir.FINAL))
  os.makedirs(member.run_dir, exist_ok=True)
  rundir.write_json(os.path.join(member.run_dir, rundir.CONFIG), member.saved)  # non-training blocks may be new
  run = build_run(member.config, member.strength, ds, data, mesh, member.run_dir, relay)
  epochs = member.config.train.epochs
  writer = MetricsWriter(member.run_dir, epochs=epochs, tensorboard=config.logging.tensorboard,
                         progress_every_s=config.logging.progress_every_s)
  writer.resume(run.start_epoch)
  try:
    _train_epochs(run, data, ds.num_test, writer, relay)
    final = final_evaluation(run, data)
    rundir.write_json(os.path.join(member.run_dir, rundir.FINAL), final)
    writer.write_final(final['row'], epochs)
  finally:
    writer.close()
    run.ckpt.close()
  return final


def _margin_tracker(config, module, ds, mesh, run_dir: str):
  """``track(variables, epoch) -> row entries``: min / mean logit and feature-space margins on the clean train and
  test sets (:mod:`arreg_jax.training.epoch_margins`); saves the per-example values of the epochs in
  ``config.margins.hist_epochs`` and of the last epoch to ``margins/epoch<k>.npz``."""
  limit = config.margins.max_examples
  hist = set(int(e) for e in config.margins.hist_epochs) | {int(config.train.epochs)}
  batch = max(config.eval.batch_size // mesh.size, 1) * mesh.size

  def track(variables, epoch: int) -> dict:
    t0 = time.time()
    row, arrays = {}, {}
    for split in ('train', 'test'):
      summary, a = epoch_margins.track(module, variables, getattr(ds, f'{split}_images'),
                                       getattr(ds, f'{split}_labels'), split=split, augment_kind=ds.augment,
                                       batch_size=batch, mesh=mesh, limit=limit)
      row.update(summary)
      arrays.update(a)
    if epoch in hist:
      rundir.write_npz(os.path.join(run_dir, rundir.MARGINS, f'epoch{epoch}.npz'), {'epoch': np.int32(epoch), **arrays})
    row['margin_time_s'] = time.time() - t0
    return row

  return track


def train_sweep(setup: SweepSetup) -> dict:
  """Trains every member of a checked sweep (:func:`arreg_jax.training.setup.setup_sweep`) into its work
  directory; returns the summary (also written to ``workdir/summary.json`` after every member)."""
  config, workdir = setup.config, setup.workdir
  os.makedirs(workdir, exist_ok=True)
  rundir.write_json(os.path.join(workdir, rundir.CONFIG), config_json.to_dict(config))
  data = DeviceData(setup.dataset, setup.mesh)
  relay = MicrobatchRelay()
  rows, summary, t0 = [], {}, time.time()
  for member in setup.members:
    final = train_member(config, member, setup.dataset, data, setup.mesh, relay)
    rows.append({**final['row'], 'run': member.name})
    summary = {'dataset': setup.dataset.name, 'model': config.model.name, 'paper': config.paper,
               'attack': config.attack.kind, 'strength_unit': config.attack.strength_unit, 'rows': rows}
    rundir.write_json(os.path.join(workdir, rundir.SUMMARY), summary)
  distributed.barrier('arreg_jax: sweep trained')  # every process sees the runs finished before it analyzes them
  logging.info('sweep trained in %.1f s', time.time() - t0)
  return summary
