"""Heatmaps (e.g. activation patching) as HTML and as matplotlib PNGs."""

from __future__ import annotations

import io
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from gemma_surgery import atomic
from gemma_surgery.errors import InputError
from gemma_surgery.viz import _arrays, _colors, _html


class Heatmap(_html.HtmlView):
  """A rendered heatmap; also exports a PNG through matplotlib.

  Attributes:
    values: The `[rows, cols]` data.
    row_labels, col_labels: Axis tick labels.
    row_title, col_title: Axis titles.
    scale: Colour scale name; norm: the value normalizer.
  """

  def __init__(self, body: str, title: str, values: np.ndarray, meta: dict[str, Any]):
    super().__init__(body, title)
    self.values = values
    self.row_labels = meta["row_labels"]
    self.col_labels = meta["col_labels"]
    self.row_title = meta["row_title"]
    self.col_title = meta["col_title"]
    self.scale = meta["scale"]
    self.norm = meta["norm"]
    self.value_label = meta["value_label"]

  def figure(self, *, cell_inches: float = 0.42, annotate: bool | None = None):
    """The heatmap as a matplotlib `Figure` (needs matplotlib).

    Args:
      cell_inches: Size of one cell.
      annotate: Write values into cells (default: when there are ≤ 400).

    Raises:
      ImportError: matplotlib is not installed (`pip install
        "gemma-surgery[notebook]"`).
    """
    try:
      from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
      raise ImportError(
        "PNG export needs matplotlib: pip install 'gemma-surgery[notebook]' "
        "(or pip install matplotlib)"
      ) from e
    rows, cols = self.values.shape
    w = max(4.0, 1.8 + cols * cell_inches)
    h = max(2.6, 1.4 + rows * cell_inches)
    fig = Figure(figsize=(w, h), dpi=110, layout="constrained")
    ax = fig.add_subplot()
    data = np.ma.masked_invalid(self.values)
    image = ax.imshow(
      data,
      cmap=_colors.matplotlib_cmap(self.scale),
      vmin=self.norm.vmin,
      vmax=self.norm.vmax,
      aspect="auto",
      interpolation="nearest",
    )
    ax.set_xticks(range(cols), [_html.display_token(str(c)) for c in self.col_labels])
    ax.set_yticks(range(rows), [str(r) for r in self.row_labels])
    ax.tick_params(axis="x", labelrotation=60 if cols > 8 else 0, labelsize=8)
    ax.tick_params(axis="y", labelsize=8)
    ax.set_xlabel(self.col_title)
    ax.set_ylabel(self.row_title)
    if self.title:
      ax.set_title(self.title, fontsize=11)
    if annotate is None:
      annotate = rows * cols <= 400
    if annotate:
      labels = cell_labels(self.values)
      for i in range(rows):
        for j in range(cols):
          v = self.values[i, j]
          if labels[i][j]:
            bg = _colors.interpolate(self.scale, self.norm(v))
            ax.text(
              j,
              i,
              labels[i][j],
              ha="center",
              va="center",
              fontsize=7,
              color=_colors.text_color(bg),
            )
    fig.colorbar(image, ax=ax, label=self.value_label, shrink=0.8)
    return fig

  def to_png(self, **kwargs: Any) -> bytes:
    """PNG bytes of `figure(**kwargs)`."""
    buf = io.BytesIO()
    self.figure(**kwargs).savefig(buf, format="png")
    return buf.getvalue()

  def save_png(self, path: str | os.PathLike, **kwargs: Any) -> pathlib.Path:
    """Writes the PNG to `path` (atomically) and returns it (needs matplotlib)."""
    return atomic.write_bytes(path, self.to_png(**kwargs))


