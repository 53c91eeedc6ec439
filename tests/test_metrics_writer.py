"""The metrics writer (JSONL, stdout, TensorBoard) and the in-epoch progress lines of the training loop."""

import json
import os

import pytest

from arreg_jax import configuration, presets, rundir
from arreg_jax.training import loop, metrics_writer, setup


def _write_epoch(writer, row):
  """What the training loop does with an epoch's row: record it (then checkpoint), then print it."""
  writer.record_epoch(row)
  writer.print_epoch(row)


def _row(epoch, loss=0.5):
  return {'epoch': epoch, 'step': 10 * epoch, 'train_loss': loss, 'train_acc': 0.9, 'images_per_s': 100.0,
          'epoch_time_s': 2.0, 'test_acc': 0.8, 'pgd_acc': 0.3, 'lr': 0.1}


def test_rows_lines_and_resume(tmp_path, capsys):
  w = metrics_writer.MetricsWriter(str(tmp_path / 'ar0.1'), epochs=3, tensorboard=False)
  for e in (1, 2, 3):
    _write_epoch(w, _row(e))
  w.write_final({'train_acc': 90.0, 'test_acc': 80.0, 'pgd_acc': 30.0, 'train_loss': 0.5, 'test_loss': 0.6}, 3)
  w.close()
  out = capsys.readouterr().out.splitlines()
  assert out[0].startswith('[ar0.1] epoch 1/3  train loss 0.5000 acc 90.00%  test acc 80.00%  PGD acc 30.00%')
  assert out[0].endswith('100 img/s  ETA 0:04') and out[2].endswith('ETA 0:00')  # 2 s per epoch, 2 to go
  assert out[3].startswith('[ar0.1] final: train acc 90.00%')
  path = tmp_path / 'ar0.1' / rundir.METRICS
  assert [r['epoch'] for r in rundir.read_jsonl(str(path))] == [1, 2, 3]
  w = metrics_writer.MetricsWriter(str(tmp_path / 'ar0.1'), epochs=3, tensorboard=False)
  w.resume(1)  # the checkpoint of epoch 1: later lines are recomputed
  assert [r['epoch'] for r in rundir.read_jsonl(str(path))] == [1]
  assert 'resuming after epoch 1' in capsys.readouterr().out


@pytest.mark.skipif(not metrics_writer.tensorboard_available(), reason='tensorboardX is not installed')
def test_tensorboard_scalars_are_written(tmp_path):
  w = metrics_writer.MetricsWriter(str(tmp_path), epochs=2, tensorboard=True)
  _write_epoch(w, _row(1, loss=0.75))
  _write_epoch(w, _row(2, loss=float('nan')))  # non-finite values are skipped, not written
  w.close()
  events = [f for f in os.listdir(tmp_path / rundir.TENSORBOARD) if f.startswith('events.out.tfevents')]
  assert len(events) == 1
  data = (tmp_path / rundir.TENSORBOARD / events[0]).read_bytes()
  for tag in (b'epoch/train_loss', b'epoch/test_acc', b'epoch/lr', b'epoch/images_per_s'):
    assert tag in data


def test_without_tensorboardx_nothing_breaks(tmp_path, monkeypatch):
  monkeypatch.setattr(metrics_writer, 'tensorboardX', None)
  w = metrics_writer.MetricsWriter(str(tmp_path), epochs=1, tensorboard=True)
  _write_epoch(w, _row(1))
  w.close()
  assert not (tmp_path / rundir.TENSORBOARD).exists()
  assert len(rundir.read_jsonl(str(tmp_path / rundir.METRICS))) == 1


def test_format_duration():
  assert metrics_writer.format_duration(59.6) == '1:00'
  assert metrics_writer.format_duration(3 * 3600 + 61) == '3:01:01'


def test_training_prints_in_epoch_progress_at_dispatch_boundaries(tmp_path, capsys):
  """With a progress interval of ~0 s every dispatch boundary reports the steps of the oldest call in flight, which
  the host waits for (the newest stays queued); the epoch's own line follows."""
  c = presets.smoke(configuration.base_config())
  c.sweep, c.train.epochs, c.analysis.enabled = (0.0,), 1, False
  c.data.train_size, c.train.batch_size = 256, 32  # 8 steps, one per dispatch
  c.logging.progress_every_s = 1e-9
  loop.train_sweep(setup.setup_sweep(c, str(tmp_path)))
  out = [line for line in capsys.readouterr().out.splitlines() if line.startswith('[ar0]')]
  progress = [line for line in out if ' step ' in line]
  assert [line.split(' step ')[1].split()[0] for line in progress] == [f'{k}/8' for k in range(1, 7)]
  assert 'img/s' in progress[0] and 'epoch ETA' in progress[0]
  assert out[len(progress)].startswith('[ar0] epoch 1/1  train loss')
  rows = rundir.read_jsonl(str(tmp_path / 'ar0' / rundir.METRICS))
  assert rows[0]['step'] == 8 and abs(rows[0]['lr'] - c.train.learning_rate) < 1e-9
  assert json.load(open(tmp_path / 'ar0' / rundir.FINAL))['epochs'] == 1


def test_microbatched_steps_print_progress_from_inside_the_step(tmp_path, capsys):
  """A step of 4 microbatches reports them as they finish (one line each, duplicates from other devices dropped)."""
  c = presets.smoke(configuration.base_config())
  c.sweep, c.train.epochs, c.analysis.enabled = (0.0,), 1, False
  c.data.train_size, c.train.batch_size, c.train.microbatches = 64, 32, 4  # 2 steps of 4 microbatches
  c.logging.progress_every_s = 1e-9
  loop.train_sweep(setup.setup_sweep(c, str(tmp_path)))
  out = [line for line in capsys.readouterr().out.splitlines() if line.startswith('[ar0]')]
  inside = [line.split(' step ')[1].split(' done')[0] for line in out if 'microbatch' in line]
  assert inside == [f'{s}/2, microbatch {i}/4' for s in (1, 2) for i in range(1, 5)], out
