"""A sweep over adversarial-robustness strengths: one model per strength, resumable, with per-epoch metrics.

Layout of a work directory::

  WORKDIR/
    config.json            the sweep's config
    summary.json           one row of final metrics per AR strength (rewritten after every member)
    ar<s>/                 one run per strength s in config.sweep
      config.json          the config, with this run's strength
      metrics.jsonl        one JSON line per epoch
      margins/epoch<k>.npz per-example margins at chosen epochs (config.margins, poster 004)
      checkpoints/<epoch>/ orbax checkpoints of the TrainState (the last config.checkpoint.keep)
      final.json           final metrics; its presence marks the run finished

Finished members are skipped; unfinished ones resume from their last checkpoint and, on the same machine and seed,
end with the same metrics as an uninterrupted run (the step keys and epoch permutations are functions of the step
and epoch numbers only).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from arreg_jax import checkpoint, configuration, distributed, models, regularizers, sharding, spectral, train
from arreg_jax.data import get_dataset
from arreg_jax.errors import ConfigError, DivergenceError


def _print(*args, **kw) -> None:
  """``print`` in process 0 only (one line per epoch, not one per host)."""
  if distributed.is_main_process():
    print(*args, **kw)


def write_json(path: str, obj: Any) -> None:
  """Writes JSON atomically (temporary file + rename): readers never see a half-written file."""
  if not distributed.is_main_process():  # files other than checkpoints come from process 0
    return
  d = os.path.dirname(path) or '.'
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp_', suffix='.json')
  with os.fdopen(fd, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write('\n')
  os.replace(tmp, path)


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  """Writes a compressed ``.npz`` atomically, from process 0 only (as :func:`write_json`)."""
  if not distributed.is_main_process():
    return
  d = os.path.dirname(path) or '.'
  os.makedirs(d, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp_', suffix='.npz')
  with os.fdopen(fd, 'wb') as f:
    np.savez_compressed(f, **arrays)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


# Config blocks that do not change what a run trains: a run resumes under new values of these (its config.json is
# rewritten); any other difference from the saved config.json is refused.
RESUME_IGNORES = ('analysis', 'distributed')


def _config_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _rewrite_metrics(path: str, keep_through_epoch: int) -> None:
  """Drops metric lines of epochs after the checkpoint being resumed from (they will be recomputed)."""
  if not distributed.is_main_process():
    return
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  rows = [r for r in rows if r['epoch'] <= keep_through_epoch]
  d = os.path.dirname(path)
  fd, tmp = tempfile.mkstemp(dir=d, prefix='.tmp_', suffix='.jsonl')
  with os.fdopen(fd, 'w') as f:
    for r in rows:
      f.write(json.dumps(r) + '\n')
  os.replace(tmp, path)


def _append_metrics(path: str, row: dict) -> None:
  if not distributed.is_main_process():
    return
  with open(path, 'a') as f:
    f.write(json.dumps(row) + '\n')
    f.flush()
    os.fsync(f.fileno())


def _fmt_time(seconds: float) -> str:
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f'{h}:{m:02d}:{s:02d}' if h else f'{m}:{s:02d}'


class _DeviceData:
  """The dataset resident on the devices (uint8 images, int32 labels), replicated over the mesh."""

  def __init__(self, ds, mesh):
    rep = sharding.replicated(mesh)
    self.train_images = jax.device_put(ds.train_images, rep)
    self.train_labels = jax.device_put(ds.train_labels.astype(np.int32), rep)
    self.test_images = jax.device_put(ds.test_images, rep)
    self.test_labels = jax.device_put(ds.test_labels.astype(np.int32), rep)
    self.num_train = int(ds.train_images.shape[0])


def _check_sizes(config, ds) -> None:
  n = ds.train_images.shape[0]
  if config.train.batch_size > n:
    raise ConfigError(f'config.train.batch_size = {config.train.batch_size} exceeds the {n} training examples of '
                      f'{ds.name}; lower the batch size or raise config.data.train_size')


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


def train_one(config: ml_collections.ConfigDict, strength: float, ds, data: _DeviceData, mesh, run_dir: str) -> dict:
  """Trains (or resumes, or skips) the model for one AR strength (and ``config.spectral.clip_to``); returns its
  final metrics."""
  tag = os.path.basename(run_dir)
  final_path = os.path.join(run_dir, 'final.json')
  if os.path.exists(final_path):
    logging.info('%s: finished earlier, skipping (%s)', tag, final_path)
    _print(f'[{tag}] already finished: {final_path}', flush=True)
    return read_json(final_path)

  os.makedirs(run_dir, exist_ok=True)
  run_cfg = _config_dict(config)
  run_cfg['strength'] = strength
  cfg_path = os.path.join(run_dir, 'config.json')
  old = read_json(cfg_path) if os.path.exists(cfg_path) else None
  diff = [] if old is None else sorted(k for k in set(old) | set(run_cfg)
                                       if k not in RESUME_IGNORES and old.get(k) != run_cfg.get(k))
  if diff:
    raise ConfigError(f'{run_dir} holds an unfinished run with a different config (differs in: {", ".join(diff)}); '
                      'resume it with its own config, or choose another --workdir')
  write_json(cfg_path, run_cfg)

  module = models.get_module(config.model.name, num_classes=ds.num_classes, dtype=compute_dtype(config))
  root = jax.random.key(config.seed)
  init_key, train_key, eval_key = jax.random.split(root, 3)
  perm_key = jax.random.fold_in(root, 7)
  _, variables = models.create(config.model.name, num_classes=ds.num_classes, key=init_key,
                               input_shape=ds.image_shape)
  batch = config.train.batch_size
  steps_per_epoch = data.num_train // batch
  tx = train.make_optimizer(config.train, steps_per_epoch)
  state = jax.device_put(train.init_state(variables, tx), sharding.replicated(mesh))

  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, 'checkpoints'), keep=config.checkpoint.keep)
  start_epoch = ckpt.latest_epoch() or 0
  if start_epoch:
    state = ckpt.restore(start_epoch, state)
    logging.info('AR %g: resumed from the checkpoint of epoch %d', strength, start_epoch)
    _print(f'[{tag}] resuming after epoch {start_epoch}', flush=True)
  metrics_path = os.path.join(run_dir, 'metrics.jsonl')
  _rewrite_metrics(metrics_path, start_epoch)

  # Steps run `steps_per_call` at a time in one dispatch; an epoch's leftover steps use a second, shorter program.
  per_call = min(config.train.steps_per_call, steps_per_epoch)
  calls = [per_call] * (steps_per_epoch // per_call) + ([steps_per_epoch % per_call] if steps_per_epoch % per_call
                                                         else [])
  step_kw = dict(config=config, strength=strength, augment_kind=ds.augment, steps_per_epoch=steps_per_epoch,
                 batch_size=batch, batch_sharding=sharding.batch_sharding(mesh), base_key=train_key)
  multi_steps = {k: train.make_multi_step(module, tx, steps_per_call=k, **step_kw) for k in set(calls)}
  clip_to = config.spectral.clip_to
  if clip_to is not None:
    specs = spectral.layer_specs(module, variables, (1, *ds.image_shape), train=False)
    clip = lambda params: jax.device_put(
        spectral.clip_params(params, specs, clip_to, rounds=config.spectral.rounds), sharding.replicated(mesh))
  permutation = jax.jit(lambda epoch: jax.random.permutation(jax.random.fold_in(perm_key, epoch), data.num_train
                                                             ).astype(jnp.int32),
                        out_shardings=sharding.replicated(mesh))
  pgd_cfg = ml_collections.ConfigDict({'eps': config.eval.pgd_eps, 'step_size': config.eval.pgd_step_size,
                                       'steps': config.eval.pgd_steps})
  eval_step = train.make_eval_step(module, augment_kind=ds.augment, pgd_cfg=pgd_cfg)
  clean_eval_step = train.make_eval_step(module, augment_kind=ds.augment, pgd_cfg=None)
  reg = config.regularizer
  track = _margin_tracker(config, module, ds, mesh, run_dir) if config.margins.track else None
  ortho = jax.jit(regularizers.orthogonality_penalty) if (reg.ortho_beta or track) else None

  epochs = config.train.epochs
  epoch_times = []
  for epoch in range(start_epoch + 1, epochs + 1):
    t0 = time.time()
    state, sums = train.run_epoch(multi_steps, calls, state, data.train_images, data.train_labels, permutation(epoch))
    if clip_to is not None and epoch % config.spectral.every_epochs == 0:
      state = state.replace(params=clip(state.params))  # after the epoch's last step (appendix D.3)
    train_time = time.time() - t0
    train_loss = sums['loss_sum'] / sums['count']
    if not math.isfinite(train_loss):
      last = ckpt.latest_epoch()
      ckpt.close()
      raise DivergenceError(
          f'AR {strength:g}: the training loss became {train_loss} in epoch {epoch}; stopped without saving it. '
          f'The last good checkpoint ({"epoch " + str(last) if last else "none"}) in {run_dir}/checkpoints is '
          'intact. Lower config.train.learning_rate (or ramp ε with config.train.eps_ramp_epochs) and rerun in a '
          'new --workdir')
    row = {'epoch': epoch, 'step': int(state.step), 'train_loss': train_loss,
           'train_acc': sums['correct'] / sums['count'], 'train_time_s': train_time,
           'images_per_s': sums['count'] / train_time,
           'lr': float(tx_lr(config.train, steps_per_epoch, int(state.step) - 1))}
    if 'margin_term_sum' in sums:
      row['train_margin_term'] = sums['margin_term_sum'] / sums['count']
    if ortho is not None:
      row['ortho_penalty'] = float(ortho(state.params))
    if track is not None:
      row.update(track(state.variables(), epoch))
    if epoch % config.eval.every_epochs == 0 or epoch == epochs:
      test = train.evaluate(eval_step, state.variables(), data.test_images, data.test_labels,
                            batch_size=config.eval.batch_size, key=eval_key,
                            limit=config.eval.pgd_examples_per_epoch)
      if config.eval.pgd_examples_per_epoch is not None and config.eval.pgd_examples_per_epoch < ds.num_test:
        full = train.evaluate(clean_eval_step, state.variables(), data.test_images, data.test_labels,
                              batch_size=config.eval.batch_size, key=eval_key)
        test = {**full, 'pgd_acc': test['pgd_acc'], 'pgd_examples': test['count']}
      else:
        test['pgd_examples'] = test['count']
      row.update(test_loss=test['loss'], test_acc=test['acc'], pgd_acc=test['pgd_acc'],
                 pgd_examples=test['pgd_examples'])
    epoch_times.append(time.time() - t0)
    row['epoch_time_s'] = epoch_times[-1]
    eta = np.mean(epoch_times) * (epochs - epoch)
    _append_metrics(metrics_path, row)
    ckpt.save(epoch, state)
    line = (f'[{tag}] epoch {epoch}/{epochs}  train loss {row["train_loss"]:.4f} '
            f'acc {100 * row["train_acc"]:.2f}%')
    if 'test_acc' in row:
      line += f'  test acc {100 * row["test_acc"]:.2f}%  PGD acc {100 * row["pgd_acc"]:.2f}%'
    line += f'  {row["images_per_s"]:.0f} img/s  ETA {_fmt_time(eta)}'
    _print(line, flush=True)

  # Final evaluation: clean train set (no augmentation), clean test set, PGD over all clean-correct test examples.
  final = {
      'strength': strength,
      'clip_to': clip_to,
      'regularizer': {k: float(reg[k]) for k in ('margin_lambda', 'margin_gamma', 'ortho_beta')},
      'epsilon': strength * config.attack.strength_unit,
      'epochs': epochs,
      'train': train.evaluate(clean_eval_step, state.variables(), data.train_images, data.train_labels,
                              batch_size=config.eval.batch_size, key=eval_key),
      'test': train.evaluate(eval_step, state.variables(), data.test_images, data.test_labels,
                             batch_size=config.eval.batch_size, key=eval_key),
  }
  final['row'] = {**final_row(strength, final), 'clip_to': clip_to, 'margin_lambda': float(reg.margin_lambda),
                  'ortho_beta': float(reg.ortho_beta)}
  write_json(final_path, final)
  ckpt.close()
  r = final['row']
  _print(f'[{tag}] final: train acc {r["train_acc"]:.2f}%  test acc {r["test_acc"]:.2f}%  '
         f'PGD acc {r["pgd_acc"]:.2f}%  train loss {r["train_loss"]:.4f}  test loss {r["test_loss"]:.4f}', flush=True)
  return final


def _margin_tracker(config, module, ds, mesh, run_dir: str):
  """``track(variables, epoch) -> row entries``: min / mean logit and feature-space margins on the clean train and
  test sets (``arreg_jax.analysis.margin_tracking``); saves the per-example values of the epochs in
  ``config.margins.hist_epochs`` and of the last epoch to ``margins/epoch<k>.npz``."""
  from arreg_jax.analysis import margin_tracking  # pylint: disable=g-import-not-at-top
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
      write_npz(os.path.join(run_dir, 'margins', f'epoch{epoch}.npz'), {'epoch': np.int32(epoch), **arrays})
    row['margin_time_s'] = time.time() - t0
    return row

  return track


def compute_dtype(config: ml_collections.ConfigDict):
  """The models' computation dtype: bfloat16 activations and matmuls for ``precision='bfloat16'``; parameters,
  optimizer state, logits, softmax and loss stay float32."""
  return jnp.bfloat16 if config.precision == 'bfloat16' else None


def tx_lr(train_cfg, steps_per_epoch: int, step: int) -> float:
  """The learning rate of the schedule in :func:`train.make_optimizer` at ``step``."""
  lr = train_cfg.learning_rate
  for b in train_cfg.lr_boundaries:
    if step >= int(b) * steps_per_epoch:
      lr *= train_cfg.lr_decay
  return lr


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Validates ``config``, loads the data, trains every member of ``config.sweep`` into ``workdir``.

  Returns the summary (also written to ``workdir/summary.json``). Nothing is written before the config and the
  data have been checked.
  """
  configuration.validate(config)
  mesh = sharding.make_mesh(sharding.data_parallel_devices(config.train.batch_size))  # evaluation pads its batches
  sharding.check_divisible(config.train.batch_size, mesh, 'config.train.batch_size')  # only fails on several hosts
  ds = get_dataset(config.data)
  _check_sizes(config, ds)
  logging.info('%s: %d train / %d test examples, %d classes, image %s; %d of %d device(s)', ds.name,
               ds.train_images.shape[0], ds.test_images.shape[0], ds.num_classes, ds.image_shape, mesh.size,
               jax.device_count())

  os.makedirs(workdir, exist_ok=True)
  write_json(os.path.join(workdir, 'config.json'), _config_dict(config))
  data = _DeviceData(ds, mesh)
  rows = []
  t0 = time.time()
  clip_sweep = bool(config.spectral.sweep)
  members = [(s, c, r) for s, c in configuration.sweep_members(config)
             for r in configuration.regularizer_members(config)]
  for strength, clip_to, reg in members:
    member = config.copy_and_resolve_references()
    member.spectral.clip_to = clip_to
    member.spectral.sweep = ()
    if reg is not None:
      member.regularizer.margin_lambda, member.regularizer.ortho_beta = reg
      member.regularizer.sweep = ()
    name = configuration.run_name(strength, clip_to, clip_sweep=clip_sweep, regularizer=reg)
    final = train_one(member, strength, ds, data, mesh, os.path.join(workdir, name))
    rows.append({**final['row'], 'run': name})
    summary = {'dataset': ds.name, 'model': config.model.name, 'paper': config.paper,
               'attack': config.attack.kind, 'strength_unit': config.attack.strength_unit, 'rows': rows}
    write_json(os.path.join(workdir, 'summary.json'), summary)
  logging.info('sweep finished in %.1f s', time.time() - t0)
  if config.analysis.enabled:  # analysis.json per run, then report.md, claims.json, figures/ (arreg_jax.analysis)
    from arreg_jax.analysis import run_analysis  # pylint: disable=g-import-not-at-top  (it imports this module)
    run_analysis.analyze_sweep(workdir, reuse=True, mesh=mesh)
  return summary


