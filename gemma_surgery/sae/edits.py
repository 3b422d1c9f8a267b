"""Feature edits: clamp, ablate or scale chosen SAE latents.

    edits = feature_edits(sae, clamp={3124: 150.0}, ablate=[17], scale={9: 2.0})
    steered = splice_sae(model, sae, use_error_term=True, edits=edits)

Edits are dense ``{latents}`` arrays (array leaves, not static fields), so
changing which latents are edited, or by how much, never recompiles a jitted
or generating model. Applied to features ``f``::

  f_edited = where(clamped, clamp_value, f * scale)

Ablation is ``scale = 0``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery.errors import SAEError


@pz.pytree_dataclass
class FeatureEdits(pz.Struct):
  """Per-latent edits of SAE features.

  Attributes:
    scale: ``{latents}`` float32 multipliers (1 = unchanged, 0 = ablated).
    clamped: ``{latents}`` bool: latents set to ``clamp_value``.
    clamp_value: ``{latents}`` float32 values for clamped latents.
  """

  scale: pz.nx.NamedArray
  clamped: pz.nx.NamedArray
  clamp_value: pz.nx.NamedArray

  @property
  def width(self) -> int:
    return self.scale.named_shape["latents"]

  def __call__(self, features: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """Edits ``{..., latents}`` float32 features."""
    scaled = features * self.scale
    return pz.nx.nmap(jnp.where)(self.clamped, self.clamp_value, scaled)


def _width_of(sae_or_width) -> int:
  if isinstance(sae_or_width, int) and not isinstance(sae_or_width, bool):
    return sae_or_width
  info = getattr(sae_or_width, "info", None)
  if info is None:
    raise SAEError(f"Expected an SAE or a width, got {type(sae_or_width).__name__}.")
  return info.width


def _index(i, width: int, what: str) -> int:
  if isinstance(i, bool) or not isinstance(i, int | np.integer):
    raise SAEError(f"{what}: feature index {i!r} is not an int.")
  if not 0 <= int(i) < width:
    raise SAEError(
      f"{what}: feature index {int(i)} is out of range for an SAE with {width}"
      f" latents (valid: 0..{width - 1}; negative indices are not accepted)."
    )
  return int(i)


def _finite(value, what: str) -> float:
  value = float(value)
  if not np.isfinite(value):
    raise SAEError(f"{what}: value {value} is not finite.")
  return value


def feature_edits(
  sae_or_width,
  *,
  clamp: Mapping[int, float] | None = None,
  ablate: Iterable[int] | None = None,
  scale: Mapping[int, float] | None = None,
) -> FeatureEdits:
  """Builds `FeatureEdits` for an SAE.

  Args:
    sae_or_width: The SAE (or its number of latents).
    clamp: ``{latent: value}``: set the latent's activation to ``value`` at
      every edited position (e.g. a large value to steer).
    ablate: Latents set to zero.
    scale: ``{latent: factor}`` multipliers.

  Returns:
    The edits; no latent may appear in two of the arguments.

  Raises:
    SAEError: Index out of range (negative or ``>= width``), non-int index,
      non-finite value, or a latent edited twice.
  """
  width = _width_of(sae_or_width)
  factors = np.ones(width, np.float32)
  clamped = np.zeros(width, bool)
  values = np.zeros(width, np.float32)
  seen: dict[int, str] = {}

  def claim(i, what):
    i = _index(i, width, what)
    if i in seen:
      raise SAEError(f"Feature {i} is edited twice ({seen[i]} and {what}).")
    seen[i] = what
    return i

  for i, value in (clamp or {}).items():
    i = claim(i, "clamp")
    clamped[i], values[i] = True, _finite(value, "clamp")
  for i in ablate or ():
    factors[claim(i, "ablate")] = 0.0
  for i, value in (scale or {}).items():
    factors[claim(i, "scale")] = _finite(value, "scale")
  return FeatureEdits(
    scale=pz.nx.wrap(jnp.asarray(factors)).tag("latents"),
    clamped=pz.nx.wrap(jnp.asarray(clamped)).tag("latents"),
    clamp_value=pz.nx.wrap(jnp.asarray(values)).tag("latents"),
  )
