"""`Report`: several views, text and images in one self-contained HTML page."""

from __future__ import annotations

import base64
import os
import pathlib

from gemma_surgery import atomic
from gemma_surgery.viz import _html

_MIME = {
  ".png": "image/png",
  ".jpg": "image/jpeg",
  ".jpeg": "image/jpeg",
  ".svg": "image/svg+xml",
}


class Report:
  """Builds one standalone HTML page from sections.

  Every method returns the report, so calls chain:

      report = (viz.Report("Tour of tiny")
                .heading("Logit lens")
                .text("Each row is a residual site ...")
                .add(viz.logit_lens_table(...))
                .image(heatmap.to_png(), alt="patching sweep"))
      report.save("tour.html")

  The page embeds everything (CSS, JavaScript, data, images as base64 data
  URIs): it opens offline and can be mailed as one file.

  Attributes:
    title: The page title (also the top heading).
  """

  def __init__(self, title: str = "gemma_surgery report"):
    self.title = title
    self._parts: list[str] = []

  def heading(self, text: str, level: int = 2) -> Report:
    """Adds a heading (`level` 1-4)."""
    level = min(4, max(1, int(level)))
    anchor = f"s{len(self._parts)}"
    self._parts.append(f'<h{level} id="{anchor}">{_html.esc(text)}</h{level}>')
    return self

  def text(self, text: str) -> Report:
    """Adds paragraphs of plain text (blank lines separate paragraphs)."""
    for para in str(text).strip().split("\n\n"):
      if para.strip():
        self._parts.append(f"<p>{_html.esc(para.strip())}</p>")
    return self

  def code(self, text: str) -> Report:
    """Adds preformatted text (a command, a printout)."""
    self._parts.append(f"<pre>{_html.esc(text)}</pre>")
    return self

  def add(self, view: _html.HtmlView, *, heading: str | None = None) -> Report:
    """Adds any view from `gemma_surgery.viz` (optionally under a heading)."""
    if not isinstance(view, _html.HtmlView):
      raise TypeError(f"Report.add takes an HtmlView, got {type(view).__name__}")
    if heading:
      self.heading(heading, 3)
    self._parts.append(view.body)
    return self

  def image(
    self, image: bytes | str | os.PathLike, *, alt: str = "", mime: str | None = None
  ) -> Report:
    """Adds an image inline as a base64 data URI.

    Args:
      image: PNG (or JPEG/SVG) bytes, or a path to such a file.
      alt: Alternative text.
      mime: MIME type (default: from the file suffix, else PNG).
    """
    if isinstance(image, bytes | bytearray):
      data = bytes(image)
    else:
      path = pathlib.Path(image)
      data = path.read_bytes()
      mime = mime or _MIME.get(path.suffix.lower())
    uri = f"data:{mime or 'image/png'};base64,{base64.b64encode(data).decode('ascii')}"
    self._parts.append(f'<p><img src="{uri}" alt="{_html.esc(alt)}"></p>')
    return self

  def body(self) -> str:
    """The report's markup without the shared runtime."""
    return (
      f'<div class="gsv-report"><h1>{_html.esc(self.title)}</h1>\n'
      + "\n".join(self._parts)
      + "\n</div>"
    )

  def to_html(self) -> str:
    """The complete standalone page."""
    return _html.document(self.body(), self.title)

  def _repr_html_(self) -> str:
    return _html.runtime() + self.body()

  def save(self, path: str | os.PathLike) -> pathlib.Path:
    """Writes the page to `path` (UTF-8), creating parent folders.

    The write is atomic (`gemma_surgery.atomic`): if it fails, a report
    already at `path` stays complete.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic.write_text(path, self.to_html())

  def __len__(self) -> int:
    return len(self._parts)
