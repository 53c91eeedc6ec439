"""The README's "Library use" snippets, run as written (AutoAttack shortened to a few iterations), for a Flax linen,
a Flax NNX and an Equinox model: the attacks take any JAX model through a ``logits_fn``."""

import functools
import pathlib
import re

import numpy as np
import pytest

from arreg_jax import attacks

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'


def _snippets() -> dict[str, str]:
  text = README.read_text()
  library = text[text.index('## Library use'):text.index('## Results')]
  blocks = re.findall(r'```python\n(.*?)```', library, re.S)
  found = {}
  for marker, name in (('# Flax linen', 'linen'), ('# Flax NNX', 'nnx'), ('# Equinox', 'equinox')):
    found[name] = next(b for b in blocks if marker in b)
  return found


@pytest.mark.parametrize('kind', ['linen', 'nnx', 'equinox'])
def test_readme_snippet_runs(kind, tmp_path, monkeypatch):
  if kind == 'equinox':
    pytest.importorskip('equinox')
  monkeypatch.chdir(tmp_path)
  snippets = _snippets()
  source = snippets[kind]
  if kind != 'linen':  # the NNX and Equinox snippets continue the linen one (its imports)
    source = '\n'.join(l for l in snippets['linen'].splitlines() if l.startswith(('import', 'from'))) + '\n' + source
  rng = np.random.default_rng(0)
  quick = functools.partial(attacks.AutoAttack, steps=3, n_targets=2, queries=10, verbose=False)
  scope = {'x_test': rng.random((8, 32, 32, 3), dtype=np.float32), 'y_test': rng.integers(0, 10, 8).astype(np.int32),
           '_quick_autoattack': quick}
  exec(compile(source.replace('attacks.AutoAttack(', '_quick_autoattack('), f'README:{kind}', 'exec'), scope)
  result = scope['result']
  assert list(result.stages) == ['clean', 'apgd_ce', 'apgd_t', 'fab_t', 'square']
  assert scope['x_adv'].shape == (8, 32, 32, 3)
  assert np.abs(scope['x_adv'] - scope['x_test']).max() <= 8 / 255 + 1e-6
  if kind == 'linen':
    assert (tmp_path / 'autoattack.json').exists()
