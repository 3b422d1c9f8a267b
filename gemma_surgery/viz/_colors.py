"""Colour scales shared by the HTML renderers, the JavaScript and matplotlib.

A scale is a list of `(position, "#rrggbb")` anchors on [0, 1], interpolated
linearly in RGB. The same anchors go to the browser (attention view) and to
matplotlib (PNG export), so every picture of a quantity looks the same.
"""

from __future__ import annotations

import math

from gemma_surgery.viz._html import esc

Scale = list[tuple[float, str]]

# White to deep red: "how much changed" (logit-lens change, activations >= 0).
WARM: Scale = [
  (0.0, "#ffffff"),
  (0.2, "#fdebd3"),
  (0.45, "#f9b27c"),
  (0.7, "#e4573a"),
  (1.0, "#8e1b12"),
]
# White to deep blue: attention weights and probabilities.
COOL: Scale = [
  (0.0, "#ffffff"),
  (0.2, "#e1edf8"),
  (0.45, "#9cc3e4"),
  (0.7, "#3f86c2"),
  (1.0, "#0f3b78"),
]
# Blue - white - red, centred at 0.5: signed effects (patching, activations).
DIVERGING: Scale = [
  (0.0, "#1d4f91"),
  (0.25, "#7aa8d6"),
  (0.5, "#f7f7f7"),
  (0.75, "#ec8e73"),
  (1.0, "#9c1f1a"),
]
SCALES = {"warm": WARM, "cool": COOL, "diverging": DIVERGING}


def _rgb(hex_color: str) -> tuple[int, int, int]:
  h = hex_color.lstrip("#")
  return int(h[0:2], 16), int(h[2:4], 16), int(h[4:6], 16)


def get_scale(scale: str | Scale) -> Scale:
  """Looks up a named scale (`'warm'`, `'cool'`, `'diverging'`) or passes one."""
  if isinstance(scale, str):
    if scale not in SCALES:
      raise ValueError(f"unknown colour scale {scale!r}; known: {sorted(SCALES)}")
    return SCALES[scale]
  return list(scale)


def interpolate(scale: str | Scale, t: float) -> str:
  """The colour at `t` in [0, 1] (clipped; NaN gives light grey)."""
  anchors = get_scale(scale)
  if t is None or math.isnan(t):
    return "#e6e6e6"
  t = min(1.0, max(0.0, float(t)))
  for (p0, c0), (p1, c1) in zip(anchors, anchors[1:], strict=False):
    if t <= p1:
      f = 0.0 if p1 == p0 else (t - p0) / (p1 - p0)
      a, b = _rgb(c0), _rgb(c1)
      r, g, bl = (round(x + (y - x) * f) for x, y in zip(a, b, strict=True))
      return f"#{r:02x}{g:02x}{bl:02x}"
  return anchors[-1][1]


def text_color(background: str) -> str:
  """Black or white text, whichever reads better on `background`."""
  r, g, b = _rgb(background)
  luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
  return "#111111" if luminance > 140 else "#ffffff"


class Normalizer:
  """Maps data values to [0, 1] for a scale.

  Sequential: `vmin..vmax -> 0..1`. Diverging (`center` given): `center` maps
  to 0.5 and the larger distance from it to either end sets the range, so
  equal magnitudes get equally strong colours.
  """

  def __init__(self, vmin: float, vmax: float, center: float | None = None):
    if center is not None:
      half = max(abs(vmax - center), abs(center - vmin)) or 1.0
      vmin, vmax = center - half, center + half
    if not vmax > vmin:
      vmax = vmin + 1.0
    self.vmin, self.vmax, self.center = float(vmin), float(vmax), center

  def __call__(self, value: float) -> float:
    return (float(value) - self.vmin) / (self.vmax - self.vmin)


def cell_style(scale: str | Scale, t: float) -> str:
  """Inline CSS giving a background from the scale and a readable text colour."""
  bg = interpolate(scale, t)
  return f"background:{bg};color:{text_color(bg)}"


def gradient_css(scale: str | Scale) -> str:
  """A CSS `linear-gradient` showing the scale left to right."""
  stops = ", ".join(f"{c} {p * 100:.0f}%" for p, c in get_scale(scale))
  return f"linear-gradient(to right, {stops})"


def _fmt(v: float) -> str:
  return f"{v:.3g}"


def legend(scale: str | Scale, norm: Normalizer, label: str = "") -> str:
  """A small colour bar with the value range and an optional label."""
  mid = (
    f'<span class="gsv-legend-mid">{_fmt(norm.center)}</span>'
    if norm.center is not None
    else ""
  )
  return (
    '<div class="gsv-legend">'
    f'<span class="gsv-legend-label">{esc(label)}</span>'
    f'<span class="gsv-legend-lo">{_fmt(norm.vmin)}</span>'
    '<span class="gsv-legend-bar" '
    f'style="background:{gradient_css(scale)}">{mid}</span>'
    f'<span class="gsv-legend-hi">{_fmt(norm.vmax)}</span></div>'
  )


def matplotlib_cmap(scale: str | Scale, name: str = "gemma_surgery"):
  """The scale as a matplotlib `LinearSegmentedColormap` (imports matplotlib)."""
  from matplotlib.colors import LinearSegmentedColormap

  return LinearSegmentedColormap.from_list(name, get_scale(scale))
