"""MLP neuron views: one neuron over a text, and top neurons per token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_surgery.errors import InputError
from gemma_surgery.viz import _arrays, _colors, _html, _strip


def neuron_strip(
  tokens: Sequence[str],
  activations: Any,
  *,
  top_ids: Any = None,
  top_values: Any = None,
  vmax: float | None = None,
  title: str | None = "Neuron activation",
) -> _html.HtmlView:
  """Renders tokens coloured by one neuron's activation.

  Non-negative activations use a white-to-red scale from 0; signed ones a
  blue-white-red scale centred at 0. Hover shows the value and, when given,
  the token's top-k neurons.

  Args:
    tokens: The T token strings.
    activations: `[seq]` activation of the chosen neuron at each token.
    top_ids: Optional `[seq, k]` neuron ids of each token's top-k neurons.
    top_values: `[seq, k]` activations matching `top_ids`.
    vmax: Colour-scale bound (default: the largest |activation|).
    title: Caption (e.g. `"layer 25, neuron 1937"`).

  Returns:
    An `HtmlView`.
  """
  acts = _arrays.to_numpy(activations, ("seq",), "activations")
  toks = _arrays.check_len(tokens, acts.shape[0], "tokens", "seq")
  extra = None
  if top_ids is not None or top_values is not None:
    ids, vals = _topk(top_ids, top_values, len(toks))
    extra = [
      [[f"#{int(n)}", f"{v:.4g}"] for n, v in zip(ids[j], vals[j], strict=True)]
      for j in range(len(toks))
    ]
  scale, norm = _strip.auto_norm(acts, vmax)
  body = _strip.strip(toks, acts, scale, norm, label="activation", extra_rows=extra)
  inner = f'<div class="gsv-strip">{body}</div>' + _colors.legend(
    scale, norm, "activation"
  )
  return _html.HtmlView(_html.section(title, inner, "neuron"), title or "Neuron")


def neuron_buckets(
  tokens: Sequence[str],
  top_ids: Any,
  top_values: Any,
  *,
  num_neurons: int,
  num_buckets: int = 70,
  vmax: float | None = None,
  title: str | None = "Top MLP neurons per token",
) -> _html.HtmlView:
  """Renders each token's top-k neurons as a strip of neuron buckets.

  One row per token; the MLP's neurons are split into `num_buckets` equal
  ranges, and a bucket is coloured by the largest top-k activation that falls
  in it (white: none of the token's top neurons). Hover lists the neuron ids
  and values in the bucket. Neurons that light up for many tokens show as
  vertical stripes.

  Args:
    tokens: The T token strings.
    top_ids: `[seq, k]` neuron ids (0 <= id < num_neurons).
    top_values: `[seq, k]` their activations.
    num_neurons: The MLP width (e.g. 6912 for Gemma 3 1B).
    num_buckets: Number of buckets (e.g. 70 buckets of ~100 neurons).
    vmax: Colour-scale bound (default: the largest top value).
    title: Caption above the view.

  Returns:
    An `HtmlView`.
  """
  ids, vals = _topk(top_ids, top_values, len(list(tokens)))
  toks = list(tokens)
  if ids.size and (ids.min() < 0 or ids.max() >= num_neurons):
    raise InputError(f"top_ids: neuron ids must lie in [0, {num_neurons})")
  if num_buckets < 1:
    raise InputError("num_buckets must be >= 1")
  width = -(-num_neurons // num_buckets)
  # Buckets of `width` neurons: fewer than asked for when they don't divide.
  buckets = -(-num_neurons // width)
  scale, norm = _strip.auto_norm(vals, vmax)
  rows = []
  for j, t in enumerate(toks):
    cells = []
    for b in range(buckets):
      lo, hi = b * width, min(num_neurons, (b + 1) * width)
      sel = (ids[j] >= lo) & (ids[j] < hi)
      if not sel.any():
        cells.append('<span class="gsv-bucket" style="background:#f6f8fa"></span>')
        continue
      order = np.argsort(-vals[j][sel])
      hits = [[f"#{int(ids[j][sel][o])}", f"{vals[j][sel][o]:.4g}"] for o in order]
      peak = float(vals[j][sel][order[0]])
      tip = _html.tip_attr(
        f"{_html.display_token(str(t))}: neurons {lo}–{hi - 1}", hits
      )
      style = f"background:{_colors.interpolate(scale, norm(peak))}"
      cells.append(f'<span class="gsv-bucket" style="{style}"{tip}></span>')
    top = [[f"#{int(n)}", f"{v:.4g}"] for n, v in zip(ids[j], vals[j], strict=True)]
    head_tip = _html.tip_attr(f"position {j}: {_html.display_token(str(t))}", top)
    rows.append(
      f'<div class="gsv-row"><span class="gsv-rowhead gsv-coltok"{head_tip}>'
      f'{_html.tok(t)}</span><span class="gsv-buckets">{"".join(cells)}</span></div>'
    )
  note = (
    f'<div class="gsv-note">{buckets} buckets of {_bucket_sizes(num_neurons, width)}'
    f" neurons (0 … {num_neurons - 1}); hover a bucket or a token for neuron"
    " ids.</div>"
  )
  inner = note + "".join(rows) + _colors.legend(scale, norm, "activation")
  return _html.HtmlView(_html.section(title, inner, "neurons"), title or "Neurons")


def _topk(ids: Any, values: Any, n: int) -> tuple[np.ndarray, np.ndarray]:
  if ids is None or values is None:
    raise InputError("top_ids and top_values must be given together")
  ids_a = _arrays.to_numpy(ids, ("seq", "k"), "top_ids").astype(np.int64)
  vals_a = _arrays.to_numpy(values, ("seq", "k"), "top_values")
  if ids_a.shape != vals_a.shape or ids_a.shape[0] != n:
    raise InputError(
      f"top_ids {ids_a.shape} and top_values {vals_a.shape} must both be [{n}, k]"
    )
  return ids_a, vals_a


def _bucket_sizes(num_neurons: int, width: int) -> str:
  """``"8"``, or ``"8 (the last 4)"`` when the last bucket is smaller."""
  last = num_neurons - (-(-num_neurons // width) - 1) * width
  return str(width) if last == width else f"{width} (the last {last})"
