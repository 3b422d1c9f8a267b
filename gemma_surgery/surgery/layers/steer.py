"""Steering: add a vector to the activation at a site."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemma_surgery.surgery import heads
from gemma_surgery.surgery.layers import base


@pz.pytree_dataclass
class SteerIntermediate(base.SurgeryLayer):
  """Adds ``scale * vector`` to the activation at chosen positions.

  ``vector`` and ``scale`` are array leaves: changing them between calls of a
  jitted or generating model does not recompile. With ``relative=True`` the
  added vector is ``scale * ||x|| * vector / ||vector||`` per position (norm
  over ``norm_axes``), i.e. ``scale`` is a fraction of the activation's norm.

  Side inputs: ``token_positions`` (``{batch, seq}``) and, during fused
  generation, ``generation_prompt_end`` (see `gemma_surgery.surgery.layers.base`).

  Attributes:
    vector: NamedArray over (a subset of) the site's axes, e.g.
      ``{embedding}`` at residual sites or ``{heads, projection}`` at
      ``attn.z``.
    scale: Scalar (or broadcastable NamedArray) multiplier.
    mask: Optional ``{batch?, seq}`` bool NamedArray of positions to steer
      (explicit mask; combined with ``positions`` and ``skip_bos``).
    site: Site name (static).
    positions: ``"all"``, ``"prompt"`` or ``"generated"`` (static).
    skip_bos: Leave the BOS token (position 0) unchanged (static).
    relative: Scale relative to the activation norm (static).
    norm_axes: Axes of the norm for ``relative`` (static).
  """

  vector: pz.nx.NamedArray
  scale: Any
  mask: pz.nx.NamedArray | None = None
  site: str = base.static_field("resid_post")
  positions: str = base.static_field("all")
  skip_bos: bool = base.static_field(False)
  relative: bool = base.static_field(False)
  norm_axes: tuple[str, ...] = base.static_field(("embedding",))

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> Any:
    vector = heads.native_value(self.site, self.vector, value).astype(value.dtype)
    if self.relative:
      axes = tuple(a for a in self.norm_axes if a in value.named_shape)
      # Frobenius norm over the (one or two) norm axes.
      norm = pz.nx.nmap(jnp.linalg.norm)(value.untag(*axes))
      unit = vector / pz.nx.nmap(jnp.linalg.norm)(vector.untag(*axes))
      delta = self.scale * norm * unit
    else:
      delta = self.scale * vector
    mask = base.phase_mask(self.positions, side_inputs, value, self.skip_bos)
    if self.mask is not None:
      mask = self.mask if mask is None else mask & self.mask
    if mask is not None:
      delta = pz.nx.nmap(jnp.where)(mask, delta, 0.0)
    return value + delta.astype(value.dtype)

  def treescope_color(self) -> str:
    return "#f5a742"
