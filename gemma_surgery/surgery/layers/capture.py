"""Capturing activations: `SaveIntermediate` and `DisplayIntermediate`."""

from __future__ import annotations

from typing import Any

import treescope
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.surgery import heads
from gemma_surgery.surgery.layers import base

CUSTOM_SITE = "custom"


class CaptureLayer(base.SurgeryLayer):
  """Base of layers that store a value computed from the activation.

  Subclasses are ``@pz.pytree_dataclass`` layers with a ``saved:
  pz.StateVariable`` field and static ``site``/``layer`` fields, and define
  `captured`. The stored value is write-only state: compiled forwards
  (`gemma_surgery.jit_forward`) feed it in as None, and the fused generation
  loop swaps the layer for a fixed-shape `CaptureBuffer` that records every
  step (so the value must be a NamedArray, or a tuple of them, with a ``seq``
  axis).
  """

  saved: pz.StateVariable
  site: str
  layer: int | None

  def captured(self, value: pz.nx.NamedArray) -> Any:
    """The value to store for the activation ``value`` (a pure function)."""
    raise NotImplementedError

  def __call__(self, value: Any, /, **side_inputs) -> Any:
    self.saved.value = self.captured(value)
    return value

  def value(self) -> Any:
    """The captured value; raises `SurgeryError` if the model hasn't run."""
    if self.saved.value is None:
      where = self.site if self.layer is None else f"{self.site}[{self.layer}]"
      raise errors.SurgeryError(
        f"Capture at {where} is empty: run the patched model first."
      )
    return self.saved.value


@pz.pytree_dataclass
class SaveIntermediate(CaptureLayer):
  """Stores the activation passing through it in a `pz.StateVariable`.

  The stored value uses the user-facing axes (one ``heads`` axis at attention
  sites). It holds the last call's value: during KV-cached decoding that is
  one step; the fused generation loop gives it a fixed-shape buffer instead
  (see `gemma_surgery.generate`).

  Built like the Penzai tutorials' layer of the same name, it works in
  hand-written Penzai code: ``SaveIntermediate(pz.StateVariable(None))`` (or
  ``saved=...``) records whatever passes through it, as site ``"custom"``.

  Attributes:
    saved: Where the value goes (one fresh variable per site).
    site: The site name (static); ``"custom"`` for a layer placed by hand
      (the activation is stored as it is, in Penzai's own head layout).
    layer: The layer index, or None for global or custom sites (static).
  """

  saved: pz.StateVariable
  site: str = base.static_field(CUSTOM_SITE)
  layer: int | None = base.static_field(None)

  def captured(self, value: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return heads.user_view(self.site, value)

  @classmethod
  def fresh(cls, site: str, layer: int | None) -> SaveIntermediate:
    label = f"capture/{site}" + ("" if layer is None else f"/{layer}")
    return cls(saved=pz.StateVariable(value=None, label=label), site=site, layer=layer)

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
    treescope.display(heads.user_view(self.site, value))
    return value
