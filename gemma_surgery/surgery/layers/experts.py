"""Mixture-of-experts edits (Gemma 4 26B-A4B): expert ablation, forced routing."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemma_surgery.surgery.layers import base

# Router logits of experts a token may not use (softmax weight exactly 0).
_EXCLUDED = -1e30


@pz.pytree_dataclass
class ExpertMask(base.SurgeryLayer):
  """Multiplies the routing weights (``moe.weights``) by ``{experts}`` factors.

  Factor 0 ablates an expert: its output no longer reaches the residual
  stream and the remaining weights are left as routed (not renormalized).

  Attributes:
    factors: ``{experts}`` float array (array leaf: changing it never
      recompiles).
    site: ``moe.weights`` (static).
  """

  factors: pz.nx.NamedArray
  site: str = base.static_field("moe.weights")

  def __call__(self, x: pz.nx.NamedArray, /, **_side_inputs) -> Any:
    return x * self.factors.astype(x.dtype)

  def treescope_color(self) -> str:
    return "#c46de3"


@pz.pytree_dataclass
class ForceRouting(base.SurgeryLayer):
  """Restricts routing to allowed experts (at ``moe.router_logits``).

  Logits of disallowed experts become -1e30, so the top-k (and the
  renormalized weights) are taken among the allowed experts only; with
  exactly ``top_k`` allowed experts every token is routed to those.

  Attributes:
    allowed: ``{experts}`` bool array (array leaf).
    site: ``moe.router_logits`` (static).
  """

  allowed: pz.nx.NamedArray
  site: str = base.static_field("moe.router_logits")

  def __call__(self, x: pz.nx.NamedArray, /, **_side_inputs) -> Any:
    excluded = jnp.asarray(_EXCLUDED, x.dtype)
    return pz.nx.nmap(jnp.where)(self.allowed, x, excluded)

  def treescope_color(self) -> str:
    return "#c46de3"
