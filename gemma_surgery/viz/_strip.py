"""Token strips: runs of tokens coloured by a scalar, with hover tooltips."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_surgery.viz import _colors, _html


def auto_norm(
  values: np.ndarray, vmax: float | None = None
) -> tuple[str, _colors.Normalizer]:
  """Scale and normalizer for activations: warm from 0, diverging if signed."""
  lo, hi = _colors_range(values)
  if lo < 0:
    bound = max(abs(lo), abs(hi)) if vmax is None else float(vmax)
    return "diverging", _colors.Normalizer(-bound, bound, center=0.0)
  return "warm", _colors.Normalizer(0.0, (hi if vmax is None else float(vmax)) or 1.0)


def _colors_range(values: np.ndarray) -> tuple[float, float]:
  v = np.asarray(values, dtype=np.float64)
  v = v[np.isfinite(v)]
  return (0.0, 1.0) if v.size == 0 else (float(v.min()), float(v.max()))


def token_span(
  token: str,
  value: float,
  scale: str,
  norm: _colors.Normalizer,
  tip: str,
  *,
  extra_class: str = "",
  sub: str | None = None,
  index: int | None = None,
) -> str:
  """One coloured token `<span>` with a tooltip (and an optional caption)."""
  style = _colors.cell_style(scale, norm(value))
  cls = "gsv-tok" + (f" {extra_class}" if extra_class else "")
  idx = "" if index is None else f' data-i="{index}"'
  text = _html.tok(token)
  if sub is not None:
    text += f'<br><span style="font-size:9px;opacity:.8">{_html.esc(sub)}</span>'
    style += ";text-align:center;vertical-align:top"
  return f'<span class="{cls}" style="{style}"{idx}{tip}>{text}</span>'


def strip(
  tokens: Sequence[str],
  values: np.ndarray,
  scale: str,
  norm: _colors.Normalizer,
  *,
  label: str = "value",
  extra_rows: Sequence[list[list[Any]]] | None = None,
  highlight: int | None = None,
  subs: Sequence[str] | None = None,
  offset: int = 0,
) -> str:
  """Tokens coloured by `values`; hover shows position, token and value.

  Args:
    tokens: Token strings.
    values: One scalar per token.
    scale: Colour scale name.
    norm: Maps values to [0, 1].
    label: Name of the value in the tooltip.
    extra_rows: Per token, more tooltip rows (e.g. top features).
    highlight: Index of a token to outline (e.g. the max-activating one).
    subs: Per token, a small caption under the token.
    offset: Added to indices shown as positions (for windows into a context).
  """
  spans = []
  for j, t in enumerate(tokens):
    rows = [[label, f"{values[j]:.4g}"]]
    if extra_rows is not None:
      rows += extra_rows[j]
    tip = _html.tip_attr(f"position {j + offset}: {_html.display_token(str(t))}", rows)
    spans.append(
      token_span(
        str(t),
        float(values[j]),
        scale,
        norm,
        tip,
        extra_class="gsv-max" if highlight == j else "",
        sub=None if subs is None else subs[j],
        index=j + offset,
      )
    )
  return "".join(spans)