def load_run(run_dir: str, *, epoch: int | None = None):
  """Restores a trained run for analysis: returns ``(config, module, variables, dataset)``.

  ``config`` is the run's ``config.json`` (with its ``strength``) as a ConfigDict, ``module`` the Flax module,
  ``variables`` the Flax variables (``params`` and, for BatchNorm models, ``batch_stats``) of checkpoint ``epoch``
  (default: the latest), ``dataset`` the :class:`arreg_jax.data.Dataset` the run was trained on.
  """
  cfg_dict = read_json(os.path.join(run_dir, 'config.json'))
  strength = cfg_dict.pop('strength')
  config = configuration.base_config()
  config.update_from_flattened_dict(_flatten(cfg_dict))
  config.sweep = (strength,)
  ds = get_dataset(config.data)
  module = models.get_module(config.model.name, num_classes=ds.num_classes, dtype=compute_dtype(config))
  _, variables = models.create(config.model.name, num_classes=ds.num_classes, key=jax.random.key(config.seed),
                               input_shape=ds.image_shape)
  tx = train.make_optimizer(config.train, max(ds.num_train // config.train.batch_size, 1))
  state = train.init_state(variables, tx)
  ckpt = checkpoint.Checkpointer(os.path.join(run_dir, 'checkpoints'), keep=config.checkpoint.keep)
  epoch = epoch or ckpt.latest_epoch()
  if not epoch:
    raise ConfigError(f'{run_dir} has no checkpoint to analyse; train it first')
  state = ckpt.restore(epoch, state)
  ckpt.close()
  return config, module, state.variables(), ds


def _flatten(d: dict, prefix: str = '') -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f'{prefix}{k}.'))
    else:
      out[prefix + k] = tuple(v) if isinstance(v, list) else v
  return out
