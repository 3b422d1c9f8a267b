"""Steering: add a vector to the activation at a site."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.surgery import heads
from gemma_surgery.surgery.layers import base


@pz.pytree_dataclass
class SteerIntermediate(base.SurgeryLayer):
  """Adds ``scale * vector`` to the activation at chosen positions.

  ``vector`` and ``scale`` are array leaves: changing them between calls of a
  jitted or generating model does not recompile. With ``relative=True`` the
  added vector is ``scale * ||x|| * vector / ||vector||`` per position (norm
  over ``norm_axes``), i.e. ``scale`` is a fraction of the activation's norm;
  a zero ``vector`` (or a zero slice of it) adds nothing.

  Side inputs: ``token_positions`` (``{batch, seq}``) and, during fused
  generation, ``generation_prompt_end`` (see `gemma_surgery.surgery.layers.base`).

  Attributes:
    vector: NamedArray over (a subset of) the site's axes, e.g.
      ``{embedding}`` at residual sites or ``{heads, projection}`` at
      ``attn.z``.
    scale: Scalar (or broadcastable NamedArray) multiplier.
    mask: Optional ``{batch?, seq}`` bool (or 0/1) NamedArray of positions
      to steer (combined with ``positions`` and ``skip_bos``); its sizes must
      match the input's, else `SurgeryError` when the model runs.
    site: Site name (static).
    positions: ``"all"``, ``"prompt"`` or ``"generated"`` (static).
    skip_bos: Leave the BOS token (position 0) unchanged (static).
    relative: Scale relative to the activation norm (static).
    norm_axes: Axes of the norm for ``relative`` (static); `steer` uses the
      site's axes other than ``heads`` (a norm per position and head).
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
    base.check_rows(self, value)
    vector = heads.native_value(self.site, self.vector, value).astype(value.dtype)
    if self.relative:
      delta = self.scale * _relative(vector, value, self.norm_axes, self.site)
    else:
      delta = self.scale * vector
    mask = base.phase_mask(self.positions, side_inputs, value, self.skip_bos)
    if self.mask is not None:
      own = _fitted_mask(self.mask, value, self.site)
      mask = own if mask is None else mask & own
    if mask is not None:
      delta = pz.nx.nmap(jnp.where)(mask, delta, 0.0)
    return value + delta.astype(value.dtype)

  def treescope_color(self) -> str:
    return "#f5a742"


def _relative(
  vector: pz.nx.NamedArray, value: pz.nx.NamedArray, norm_axes: tuple[str, ...], site
) -> pz.nx.NamedArray:
  """``||value|| * vector / ||vector||`` per position (0 where the vector is 0).

  Norms are Frobenius norms over the ``norm_axes`` the activation has.
  """
  axes = tuple(a for a in norm_axes if a in value.named_shape)
  missing = [a for a in axes if a not in vector.named_shape]
  if not axes or missing:
    raise errors.SurgeryError(
      f"Relative steering at {site!r} normalizes over {list(norm_axes)}: the"
      f" activation has {dict(value.named_shape)}, the vector"
      f" {dict(vector.named_shape)}; both need these axes."
    )
  norm = pz.nx.nmap(jnp.linalg.norm)(value.untag(*axes))
  vector_norm = pz.nx.nmap(jnp.linalg.norm)(vector.untag(*axes))
  nonzero = vector_norm > 0
  # A zero vector adds nothing (never 0/0 = NaN).
  unit = vector / pz.nx.nmap(jnp.where)(nonzero, vector_norm, 1.0)
  return norm * pz.nx.nmap(jnp.where)(nonzero, unit, 0.0)


def _fitted_mask(
  mask: pz.nx.NamedArray, value: pz.nx.NamedArray, site: str
) -> pz.nx.NamedArray:
  """The ``{batch?, seq}`` mask as bools, checked against the activation.

  Raises:
    SurgeryError: (at trace time) a mask axis the activation lacks or whose
      size differs, e.g. a mask for 3 positions on an 8-token input.
  """
  for axis, size in mask.named_shape.items():
    have = value.named_shape.get(axis)
    if have != size:
      raise errors.SurgeryError(
        f"Steering mask at {site!r} has {axis}={size}, but the activation has"
        f" {axis}={have} ({dict(value.named_shape)}). A mask must match every"
        " input the model runs on (under gs.generate, decoding steps have"
        " seq=1: use positions= there)."
      )
  return mask != 0
