"""`Captures`: the one container of captured activations (an activation cache).

Every capture path returns one: `gemma_surgery.capture` (full activations),
`gemma_surgery.interventions.capture_topk` (top-k values and indices) and
`gemma_surgery.sae.splice_sae(..., capture_features=True)` (SAE features, at
site ``"sae.features"``). It holds the capture layers inserted into the
model, keyed by ``(site, layer)``; after the patched model runs (eagerly, with
`gemma_surgery.jit_forward`, or under `gemma_surgery.generate`), indexing
reads the last value they saw:

    patched, acts = gs.capture(model, ["resid_post", "attn.pattern"])
    patched(tokens)
    acts["resid_post", 3]            # {batch, seq, embedding}
    acts["resid_post", -1]           # negative layers count from the end
    acts.stacked("attn.pattern")     # {layer, batch, seq, heads, kv_seq}
    both = acts | other_captures     # one container for several rewrites
    acts.masked("resid_post", 3, mask=tokens != 0)  # 0 at padding positions
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.surgery import checks
from gemma_surgery.surgery.layers.capture import CaptureLayer

Key = tuple[str, int | None]


class Captures(Mapping):
  """Captured values keyed by ``(site, layer)`` (``site`` alone if global).

  A read-only mapping: ``captures[site, layer]`` is the capture's value (a
  NamedArray, or a ``(values, indices)`` pair for top-k captures); it raises
  `SurgeryError` before the patched model has run and `SiteError` for a key
  that was not captured.

  Args:
    layers: The capture layers inserted into the model, by key.
    num_layers: The model's layer count (for negative layer indices).
    mask: Optional ``{batch, seq}`` bool NamedArray of real (non-padding)
      positions, used by `masked` (`gemma_surgery.generate` sets it).
  """

  def __init__(
    self,
    layers: Mapping[Key, CaptureLayer],
    num_layers: int | None = None,
    *,
    mask: pz.nx.NamedArray | None = None,
  ):
    self._layers = dict(layers)
    self._num_layers = num_layers
    self.mask = mask

  def _key(self, key: Any) -> Key:
    if isinstance(key, str):
      return key, None
    site, layer = key
    if isinstance(layer, int) and layer < 0 and self._num_layers is not None:
      layer += self._num_layers
    return site, layer

  def __getitem__(self, key: Any) -> Any:
    resolved = self._key(key)
    if resolved not in self._layers:
      raise errors.SiteError(
        f"Nothing was captured at {resolved}; captured: {list(self._layers)}."
      )
    return self._layers[resolved].value()

  def __contains__(self, key: Any) -> bool:
    try:
      return self._key(key) in self._layers
    except (TypeError, ValueError):
      return False

  def __iter__(self) -> Iterator[Key]:
    return iter(self._layers)

  def __len__(self) -> int:
    return len(self._layers)

  def __or__(self, other: Captures) -> Captures:
    """Both containers' captures in one (keys must not overlap)."""
    if not isinstance(other, Captures):
      return NotImplemented
    overlap = set(self._layers) & set(other._layers)
    if overlap:
      raise errors.SiteError(f"Both captures hold {sorted(overlap, key=str)}.")
    n = self._num_layers if self._num_layers is not None else other._num_layers
    mask = self.mask if self.mask is not None else other.mask
    return Captures({**self._layers, **other._layers}, n, mask=mask)

  def keys(self) -> list[Key]:  # type: ignore[override]
    return list(self._layers)

  def sites(self) -> list[str]:
    """The captured site names, in capture order."""
    return list(dict.fromkeys(site for site, _ in self._layers))

  def layers(self, site: str) -> list[int]:
    """The layers captured at ``site``, ascending."""
    return sorted(k[1] for k in self._layers if k[0] == site and k[1] is not None)

  def stacked(self, site: str, axis: str = "layer") -> pz.nx.NamedArray:
    """The site's per-layer captures stacked on a new ``axis``."""
    layers = self.layers(site)
    if not layers:
      raise errors.SiteError(f"No per-layer captures of {site!r}.")
    return pz.nx.stack([self[site, i] for i in layers], axis)

  def value(self) -> Any:
    """The value of the only capture (e.g. an SAE's features).

    Raises:
      SiteError: If the container holds more than one capture.
    """
    if len(self._layers) != 1:
      raise errors.SiteError(
        f"value() needs exactly one capture; this holds {list(self._layers)}:"
        " index it by (site, layer)."
      )
    return next(iter(self._layers.values())).value()

  def masked(
    self,
    site: str,
    layer: int | None = None,
    *,
    mask: pz.nx.NamedArray | None = None,
    fill: float = 0.0,
  ) -> Any:
    """The capture with ``fill`` at positions that are not real tokens.

    Args:
      site: Site name.
      layer: Layer index (None at global sites).
      mask: ``{seq}`` or ``{batch, seq}`` bool (or 0/1) NamedArray, True at
        real tokens, e.g. ``tokens != pad_id`` for an eager run; default the
        container's own `mask` (set by `gemma_surgery.generate`: left padding
        and positions after EOS are not real).
      fill: The value put at other positions (top-k pairs: values only).

    Raises:
      SurgeryError: No mask given or known, or one whose axes or sizes don't
        fit the capture.
    """
    value = self[site if layer is None else (site, layer)]
    mask = self.mask if mask is None else mask
    if mask is None:
      raise errors.SurgeryError(
        "masked() needs mask= (a {batch?, seq} bool NamedArray of real tokens);"
        " only captures from gs.generate know their own."
      )
    if isinstance(value, tuple):  # top-k: (values, indices)
      return (self._fill(value[0], mask, fill), value[1])
    return self._fill(value, mask, fill)

  @staticmethod
  def _fill(value: pz.nx.NamedArray, mask: Any, fill: float) -> pz.nx.NamedArray:
    real = checks.seq_index_mask(mask, value.named_shape, "Capture mask")
    if real is None:
      return value
    return pz.nx.nmap(jnp.where)(real != 0, value, fill).astype(value.dtype)

  def variables(self) -> list[pz.StateVariable]:
    """The state variables the capture layers write (for jitting by hand)."""
    return [layer.saved for layer in self._layers.values()]

  def __repr__(self) -> str:
    return f"Captures({list(self._layers)})"
