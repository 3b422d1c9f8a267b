"""Scaling MLP neurons: deactivate (factor 0) or boost (factor > 1)."""

from __future__ import annotations

from typing import Any

from penzai import pz

from gemma_surgery.surgery import heads
from gemma_surgery.surgery.layers import base


@pz.pytree_dataclass
class NeuronScale(base.SurgeryLayer):
  """Multiplies the ``mlp.hidden`` activation by per-neuron factors.

  The activation-space form of editing the MLP weights: scaling neuron ``j``
  of ``gelu(gate) * up`` by ``f`` scales its contribution
  ``hidden_j * W_down[:, j]`` by ``f``, without touching the parameters.

  Attributes:
    factors: ``{neurons}`` float array (1 for untouched neurons); an array
      leaf, so new factors don't recompile a jitted model.
    site: Site name (static; ``mlp.hidden``).
  """

  factors: pz.nx.NamedArray
  site: str = base.static_field("mlp.hidden")

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> Any:
    base.check_rows(self, x)
    return x * heads.native_value(self.site, self.factors, x).astype(x.dtype)

  def treescope_color(self) -> str:
    return "#c46de3"
