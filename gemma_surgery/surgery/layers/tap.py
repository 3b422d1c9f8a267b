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

import jax
import jax.numpy as jnp
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


@pz.pytree_dataclass
class GradientGate(base.SurgeryLayer):
  """Passes its input unchanged; scales the gradient flowing back by ``keep``.

  The output is ``stop_gradient(x) + keep * (x − stop_gradient(x))``: the
  forward value is exactly ``x``, the backward ``keep · dy``. ``keep`` is an
  array leaf (0 drops the gradient through this site, 1 keeps it), so
  switching gates never recompiles. AtP*'s GradDrop puts one at each
  layer's residual contributions.

  Attributes:
    keep: Scalar gradient multiplier (float array).
    site: Site name (static).
    layer: Layer index (static).
  """

  keep: Any
  site: str = base.static_field("attn.out")
  layer: int | None = base.static_field(None)

  def __call__(self, value: Any, /, **side_inputs) -> Any:
    keep = jnp.asarray(self.keep, value.dtype)

    @pz.nx.nmap
    def gate(x):
      frozen = jax.lax.stop_gradient(x)
      return frozen + keep * (x - frozen)

    return gate(value)

  @classmethod
  def fresh(cls, site: str, layer: int | None) -> GradientGate:
    return cls(keep=jnp.ones((), jnp.float32), site=site, layer=layer)

  def treescope_color(self) -> str:
    return "#e0a07b"
