"""Shared HTML plumbing: escaping, token labels, embedded JSON, the view class.

Every renderer returns an `HtmlView`: a self-contained HTML fragment (inline
CSS and JavaScript, no network references) that displays itself in Jupyter and
VS Code through `_repr_html_` and saves as a standalone page with `save`.
"""

from __future__ import annotations

import functools
import html
import importlib.resources
import json
import os
import pathlib
import secrets
from typing import Any

from gemma_surgery import atomic

SPACE_MARKER = "␣"
NEWLINE_MARKER = "↵"
TAB_MARKER = "⇥"
EMPTY_MARKER = "∅"
_SP_SPACE = "▁"


def display_token(token: str) -> str:
  """Makes a token's whitespace visible for display.

  Spaces and SentencePiece's `▁` become `␣`, newlines `↵`, tabs `⇥`, other
  control characters `\\xNN`, and the empty string `∅`. The result is still
  plain text: HTML escaping happens when it is written into a page.

  Args:
    token: A token string, raw (`' the'`, `'▁the'`, `'\\n'`) or already a
      display piece from `GemmaTokenizer.pieces`.

  Returns:
    The display text.
  """
  if token == "":
    return EMPTY_MARKER
  out = []
  for ch in token:
    if ch in (" ", _SP_SPACE):
      out.append(SPACE_MARKER)
    elif ch == "\n":
      out.append(NEWLINE_MARKER)
    elif ch == "\t":
      out.append(TAB_MARKER)
    elif ord(ch) < 0x20 or ord(ch) == 0x7F:
      out.append(f"\\x{ord(ch):02x}")
    else:
      out.append(ch)
  return "".join(out)


def esc(text: Any) -> str:
  """Escapes text for HTML element content and quoted attribute values."""
  return html.escape(str(text), quote=True)


def tok(token: str) -> str:
  """A token as escaped HTML text with visible whitespace."""
  return esc(display_token(str(token)))


def tip_attr(title: str, rows: list[list[Any]] | None = None) -> str:
  """A `data-tip` attribute for the hover tooltip.

  The tooltip shows `title` in bold, then one table row per entry of `rows`.
  Cells are plain text (the runtime sets `textContent`, never `innerHTML`).

  Args:
    title: First line.
    rows: Table rows; each cell is converted with `str`.

  Returns:
    ` data-tip="..."` (leading space included), escaped.
  """
  lines = [title.replace("\n", " ")]
  for row in rows or []:
    cells = [str(c).replace("\t", " ").replace("\n", " ") for c in row]
    lines.append("\t".join(cells))
  return f' data-tip="{esc(chr(10).join(lines))}"'


def json_script(element_id: str, data: Any) -> str:
  """Embeds `data` as JSON in a `<script type="application/json">` element.

  `<`, `>` and `&` are written as `\\u003c`-style escapes, so token text such
  as `</script>` cannot end the element early.
  """
  text = json.dumps(data, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
  text = text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
  text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
  return f'<script type="application/json" id="{esc(element_id)}">{text}</script>'


def new_id(prefix: str = "gsv") -> str:
  """A fresh element id, unique within any page that embeds several views."""
  return f"{prefix}-{secrets.token_hex(6)}"


@functools.cache
def _static(name: str) -> str:
  return (importlib.resources.files("gemma_surgery.viz") / "static" / name).read_text(
    encoding="utf-8"
  )


def runtime() -> str:
  """The shared CSS and JavaScript, written once per page or fragment.

  The script is guarded, so a notebook that shows many views defines its
  functions once; the CSS is scoped to `.gsv` elements.
  """
  return (
    f"<style>{_static('viz.css')}</style>\n"
    f"<script>{_static('viz.js')}\n{_static('attention.js')}\n"
    f"{_static('graph.js')}</script>\n"
  )


def document(body: str, title: str = "gemma_surgery") -> str:
  """A standalone, self-contained HTML page around `body`."""
  return (
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
    '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
    f"<title>{esc(title)}</title>\n{runtime()}</head>\n"
    f'<body class="gsv-page">\n{body}\n</body>\n</html>\n'
  )


class HtmlView:
  """A rendered visualization: an HTML fragment plus the shared runtime.

  Attributes:
    body: The view's own markup (without the shared CSS/JS runtime).
    title: A short title, used for saved pages.
  """

  def __init__(self, body: str, title: str = "gemma_surgery"):
    self.body = body
    self.title = title

  def _repr_html_(self) -> str:
    return runtime() + self.body

  def to_html(self) -> str:
    """The view as a complete standalone HTML page."""
    return document(self.body, self.title)

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes `to_html()` to `path` (UTF-8, atomically) and returns the path."""
    return atomic.write_text(path, self.to_html())

  def __repr__(self) -> str:
    return f"<{type(self).__name__} {self.title!r}: {len(self.body)} chars of HTML>"


def section(title: str | None, inner: str, kind: str, extra: str = "") -> str:
  """Wraps a view's markup in its root element with an optional caption."""
  head = f'<div class="gsv-title">{esc(title)}</div>' if title else ""
  return f'<div class="gsv gsv-{kind}"{extra}>{head}{inner}</div>'
