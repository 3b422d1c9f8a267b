"""Model rewrites: capture, steer, chain and unpatch — all pure functions.

Each function takes a Penzai model and returns a new one (sharing parameters)
with surgery layers inserted at named sites; the input model is never
modified.

    patched, acts = gs.capture(model, ["resid_post", "attn.pattern"])
    patched(tokens)
    acts["resid_post", 3]            # {batch, seq, embedding}
    acts.stacked("attn.pattern")     # {layer, batch, seq, heads, kv_seq}
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemma_surgery import errors, sites
from gemma_surgery.layers import base
from gemma_surgery.layers.capture import SaveIntermediate
from gemma_surgery.layers.steer import SteerIntermediate, check_finite

Layers = int | Iterable[int] | None


class Captures:
  """Activations captured by `capture`, keyed by ``(site, layer)``.

  Holds the capture layers' state variables: after the patched model runs,
  ``captures[site, layer]`` (or ``captures[site]`` for global sites) is the
  last value seen there. Negative layers count from the end, as at `capture`.
  """

  def __init__(
    self,
    savers: dict[tuple[str, int | None], SaveIntermediate],
    num_layers: int | None = None,
  ):
    self._savers = savers
    self._num_layers = num_layers

  def keys(self) -> list[tuple[str, int | None]]:
    return list(self._savers)

  def __contains__(self, key) -> bool:
    return self._key(key) in self._savers

  def _key(self, key) -> tuple[str, int | None]:
    if isinstance(key, str):
      return key, None
    key = tuple(key)
    if (
      len(key) == 2
      and isinstance(key[1], int)
      and key[1] < 0
      and self._num_layers is not None
    ):
      return key[0], key[1] + self._num_layers
    return key

  def __getitem__(self, key) -> pz.nx.NamedArray:
    key = self._key(key)
    if key not in self._savers:
      raise errors.SiteError(f"Nothing was captured at {key}; captured: {self.keys()}.")
    return self._savers[key].value()

  def layers(self, site: str) -> list[int]:
    return sorted(k[1] for k in self._savers if k[0] == site and k[1] is not None)

  def stacked(self, site: str, axis: str = "layer") -> pz.nx.NamedArray:
    """The site's captures stacked over layers on a new ``axis``."""
    layers = self.layers(site)
    if not layers:
      raise errors.SiteError(f"No per-layer captures of {site!r}.")
    return pz.nx.stack([self[site, i] for i in layers], axis)

  def variables(self) -> list[pz.StateVariable]:
    return [s.saved for s in self._savers.values()]

  def __repr__(self) -> str:
    return f"Captures({self.keys()})"


def capture(
  model: Any, site_names: str | Iterable[str], layers: Layers = None
) -> tuple[Any, Captures]:
  """Inserts a fresh `SaveIntermediate` at every requested site.

  Args:
    model: A Penzai transformer LM (not modified).
    site_names: One site or several; global sites ignore ``layers``.
    layers: Layer(s) for per-layer sites; None = all layers.

  Returns:
    ``(patched_model, captures)``.
  """
  names = [site_names] if isinstance(site_names, str) else list(site_names)
  n = sites.num_layers(model)
  savers: dict[tuple[str, int | None], SaveIntermediate] = {}

  def make(site):
    def build(layer):
      saver = SaveIntermediate.fresh(site, layer)
      savers[site, layer] = saver
      return saver

    return build

  for site in names:
    site_layers = layers if sites.site_info(site).per_layer else None
    model = sites.insert(model, site, site_layers, make(site))
  return model, Captures(savers, n)


def steer(
  model: Any,
  site: str,
  layers: Layers,
  vector: pz.nx.NamedArray,
  scale: float = 1.0,
  *,
  positions: str = "all",
  mask: pz.nx.NamedArray | None = None,
  skip_bos: bool = False,
  relative: bool = False,
) -> Any:
  """Adds ``scale * vector`` at a site (see `SteerIntermediate`).

  Raises:
    SiteError: Unknown site or layer out of range.
    SurgeryError: Vector axes/sizes that don't fit the site, non-finite
      values, unknown ``positions``.
  """
  info = sites.site_info(site)
  if not isinstance(vector, pz.nx.NamedArray | pz.nx.NamedArrayView):
    raise errors.SurgeryError(
      f"The steering vector must be a NamedArray over the site's axes"
      f" {info.axes}, e.g. pz.nx.wrap(v).tag('embedding')."
    )
  unknown = set(vector.named_shape) - set(info.axes) - {"batch", "seq"}
  if unknown or vector.positional_shape:
    raise errors.SurgeryError(
      f"Vector axes {dict(vector.named_shape)} don't fit site {site!r}, whose"
      f" axes are {info.axes} (plus batch, seq)."
    )
  _check_sizes(model, site, vector)
  if positions not in base.POSITIONS:
    raise errors.SurgeryError(
      f"positions={positions!r}; valid: {', '.join(base.POSITIONS)}."
    )
  check_finite("Steering vector", vector)
  check_finite("Steering scale", scale)
  layer_arg = layers if info.per_layer else None
  return sites.insert(
    model,
    site,
    layer_arg,
    lambda _: SteerIntermediate(
      vector=vector,
      scale=jnp.asarray(scale, jnp.float32),
      mask=mask,
      site=site,
      positions=positions,
      skip_bos=skip_bos,
      relative=relative,
    ),
  )


def _check_sizes(model: Any, site: str, value: pz.nx.NamedArray) -> None:
  """Checks a user value's axis sizes against the model's metadata."""
  meta = model.metadata
  config = getattr(model, "config", None)
  sizes = {
    "embedding": meta.embedding_dim,
    "neurons": meta.mlp_hidden_dim,
    "projection": meta.projection_dim,
    "vocabulary": meta.vocab_size,
  }
  if config is not None:
    kv = site in ("attn.k", "attn.v")
    sizes["heads"] = config.num_kv_heads if kv else config.num_heads
  for name, size in value.named_shape.items():
    if name in sizes and sizes[name] != size:
      raise errors.SurgeryError(
        f"Value for site {site!r} has {name}={size}; the model has"
        f" {name}={sizes[name]}."
      )


def chain(model: Any, *rewrites: Callable[[Any], Any]) -> Any:
  """Applies rewrites in order: ``chain(m, f, g) == g(f(m))``."""
  for rewrite in rewrites:
    model = rewrite(model)
  return model


def unpatch(model: Any) -> Any:
  """Removes every gemma_surgery layer, restoring the original structure."""
  return pz.select(model).at_instances_of(base.SurgeryLayer).remove_from_parent()
