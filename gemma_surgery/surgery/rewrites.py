"""Model rewrites: capture, steer, chain and unpatch — all pure functions.

Each function takes a Penzai model and returns a new one (sharing parameters)
with surgery layers inserted at named sites; the input model is never
modified. Rewrites that capture return ``(model, Captures)``. Every rewrite
takes the same leading arguments: ``(model, site, layers, ...)``, with
``heads=`` / ``neurons=`` / ``positions=`` keywords where they apply (see
`gemma_surgery.surgery.interventions`).

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

from gemma_surgery import errors
from gemma_surgery.surgery import checks, sites
from gemma_surgery.surgery.captures import Captures
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.capture import SaveIntermediate
from gemma_surgery.surgery.layers.steer import SteerIntermediate

Layers = int | Iterable[int] | None


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
  checks.check_value(model, site, vector, "Steering vector")
  if positions not in base.POSITIONS:
    raise errors.SurgeryError(
      f"positions={positions!r}; valid: {', '.join(base.POSITIONS)}."
    )
  checks.check_finite("Steering scale", scale)
  return sites.insert(
    model,
    site,
    checks.layers_for(site, layers),
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


def chain(model: Any, *rewrites: Callable[[Any], Any]) -> Any:
  """Applies rewrites in order: ``chain(m, f, g) == g(f(m))``."""
  for rewrite in rewrites:
    model = rewrite(model)
  return model


def unpatch(model: Any) -> Any:
  """Removes every gemma_surgery layer, restoring the original structure."""
  return pz.select(model).at_instances_of(base.SurgeryLayer).remove_from_parent()
