"""SAE feature views: top features per token, a feature across texts, and
max-activating examples."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gemma_surgery.errors import InputError
from gemma_surgery.viz import _arrays, _colors, _html, _strip


def feature_strip(
  tokens: Sequence[str],
  feature_ids: Any,
  feature_values: Any,
  *,
  descriptions: Mapping[int, str] | None = None,
  vmax: float | None = None,
  title: str | None = "Top SAE features per token",
) -> _html.HtmlView:
  """Renders tokens with their top SAE features.

  Each token is coloured by its strongest feature's activation and captioned
  with that feature's id; hovering lists all k features with values (and
  descriptions when given).

  Args:
    tokens: The T token strings.
    feature_ids: `[seq, k]` feature ids, strongest first.
    feature_values: `[seq, k]` their activations (0 where fewer are active).
    descriptions: Optional `{feature id: short description}`.
    vmax: Colour-scale bound (default: the largest value).
    title: Caption above the view.

  Returns:
    An `HtmlView`.
  """
  ids = _arrays.to_numpy(feature_ids, ("seq", "k"), "feature_ids").astype(np.int64)
  vals = _arrays.to_numpy(feature_values, ("seq", "k"), "feature_values")
  if ids.shape != vals.shape:
    raise InputError(f"feature_ids {ids.shape} and feature_values {vals.shape} differ")
  toks = _arrays.check_len(tokens, ids.shape[0], "tokens", "seq")
  desc = dict(descriptions or {})
  extra, subs = [], []
  for j in range(len(toks)):
    active = [r for r in range(ids.shape[1]) if vals[j, r] > 0]
    extra.append(
      [
        [f"#{ids[j, r]}", f"{vals[j, r]:.4g}", desc.get(int(ids[j, r]), "")]
        for r in active
      ]
    )
    subs.append(f"#{ids[j, 0]}" if active else "·")
  top = vals[:, 0] if vals.shape[1] else np.zeros(len(toks))
  scale, norm = _strip.auto_norm(top, vmax)
  inner = (
    '<div class="gsv-strip">'
    + _strip.strip(
      toks, top, scale, norm, label="top feature", extra_rows=extra, subs=subs
    )
    + "</div>"
    + _colors.legend(scale, norm, "activation of the top feature")
  )
  return _html.HtmlView(_html.section(title, inner, "features"), title or "Features")


def feature_texts(
  texts: Sequence[Sequence[str]],
  activations: Sequence[Any],
  *,
  labels: Sequence[str] | None = None,
  notes: Sequence[str] | None = None,
  vmax: float | None = None,
  title: str | None = "Feature activation across texts",
) -> _html.HtmlView:
  """Renders one feature's activation over several texts ("headlines").

  One row per text, tokens coloured on one shared scale; the row header shows
  the label and the row's max and sum of activations.

  Args:
    texts: For each text, its token strings.
    activations: For each text, `[seq]` activations of the feature.
    labels: Optional row labels (default `"text i"`).
    notes: Optional extra text shown after each row (e.g. the text's top
      features).
    vmax: Colour-scale bound (default: the largest activation overall).
    title: Caption (e.g. `"feature 10004"`).

  Returns:
    An `HtmlView`.
  """
  texts = [list(t) for t in texts]
  acts = [
    _arrays.to_numpy(a, ("seq",), f"activations[{i}]")
    for i, a in enumerate(activations)
  ]
  _arrays.check_len(acts, len(texts), "activations", "texts")
  names = (
    list(labels) if labels is not None else [f"text {i}" for i in range(len(texts))]
  )
  _arrays.check_len(names, len(texts), "labels", "texts")
  if notes is not None:
    _arrays.check_len(notes, len(texts), "notes", "texts")
  everything = np.concatenate(acts) if acts else np.zeros(0)
  scale, norm = _strip.auto_norm(everything, vmax)
  rows = []
  for i, (toks, a) in enumerate(zip(texts, acts, strict=True)):
    _arrays.check_len(toks, a.shape[0], f"texts[{i}]", "seq")
    stats = f"max {a.max():.3g} · sum {a.sum():.3g}" if a.size else "empty"
    note = f'<div class="gsv-note">{_html.esc(notes[i])}</div>' if notes else ""
    rows.append(
      f'<div class="gsv-row"><span class="gsv-rowhead">{_html.esc(names[i])}<br>'
      f'<span style="font-size:10px">{stats}</span></span>'
      f'<div class="gsv-strip">{_strip.strip(toks, a, scale, norm, label="activation")}'
      f"{note}</div></div>"
    )
  inner = "".join(rows) + _colors.legend(scale, norm, "activation")
  return _html.HtmlView(_html.section(title, inner, "texts"), title or "Texts")


def max_activating_examples(
  contexts: Sequence[Sequence[str]],
  activations: Sequence[Any],
  *,
  left: int = 12,
  right: int = 4,
  top: int | None = None,
  vmax: float | None = None,
  title: str | None = "Max-activating examples",
) -> _html.HtmlView:
  """Renders contexts where a feature (or neuron) fires most, strongest first.

  Each context is cut to a window around its max-activating token, which is
  outlined; tokens are coloured on one shared scale.

  Args:
    contexts: For each example, its token strings.
    activations: For each example, `[seq]` activations.
    left: Tokens kept before the max token.
    right: Tokens kept after it.
    top: Show only the `top` strongest examples (default: all).
    vmax: Colour-scale bound (default: the largest activation).
    title: Caption above the view.

  Returns:
    An `HtmlView`.
  """
  ctxs = [list(c) for c in contexts]
  acts = [
    _arrays.to_numpy(a, ("seq",), f"activations[{i}]")
    for i, a in enumerate(activations)
  ]
  _arrays.check_len(acts, len(ctxs), "activations", "contexts")
  for i, (c, a) in enumerate(zip(ctxs, acts, strict=True)):
    _arrays.check_len(c, a.shape[0], f"contexts[{i}]", "seq")
  peaks = [float(np.nanmax(a)) if a.size else -np.inf for a in acts]
  order = sorted(range(len(ctxs)), key=lambda i: -peaks[i])[: top or len(ctxs)]
  scale, norm = _strip.auto_norm(
    np.concatenate([acts[i] for i in order]) if order else np.zeros(0), vmax
  )
  rows = []
  for rank, i in enumerate(order):
    a, c = acts[i], ctxs[i]
    if not a.size:
      continue
    m = int(np.nanargmax(a))
    lo, hi = max(0, m - left), min(len(c), m + right + 1)
    body = _strip.strip(
      c[lo:hi], a[lo:hi], scale, norm, label="activation", highlight=m - lo, offset=lo
    )
    dots = ("… " if lo > 0 else "", " …" if hi < len(c) else "")
    rows.append(
      f'<div class="gsv-row"><span class="gsv-rowhead">#{rank + 1} · example {i}<br>'
      f'<span style="font-size:10px">max {peaks[i]:.3g} at {m}</span></span>'
      f'<div class="gsv-strip">{dots[0]}{body}{dots[1]}</div></div>'
    )
  inner = "".join(rows) + _colors.legend(scale, norm, "activation")
  return _html.HtmlView(_html.section(title, inner, "examples"), title or "Examples")
