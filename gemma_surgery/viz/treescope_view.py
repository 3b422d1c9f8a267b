"""Treescope renderings of models and arrays as embeddable HTML views."""

from __future__ import annotations

import contextlib
from typing import Any

from gemma_surgery.viz import _html


def show(
  obj: Any,
  *,
  arrays: bool = True,
  max_height: int | None = 20,
  title: str | None = None,
) -> _html.HtmlView:
  """Renders any object (a Penzai model, a NamedArray, a pytree) with treescope.

  The result is a self-contained `HtmlView`: it displays in notebooks, saves
  as a page, and can be added to a `Report`. Unlike `treescope.display`, it
  needs no `treescope.basic_interactive_setup()` and changes no global state.
  Nodes stay foldable in the browser.

  Args:
    obj: What to render.
    arrays: Draw arrays (NamedArrays included) as colour-coded array
      visualizations (treescope's `ArrayAutovisualizer`); otherwise as
      summaries.
    max_height: Roughly how many lines to expand initially (treescope's
      balanced expansion); `None` expands without a height limit.
    title: Optional caption.

  Returns:
    An `HtmlView` whose body holds treescope's HTML.
  """
  import treescope

  with contextlib.ExitStack() as stack:
    if arrays:
      stack.enter_context(
        treescope.active_autovisualizer.set_scoped(treescope.ArrayAutovisualizer())
      )
    stack.enter_context(treescope.using_expansion_strategy(max_height=max_height))
    rendered = treescope.render_to_html(obj, ignore_exceptions=True, compressed=True)
  inner = f'<div class="gsv-treescope">{rendered}</div>'
  return _html.HtmlView(_html.section(title, inner, "treescope"), title or "treescope")
