"""Top-k captures: keep only the k largest entries along one axis.

Capturing ``attn.pattern`` in full costs O(seq²) per head and layer; a
`TopKCapture` stores k values and their indices per query instead.
"""

from __future__ import annotations

from typing import Any

import jax
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.layers import base
from gemma_surgery.layers.capture import CaptureLayer

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
    view = base.user_view(self.site, x)
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

  def value(self) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    """``(values, indices)``; raises `SurgeryError` before the model ran."""
    if self.saved.value is None:
      where = self.site if self.layer is None else f"{self.site}[{self.layer}]"
      raise errors.SurgeryError(
        f"Top-k capture at {where} is empty: run the patched model first."
      )
    return self.saved.value

  def treescope_color(self) -> str:
    return "#79eb75"


class TopKCaptures:
  """Top-k captures keyed by ``(site, layer)``; see `capture_topk`."""

  def __init__(self, savers: dict[tuple[str, int | None], TopKCapture], n: int):
    self._savers = savers
    self._num_layers = n

  def keys(self) -> list[tuple[str, int | None]]:
    return list(self._savers)

  def _key(self, key: Any) -> tuple[str, int | None]:
    if isinstance(key, str):
      return key, None
    site, layer = key
    if isinstance(layer, int) and layer < 0:
      layer += self._num_layers
    return site, layer

  def __contains__(self, key: Any) -> bool:
    return self._key(key) in self._savers

  def __getitem__(self, key: Any) -> tuple[pz.nx.NamedArray, pz.nx.NamedArray]:
    key = self._key(key)
    if key not in self._savers:
      raise errors.SiteError(f"No top-k capture at {key}; captured: {self.keys()}.")
    return self._savers[key].value()

  def variables(self) -> list[pz.StateVariable]:
    return [s.saved for s in self._savers.values()]

  def __repr__(self) -> str:
    return f"TopKCaptures({self.keys()})"
