"""`GradientTap`: an additive tap that makes a site differentiable.

A tap adds ``delta`` (normally zero) to the activation at its site and stores
the activation it saw. Differentiating a metric of the output with respect to
``delta`` gives the gradient with respect to the activation itself, without
touching the model's own layers; setting ``delta`` to ``alpha * (a' − a)``
moves the activation along a straight line towards ``a'`` (integrated
gradients). ``delta`` is an array leaf: changing it never recompiles.
"""

from __future__ import annotations

from typing import Any

from penzai import pz

from gemma_surgery.surgery import heads
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.capture import CaptureLayer


@pz.pytree_dataclass
class GradientTap(CaptureLayer):
  """Stores the activation and returns ``activation + delta``.

  Attributes:
    saved: Where the activation goes (user-facing axes: one ``heads`` axis
      at head sites), written before ``delta`` is added.
    delta: NamedArray over the activation's user-facing axes (plus
      ``batch``/``seq``), or None to add nothing.
    site: Site name (static).
    layer: Layer index, or None at global sites (static).
  """

  saved: pz.StateVariable
  delta: pz.nx.NamedArray | None = None
  site: str = base.static_field("resid_post")
  layer: int | None = base.static_field(None)

  def captured(self, value: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return heads.user_view(self.site, value)

  def __call__(self, value: Any, /, **side_inputs) -> Any:
    self.saved.value = self.captured(value)
    if self.delta is None:
      return value
    delta = heads.native_value(self.site, self.delta, value)
    return (value + delta.astype(value.dtype)).order_like(value)

  @classmethod
  def fresh(cls, site: str, layer: int | None) -> GradientTap:
    label = f"tap/{site}" + ("" if layer is None else f"/{layer}")
    return cls(saved=pz.StateVariable(value=None, label=label), site=site, layer=layer)

  def treescope_color(self) -> str:
    return "#b07be0"
