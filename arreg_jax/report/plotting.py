"""The report's plotting kit: one style, one color per AR strength, shared bin edges, atomic PNG files.

Every figure is drawn with Matplotlib's object API (``matplotlib.figure.Figure``; no pyplot, no global state, no
display needed). Conventions shared by all figures (:mod:`figures`, :mod:`margin_evolution`):

* **One color per AR strength, the same in every figure** (:func:`strength_colors`: a sequential palette ordered
  by strength, dark = weak AR, light = strong AR), and legends labelled ``AR s``.
* Curves over AR strength put the strength on a linear x-axis with a tick at every strength of the sweep and mark
  each point with its strength's color; line styles distinguish the quantities (solid = test, dashed = train).
* Distributions are drawn as step-line histograms (densities) over bin edges **shared by all strengths**, so the
  curves are directly comparable; a dotted vertical line marks the decision boundary (margin 0).
* Published numbers, when the sweep reproduces a paper experiment, are drawn in grey with ``×`` markers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping, Sequence

import matplotlib

matplotlib.use('Agg', force=False)  # harmless if a backend is already chosen: Figure() below needs no pyplot
from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from arreg_jax import rundir  # pylint: disable=g-import-not-at-top

DPI = 150
MARGIN_LABEL = r'margin $M = f_y(x) - \max_{i \neq y} f_i(x)$ (logits)'
PROB_LABEL = r'true-class probability $p_y = \mathrm{softmax}(f(x))_y$'
LOSS_LABEL = r'cross-entropy loss $-\log p_y$'
PAPER_STYLE = dict(color='0.45', linestyle=':', marker='x', markersize=6, linewidth=1.3)
RC = {'font.size': 10, 'axes.titlesize': 11, 'axes.labelsize': 10, 'legend.fontsize': 9, 'xtick.labelsize': 9,
       'ytick.labelsize': 9, 'axes.grid': True, 'grid.alpha': 0.3, 'axes.spines.top': False,
       'axes.spines.right': False}


@dataclasses.dataclass
class RunView:
  """What the figures need of one run.

  Attributes:
    strength: AR strength s.
    record: the flat record of :func:`arreg_jax.report.claims.record_from_analysis`.
    analysis: the run's ``analysis.json``.
    arrays: the run's ``per_example.npz`` (``train_margin``, ``test_prob``, ``loss_increase_0``, …).
  """
  strength: float
  record: dict
  analysis: dict
  arrays: Mapping[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class Meta:
  """Sweep-wide labels: dataset, model, the strength unit (1/255 or 1) and the report title."""
  dataset: str
  model: str
  strength_unit: float
  title: str = ''

  @property
  def per_255(self) -> bool:
    return abs(self.strength_unit * 255 - 1) < 1e-6

  @property
  def strength_axis(self) -> str:
    if self.per_255:
      return 'AR strength s (training L∞ ε = s/255)'
    if self.strength_unit == 1:
      return 'AR strength s (training L∞ ε = s, pixels in [0, 1])'
    return f'AR strength s (training L∞ ε = {self.strength_unit:g}·s)'

  def eps_axis(self, what: str = 'attack') -> str:
    return f'{what} L∞ ε (×1/255)' if self.per_255 else f'{what} L∞ ε (pixels in [0, 1])'

  def eps_value(self, eps: float) -> float:
    return eps * 255 if self.per_255 else eps


def strength_colors(strengths: Sequence[float]) -> dict[float, tuple]:
  """A fixed color per AR strength: viridis from dark (weakest) to yellow-green (strongest), never pale yellow."""
  cmap = matplotlib.colormaps['viridis']
  ss = sorted(set(float(s) for s in strengths))
  if len(ss) == 1:
    return {ss[0]: cmap(0.25)}
  return {s: cmap(0.05 + 0.8 * i / (len(ss) - 1)) for i, s in enumerate(ss)}


def ar_label(s: float) -> str:
  return f'AR {s:g}'


def styled(fn):
  """Runs a figure function inside the shared rc style (fonts, grid, spines), without touching global state."""

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    with matplotlib.rc_context(RC):
      return fn(*args, **kwargs)

  return wrapper


def new_figure(w: float, h: float, nrows: int = 1, ncols: int = 1, **kw):
  fig = Figure(figsize=(w, h), dpi=DPI, layout='constrained')
  return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def save(fig, path: str) -> str:
  """Saves ``fig`` as PNG atomically (a reader or a crash never sees half a figure)."""
  rundir.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=DPI), binary=True)
  return path


def style_axis(ax):
  """Applies the shared rc style to an axis created inside a context (grid, spines)."""
  ax.grid(True, alpha=0.3)
  ax.spines['top'].set_visible(False)
  ax.spines['right'].set_visible(False)


def strength_ticks(ax, strengths):
  ax.set_xticks(list(strengths))
  ax.set_xticklabels([f'{s:g}' for s in strengths])


def curve(ax, xs, ys, colors, *, linestyle='-', label=None, marker='o', annotate=None, below=False):
  ax.plot(xs, ys, color='0.25', linestyle=linestyle, linewidth=1.4, label=label, zorder=2)
  for x, y in zip(xs, ys):
    ax.plot([x], [y], marker=marker, color=colors[x], markersize=7, markeredgecolor='0.15', zorder=3,
            linestyle='none')
    if annotate:
      lo, hi = ax.get_ylim()
      under = below and (y - lo) > 0.12 * (hi - lo)  # no room under a point near the bottom: label it above
      ax.annotate(annotate.format(y), (x, y), textcoords='offset points', xytext=(0, -14 if under else 7),
                  ha='center', fontsize=8, color='0.2')


def common_edges(arrays: Sequence[np.ndarray], bins: int, *, lo_q=0.001, hi_q=0.999, include_zero=True,
                 lo=None, hi=None) -> np.ndarray:
  """Bin edges shared by several samples: from the pooled ``lo_q``…``hi_q`` quantiles (values outside are left
  out of the plotted densities), widened to include 0 if asked; ``lo``/``hi`` fix an end."""
  pooled = np.concatenate([np.asarray(a, np.float64).ravel() for a in arrays])
  pooled = pooled[np.isfinite(pooled)]
  a = float(np.quantile(pooled, lo_q)) if lo is None else lo
  b = float(np.quantile(pooled, hi_q)) if hi is None else hi
  if include_zero:
    a, b = min(a, 0.0), max(b, 0.0)
  if b <= a:
    b = a + 1.0
  return np.linspace(a, b, bins + 1)


def hist_bins(n: int) -> int:
  """Histogram bins for n samples: 2.5·n^(1/3), between 30 and 80 (≈ 31 for 2 000, 54 for 10 000 examples)."""
  return int(np.clip(round(2.5 * n ** (1 / 3)), 30, 80))


def density_steps(ax, runs, key, edges, colors, *, density=True, label=True):
  for r in runs:
    v = np.asarray(r.arrays[key], np.float64)
    h, _ = np.histogram(v, bins=edges)
    if density:
      h = h / max(v.size, 1) / np.diff(edges)
    else:
      h = h / max(v.size, 1)
    ax.stairs(h, edges, color=colors[r.strength], linewidth=1.6, label=ar_label(r.strength) if label else None)
