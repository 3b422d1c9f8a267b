"""Top-k captures: keep only the k largest entries along one axis.

Capturing ``attn.pattern`` in full costs O(seq²) per head and layer; a
`TopKCapture` stores k values and their indices per query instead.
"""

from __future__ import annotations

from typing import Any

import jax
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.surgery import heads
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.capture import CaptureLayer

TOPK_AXIS = "top_k"


@pz.pytree_dataclass
class TopKCapture(CaptureLayer):
  """Stores the top-k values and indices of the activation along ``axis``.

  The stored pair uses user-facing axes, with ``axis`` replaced by ``top_k``
  (size k, largest first): at ``mlp.hidden`` ``{batch, seq, top_k}``, at
  ``attn.pattern`` ``{batch, seq, heads, top_k}`` (indices into ``kv_seq``).

  Attributes:
    saved: State variable receiving ``(values, indices)``.
    k: Number of entries kept (static).
    axis: Axis reduced (static).
    site: Site name (static).
    layer: Layer index, or None for global sites (static).
  """

  saved: pz.StateVariable
  k: int = base.static_field(8)
  axis: str = base.static_field("neurons")
  site: str = base.static_field("mlp.hidden")
  layer: int | None = base.static_field(None)

  def captured(self, x: pz.nx.NamedArray) -> Any:
    view = heads.user_view(self.site, x)
    size = view.named_shape[self.axis]
    if self.k > size:
      raise errors.SurgeryError(
        f"k={self.k} exceeds the {self.axis} size {size} at {self.site}."
      )
    values, indices = pz.nx.nmap(jax.lax.top_k)(view.untag(self.axis), self.k)
    return values.tag(TOPK_AXIS), indices.tag(TOPK_AXIS)

  @classmethod
  def fresh(cls, site: str, layer: int | None, k: int, axis: str) -> TopKCapture:
    label = f"topk/{site}" + ("" if layer is None else f"/{layer}")
    saved = pz.StateVariable(value=None, label=label)
    return cls(saved=saved, k=k, axis=axis, site=site, layer=layer)

  def treescope_color(self) -> str:
    return "#79eb75"
