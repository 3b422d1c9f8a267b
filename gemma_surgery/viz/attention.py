"""Interactive attention view: click a token to see what it attends to."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_surgery.errors import InputError
from gemma_surgery.viz import _arrays, _colors, _html

_AXES = ("layer", "heads", "seq", "kv_seq")
QUANT = 1000  # weights are embedded as integers in units of 1/QUANT


def attention_view(
  tokens: Sequence[str],
  pattern: Any,
  *,
  layer_labels: Sequence[str] | None = None,
  layer: int = -1,
  head: int | str = "avg",
  mode: str = "from",
  mask_bos: bool = False,
  token: int = -1,
  title: str | None = "Attention",
) -> _html.HtmlView:
  """Renders attention patterns as an interactive token view.

  The page shows the tokens, controls to pick a layer and a head (or the
  average over heads), a mode ("what it attends to" / "what attends to it")
  and a "mask BOS" switch, plus a query × key grid of the chosen pattern.
  Clicking a token (or a grid cell) selects it; tokens are coloured by the
  selected token's attention to them (or theirs to it), relative to the
  largest visible weight; hovering shows the exact weight. Masking BOS zeroes
  attention to position 0 and renormalizes every query's weights.

  Weights are embedded as integers in thousandths (±0.0005 round-off), only
  the lower triangle when the pattern is causal: about L × H × T² / 2
  numbers, so for long prompts pass the layers you want to look at.

  Args:
    tokens: The T token strings (whitespace is shown with visible markers).
    pattern: Post-softmax weights `[layer, heads, seq (query), kv_seq (key)]`,
      shape `[L, H, T, T]`, values in [0, 1]. A NamedArray with axes
      `layer, heads, seq, kv_seq` (e.g. `captures.stacked("attn.pattern")`
      with one batch element) is unwrapped by name. A `[H, T, T]` array is
      taken as a single layer.
    layer_labels: L labels for the layer selector (default `"layer i"`).
    layer: Initially selected layer index (negative counts from the end).
    head: Initially selected head index, or `"avg"`.
    mode: `"from"` (what the selected token attends to) or `"to"` (what
      attends to it).
    mask_bos: Whether BOS masking starts switched on.
    token: Initially selected position (negative counts from the end).
    title: Caption above the view.

  Returns:
    An `HtmlView`.

  Raises:
    InputError: On shapes that do not match or weights outside [0, 1].
  """
  if not hasattr(pattern, "named_shape") and np.ndim(pattern) == 3:
    pattern = np.asarray(pattern)[None]
  p = _arrays.to_numpy(pattern, _AXES, "pattern")
  L, H, Tq, Tk = p.shape
  toks = _arrays.check_len(tokens, Tq, "tokens", "seq")
  if Tk != Tq:
    raise InputError(
      f"pattern: the query and key axes must both cover the {Tq} tokens, got "
      f"kv_seq={Tk} (slice a KV-cached capture to the prompt first)"
    )
  if not np.all(np.isfinite(p)) or p.min() < -1e-3 or p.max() > 1 + 1e-3:
    raise InputError("pattern: expected post-softmax weights in [0, 1]")
  if mode not in ("from", "to"):
    raise InputError(f"mode must be 'from' or 'to', got {mode!r}")
  labels = (
    list(layer_labels) if layer_labels is not None else [f"layer {i}" for i in range(L)]
  )
  _arrays.check_len(labels, L, "layer_labels", "layer")
  layer_i = _index(layer, L, "layer")
  token_i = _index(token, Tq, "token")
  if head != "avg":
    head = _index(int(head), H, "head")

  ints = np.rint(np.clip(p, 0.0, 1.0) * QUANT).astype(np.int64)
  upper = np.triu(np.ones((Tq, Tq), bool), k=1)
  tri = not ints[..., upper].any()  # causal: keep the lower triangle only
  packed = (ints[..., ~upper] if tri else ints).ravel().tolist()
  root = _html.new_id("gsv-att")
  data = {
    "tokens": [_html.display_token(str(t)) for t in toks],
    "L": L,
    "H": H,
    "T": Tq,
    "q": QUANT,
    "tri": tri,
    "p": packed,
    "layers": labels,
    "scale": [list(a) for a in _colors.COOL],
    "init": {
      "layer": layer_i,
      "head": "avg" if head == "avg" else str(head),
      "mode": mode,
      "maskBos": bool(mask_bos),
      "token": token_i,
    },
  }
  layer_opts = "".join(
    f'<option value="{i}"{" selected" if i == layer_i else ""}>'
    f"{_html.esc(lab)}</option>"
    for i, lab in enumerate(labels)
  )
  head_opts = (
    f'<option value="avg"{" selected" if head == "avg" else ""}>average</option>'
  )
  head_opts += "".join(
    f'<option value="{h}"{" selected" if h == head else ""}>head {h}</option>'
    for h in range(H)
  )

  def radio(value: str, text: str) -> str:
    checked = " checked" if mode == value else ""
    return (
      f'<label><input type="radio" class="gsv-mode" name="{root}-mode" '
      f'value="{value}"{checked}> {text}</label>'
    )

  controls = (
    '<div class="gsv-controls">'
    f'<label>layer <select class="gsv-layer">{layer_opts}</select></label>'
    f'<label>head <select class="gsv-head">{head_opts}</select></label>'
    + radio("from", "what it attends to")
    + radio("to", "what attends to it")
    + f'<label><input type="checkbox" class="gsv-bos"{" checked" if mask_bos else ""}>'
    " mask BOS</label></div>"
  )
  strip = "".join(
    f'<span class="gsv-tok" data-i="{i}">{_html.tok(t)}</span>'
    for i, t in enumerate(toks)
  )
  legend = (
    '<div class="gsv-legend"><span class="gsv-legend-label">weight</span>'
    '<span class="gsv-legend-lo">0</span><span class="gsv-legend-bar" '
    f'style="background:{_colors.gradient_css(_colors.COOL)}"></span>'
    '<span class="gsv-legend-hi">1</span><span>(relative to the largest)</span></div>'
  )
  inner = (
    controls
    + '<div class="gsv-note gsv-status"></div>'
    + f'<div class="gsv-strip">{strip}</div>'
    + legend
    + '<div class="gsv-note">query (rows) × key (columns); click a cell to select</div>'
    + '<canvas class="gsv-canvas"></canvas>'
    + _html.json_script(f"{root}-data", data)
    + f'<script>window.gsViz && gsViz.init("attention", "{root}");</script>'
  )
  body = _html.section(title, inner, "attention", f' id="{root}"')
  return _html.HtmlView(body, title or "Attention")


def _index(i: int, n: int, what: str) -> int:
  if not -n <= i < n:
    raise InputError(f"{what} index {i} out of range for size {n}")
  return i % n
