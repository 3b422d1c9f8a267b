"""Capturing activations: `SaveIntermediate` and `DisplayIntermediate`."""

from __future__ import annotations

from typing import Any

import treescope
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.layers import base


@pz.pytree_dataclass
class SaveIntermediate(base.SurgeryLayer):
  """Stores the activation passing through it in a `pz.StateVariable`.

  The stored value uses the user-facing axes (one ``heads`` axis at attention
  sites). It holds the last call's value: during KV-cached decoding that is
  one step; the fused generation loop gives it a fixed-shape buffer instead
  (see `gemma_surgery.generate`).

  Attributes:
    saved: Where the value goes (one fresh variable per site).
    site: The site name (static).
    layer: The layer index, or None for global sites (static).
  """

  saved: pz.StateVariable
  site: str = base.static_field()
  layer: int | None = base.static_field(None)

  def __call__(self, value: Any, /, **side_inputs) -> Any:
    self.saved.value = base.user_view(self.site, value)
    return value

  @classmethod
  def fresh(cls, site: str, layer: int | None) -> SaveIntermediate:
    label = f"capture/{site}" + ("" if layer is None else f"/{layer}")
    return cls(saved=pz.StateVariable(value=None, label=label), site=site, layer=layer)

  def value(self) -> pz.nx.NamedArray:
    """The captured value; raises `SurgeryError` if the model hasn't run."""
    if self.saved.value is None:
      where = self.site if self.layer is None else f"{self.site}[{self.layer}]"
      raise errors.SurgeryError(
        f"Capture at {where} is empty: run the patched model first."
      )
    return self.saved.value

  def treescope_color(self) -> str:
    return "#79eb75"


@pz.pytree_dataclass
class DisplayIntermediate(base.SurgeryLayer):
  """Renders the activation with treescope each time it runs (eager only).

  Attributes:
    site: The site name (static).
    layer: The layer index (static).
  """

  site: str = base.static_field()
  layer: int | None = base.static_field(None)

  def __call__(self, value: Any, /, **side_inputs) -> Any:
    where = self.site if self.layer is None else f"{self.site}[{self.layer}]"
    print(where)
    treescope.display(base.user_view(self.site, value))
    return value