def heatmap(
  values: Any,
  *,
  row_labels: Sequence[Any] | None = None,
  col_labels: Sequence[Any] | None = None,
  row_title: str | None = None,
  col_title: str | None = None,
  value_label: str = "value",
  center: float | None = 0.0,
  vmin: float | None = None,
  vmax: float | None = None,
  annotate: bool | None = None,
  title: str | None = "Heatmap",
) -> Heatmap:
  """Renders a 2-D array as a heatmap (e.g. an activation-patching sweep).

  With `center` (default 0) the scale is diverging blue-white-red,
  symmetric around `center`; with `center=None` it is sequential
  white-to-red from `vmin` to `vmax`. NaN cells are grey. Hover shows the row,
  column and value.

  Args:
    values: `[rows, cols]`, e.g. `[layers, positions]` or `[layers, heads]`.
      A NamedArray is unwrapped in its own axis order (it must be 2-D).
    row_labels: Tick labels of the rows (default `0..rows-1`).
    col_labels: Tick labels of the columns (tokens get whitespace markers).
    row_title: Name of the row axis (default: a NamedArray's first axis
      name, else ``layer``).
    col_title: Name of the column axis (default: a NamedArray's second axis
      name, else ``position``).
    value_label: Name of the value (legend, colour bar).
    center: Centre of a diverging scale, or `None` for sequential.
    vmin: Lower bound (default: data minimum, or symmetric around `center`).
    vmax: Upper bound (default: data maximum, or symmetric around `center`).
    annotate: Write values in cells (default: when there are ≤ 400).
    title: Caption.

  Returns:
    A `Heatmap` (an `HtmlView` with `figure`, `to_png` and `save_png`).
  """
  if hasattr(values, "named_shape"):
    if len(values.named_shape) != 2 or values.positional_shape:
      raise InputError(f"values: expected 2 named axes, got {values.named_shape}")
    names = list(values.named_shape)
    row_title = names[0] if row_title is None else row_title
    col_title = names[1] if col_title is None else col_title
    values = values.unwrap(*names)
  row_title = "layer" if row_title is None else row_title
  col_title = "position" if col_title is None else col_title
  v = _arrays.to_numpy(values, ("rows", "cols"), "values")
  R, C = v.shape
  rows = _arrays.check_len(
    row_labels if row_labels is not None else range(R), R, "row_labels", "rows"
  )
  cols = _arrays.check_len(
    col_labels if col_labels is not None else range(C), C, "col_labels", "cols"
  )
  lo, hi = _arrays.finite_range(v)
  lo = lo if vmin is None else float(vmin)
  hi = hi if vmax is None else float(vmax)
  scale = "diverging" if center is not None else "warm"
  norm = _colors.Normalizer(lo, hi, center=center)
  if annotate is None:
    annotate = R * C <= 400
  head = (
    f'<tr><th class="gsv-rowlabel gsv-axis">{_html.esc(row_title)} \\ '
    f"{_html.esc(col_title)}</th>"
    + "".join(f'<th class="gsv-coltok">{_html.tok(c)}</th>' for c in cols)
    + "</tr>"
  )
  body = []
  labels = cell_labels(v) if annotate else None
  for i, r in enumerate(rows):
    cells = []
    for j, c in enumerate(cols):
      x = v[i, j]
      tip = _html.tip_attr(
        f"{row_title} {r} · {col_title} {_html.display_token(str(c))}",
        [[value_label, f"{x:.4g}"]],
      )
      text = labels[i][j] if labels else ""
      style = _colors.cell_style(scale, norm(x))
      cells.append(f'<td style="{style}"{tip}>{_html.esc(text)}</td>')
    body.append(
      f'<tr><th class="gsv-rowlabel">{_html.esc(r)}</th>{"".join(cells)}</tr>'
    )
  table = f'<table class="gsv-table gsv-hm">{head}{"".join(body)}</table>'
  inner = f'<div class="gsv-scroll">{table}</div>' + _colors.legend(
    scale, norm, value_label
  )
  meta = {
    "row_labels": rows,
    "col_labels": cols,
    "row_title": row_title,
    "col_title": col_title,
    "scale": scale,
    "norm": norm,
    "value_label": value_label,
  }
  return Heatmap(_html.section(title, inner, "heatmap"), title or "", v, meta)


def cell_labels(values: np.ndarray, *, hide_below: float = 0.01) -> list[list[str]]:
  """Short in-cell labels (at most 5 characters) for a ``[rows, cols]`` array.

  Values within ``hide_below`` of the largest magnitude (and NaN/inf) get no
  label, so near-zero cells stay blank instead of printing ``-3.1e-05``; the
  rest get two significant digits where that fits (``12``, ``1.5``, ``.43``,
  ``-.07``, ``-123``) and one below 0.01 or from 1000 (``3e-4``, ``1e3``). The exact
  value is in each cell's tooltip.
  """
  finite = np.isfinite(values)
  top = float(np.abs(values[finite]).max()) if finite.any() else 0.0
  out = []
  for row, ok in zip(values, finite, strict=True):
    labels = []
    for x, good in zip(row, ok, strict=True):
      a = abs(float(x)) if good else 0.0
      if not good or a == 0.0 or a < hide_below * top:
        labels.append("")
      elif a >= 999.5:  # one significant digit: "1e3"
        labels.append(f"{x:.0e}".replace("e+0", "e").replace("e+", "e"))
      elif a >= 9.95:
        labels.append(f"{x:.0f}")
      elif a >= 0.995:
        labels.append(f"{x:.1f}")
      elif a >= 0.0095:
        labels.append(f"{x:.2f}".replace("0.", ".", 1))
      else:  # one significant digit: "3e-4"
        labels.append(f"{x:.0e}".replace("e-0", "e-"))
    out.append(labels)
  return out
