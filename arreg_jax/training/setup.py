"""A sweep checked once, before anything is written: the config's values, the work directory against the configs saved
there, the data and the batch against the devices — into the :class:`SweepSetup` that training reads.

Nothing after :func:`setup_sweep` checks the config again: the training loop (:mod:`arreg_jax.training.loop`) takes
the members, their run directories and configs, the mesh and the dataset from the setup.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import jax
import ml_collections

from arreg_jax import config_json, configuration, rundir, sharding
from arreg_jax import sweep as sweep_lib
from arreg_jax.data import Dataset, get_dataset
from arreg_jax.errors import ConfigError

# The sweep dimensions: a sweep directory may gain members (its members are checked one by one).
SWEEP_KEYS = ('sweep', 'spectral.sweep', 'regularizer.sweep')


@dataclasses.dataclass(frozen=True)
class MemberRun:
  """One member of a checked sweep: where it trains and with what.

  Attributes:
    member: the sweep member (AR strength, clip threshold, regularizer pair, name).
    run_dir: its run directory.
    config: the config it trains with (:func:`arreg_jax.sweep.member_config`).
    saved: its ``config.json`` (:func:`arreg_jax.sweep.member_config_dict`).
    finished: the run directory holds the finished run already (it is reused).
  """
  member: sweep_lib.Member
  run_dir: str
  config: ml_collections.ConfigDict
  saved: dict
  finished: bool

  @property
  def name(self) -> str:
    return self.member.name

  @property
  def strength(self) -> float:
    return self.member.strength


@dataclasses.dataclass(frozen=True)
class SweepSetup:
  """What training a sweep needs, checked: the validated config, the work directory, the mesh (the largest device
  count that divides the (micro)batch), the dataset, and every member with its run directory."""
  config: ml_collections.ConfigDict
  workdir: str
  mesh: jax.sharding.Mesh
  dataset: Dataset
  members: tuple[MemberRun, ...]


def microbatch_size(config: ml_collections.ConfigDict) -> int:
  """The examples of one microbatch of a validated config (the whole batch while microbatches is 'auto')."""
  k = config.train.microbatches
  return config.train.batch_size // (1 if k == 'auto' else k)


def _check_same_training(run_dir: str, saved: dict, requested: dict) -> None:
  """Raises ConfigError when ``run_dir``'s saved config differs from ``requested`` in what it trains."""
  keys = configuration.training_differences(saved, requested)
  if keys:
    state = 'a finished' if rundir.is_finished(run_dir) else 'an unfinished'
    shown = ', '.join(keys[:8]) + (f' and {len(keys) - 8} more' if len(keys) > 8 else '')
    raise ConfigError(f'{run_dir} holds {state} run with a different config (differs in: {shown}); run it with its '
                      'own config, or choose another --workdir')


def _check_workdir(workdir: str, config: ml_collections.ConfigDict) -> tuple[MemberRun, ...]:
  """The sweep's members in ``workdir``; refuses a ``workdir`` that is a file, or that holds a sweep (or runs) of a
  different training config. Every file read is checked by :func:`arreg_jax.rundir.read_json`."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise ConfigError(f'--workdir {workdir} is an existing file, not a directory; choose another --workdir')
  cfg_path = os.path.join(workdir, rundir.CONFIG)
  if os.path.exists(cfg_path):
    keys = [k for k in configuration.training_differences(rundir.read_json(cfg_path), config_json.to_dict(config))
            if k not in SWEEP_KEYS]
    if keys:
      raise ConfigError(f'{workdir} holds a sweep with a different config (differs in: {", ".join(keys[:8])}); '
                        'run it with its own config, or choose another --workdir')
  members = []
  for m in sweep_lib.members(config):
    run_dir = os.path.join(workdir, m.name)
    saved = sweep_lib.member_config_dict(config, m)
    member_cfg = os.path.join(run_dir, rundir.CONFIG)
    if os.path.exists(member_cfg):
      _check_same_training(run_dir, rundir.read_json(member_cfg), saved)
    members.append(MemberRun(m, run_dir, sweep_lib.member_config(config, m), saved, rundir.is_finished(run_dir)))
  return tuple(members)


def check_sizes(config: ml_collections.ConfigDict, ds: Dataset, mesh) -> None:
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


def setup_sweep(config: ml_collections.ConfigDict, workdir: str, *, mesh=None) -> SweepSetup:
  """Checks ``config`` (:func:`arreg_jax.configuration.validate`), the work directory, the data and the batch sizes;
  returns what training needs. Writes nothing; raises ConfigError (or DataError for missing or damaged files).

  Args:
    config: the sweep's config.
    workdir: the sweep directory (created by training if it does not exist).
    mesh: the training mesh (default: the largest device count that divides the (micro)batch).
  """
  configuration.validate(config)
  mesh = mesh or sharding.make_mesh(sharding.data_parallel_devices(microbatch_size(config)))
  members = _check_workdir(workdir, config)
  ds = get_dataset(config.data)
  check_sizes(config, ds, mesh)
  logging.info('%s: %d train / %d test examples, %d classes, image %s; %d of %d device(s)', ds.name,
               ds.train_images.shape[0], ds.test_images.shape[0], ds.num_classes, ds.image_shape, mesh.size,
               jax.device_count())
  return SweepSetup(config=config, workdir=workdir, mesh=mesh, dataset=ds, members=members)
