"""The bottom layer: atomic writes that never leave half a file, and leave the old one intact when they fail."""

import json
import math
import os

import numpy as np
import pytest

from arreg_jax import rundir
from arreg_jax.errors import OutputError


def test_json_and_jsonl_round_trip(tmp_path):
  p = str(tmp_path / 'sub' / 'x.json')
  rundir.write_json(p, {'a': [1, 2], 'b': float('inf'), 'c': np.float32(0.5)}, safe=True)
  assert rundir.read_json(p) == {'a': [1, 2], 'b': 'inf', 'c': 0.5}
  m = str(tmp_path / 'm.jsonl')
  for e in (1, 2, 3):
    rundir.append_jsonl(m, {'epoch': e})
  rundir.truncate_jsonl(m, 2)
  assert rundir.read_jsonl(m) == [{'epoch': 1}, {'epoch': 2}]
  assert rundir.read_jsonl(str(tmp_path / 'none.jsonl')) == []
  assert rundir.json_safe([math.nan, np.int64(3), np.bool_(True)]) == ['nan', 3, True]


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
  p = str(tmp_path / 'summary.json')
  rundir.write_json(p, {'v': 1})

  def explode(f):
    f.write('{"v": 2, "half')
    raise OSError(28, 'No space left on device')

  with pytest.raises(OutputError, match='could not write .*summary.json: No space left on device'):
    rundir.atomic_write(p, explode)
  assert rundir.read_json(p) == {'v': 1}
  assert os.listdir(tmp_path) == ['summary.json']


def test_npz_and_text(tmp_path):
  rundir.write_npz(str(tmp_path / 'a.npz'), {'x': np.arange(3)})
  assert np.load(tmp_path / 'a.npz')['x'].tolist() == [0, 1, 2]
  rundir.write_text(str(tmp_path / 'r.md'), '# hi\n')
  assert (tmp_path / 'r.md').read_text() == '# hi\n'


def test_run_dirs_are_found_by_their_config(tmp_path):
  (tmp_path / 'ar1').mkdir()
  (tmp_path / 'ar1' / rundir.CONFIG).write_text(json.dumps({'strength': 1}))
  (tmp_path / 'broken').mkdir()
  (tmp_path / 'broken' / rundir.CONFIG).write_text('{"strength": ')
  (tmp_path / 'figures').mkdir()
  assert [os.path.basename(p) for p, _ in rundir.run_dirs(str(tmp_path))] == ['ar1']
