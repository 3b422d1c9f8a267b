"""Residual-stream / logit-lens table: top token per site and position."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_surgery.errors import InputError
from gemma_surgery.viz import _arrays, _colors, _html


def logit_lens_table(
  top_tokens: Any,
  top_probs: Any,
  change: Any,
  *,
  row_labels: Sequence[str],
  col_tokens: Sequence[str],
  next_tokens: Sequence[str] | None = None,
  vmax: float | None = None,
  title: str | None = "Logit lens",
) -> _html.HtmlView:
  """Renders a logit-lens ("premature decoding") table of the residual stream.

  Rows are residual sites (e.g. `"embed"`, `"attn 0"`, `"mlp 0"`, ...), columns
  token positions. Each cell shows the site's top-1 decoded token at that
  position on a background coloured by `change` (typically 1 − cosine between
  the residual after and before the sublayer); hovering lists the top-k tokens
  with probabilities. With `next_tokens`, a final "next token" row shows the
  actual next input token and cells whose top-1 equals it are underlined.

  Args:
    top_tokens: `[sites, positions, k]` token strings, best first.
    top_probs: `[sites, positions, k]` probabilities matching `top_tokens`.
    change: `[sites, positions]` scalars for the colour (NaN: grey).
    row_labels: One label per site.
    col_tokens: The input token at each position (column headers).
    next_tokens: Optional token that actually follows each position.
    vmax: Upper end of the colour scale (default: the largest finite change;
      the lower end is 0).
    title: Caption above the table.

  Returns:
    An `HtmlView`.

  Raises:
    InputError: On shapes that do not agree.
  """
  axes = ("sites", "positions", "k")
  toks = np.asarray(top_tokens, dtype=object)
  if toks.ndim != 3:
    toks = _arrays.to_numpy(top_tokens, axes, "top_tokens")
  probs = _arrays.to_numpy(top_probs, axes, "top_probs")
  ch = _arrays.to_numpy(change, axes[:2], "change")
  S, P, _ = probs.shape
  if toks.shape != probs.shape:
    raise InputError(
      f"top_tokens {toks.shape} and top_probs {probs.shape} must have one shape"
    )
  if ch.shape != (S, P):
    raise InputError(f"change: expected shape {(S, P)}, got {ch.shape}")
  rows = _arrays.check_len(row_labels, S, "row_labels", "sites")
  cols = _arrays.check_len(col_tokens, P, "col_tokens", "positions")
  nxt = (
    None
    if next_tokens is None
    else _arrays.check_len(next_tokens, P, "next_tokens", "positions")
  )

  hi = _arrays.finite_range(ch)[1] if vmax is None else float(vmax)
  norm = _colors.Normalizer(0.0, hi if hi > 0 else 1.0)
  header = (
    '<tr><th class="gsv-rowlabel">site</th>'
    + "".join(
      f'<th class="gsv-coltok"{_col_tip(j, t)}>{_html.tok(t)}</th>'
      for j, t in enumerate(cols)
    )
    + "</tr>"
  )
  body_rows = []
  for i, label in enumerate(rows):
    cells = []
    for j in range(P):
      top = str(toks[i, j, 0])
      tip_rows = [
        [f"{r + 1}.", _html.display_token(str(toks[i, j, r])), f"{probs[i, j, r]:.3f}"]
        for r in range(toks.shape[2])
      ]
      amount = f"{ch[i, j]:.3f}" if np.isfinite(ch[i, j]) else "n/a"
      where = f"position {j} ({_html.display_token(str(cols[j]))})"
      tip = _html.tip_attr(f"{label} · {where} · change {amount}", tip_rows)
      hit = " gsv-hit" if nxt is not None and top == str(nxt[j]) else ""
      style = _colors.cell_style(_colors.WARM, norm(ch[i, j]))
      cells.append(
        f'<td class="gsv-cell{hit}" style="{style}"{tip}>{_html.tok(top)}</td>'
      )
    body_rows.append(
      f'<tr><th class="gsv-rowlabel">{_html.esc(label)}</th>{"".join(cells)}</tr>'
    )
  if nxt is not None:
    cells = "".join(f"<td>{_html.tok(t)}</td>" for t in nxt)
    body_rows.append(
      f'<tr class="gsv-forced"><th class="gsv-rowlabel">next token</th>{cells}</tr>'
    )
  table = f'<table class="gsv-table">{header}{"".join(body_rows)}</table>'
  note = (
    '<div class="gsv-note">Top-1 decoded token per site and position; colour: '
    "the change the site made (1 − cosine). Hover for the top tokens."
    + (" Underlined: equals the actual next token." if nxt is not None else "")
    + "</div>"
  )
  inner = (
    note
    + f'<div class="gsv-scroll">{table}</div>'
    + _colors.legend(_colors.WARM, norm, "change")
  )
  return _html.HtmlView(_html.section(title, inner, "lens"), title or "Logit lens")


def _col_tip(j: int, token: str) -> str:
  return _html.tip_attr(f"position {j}: {_html.display_token(str(token))}")
