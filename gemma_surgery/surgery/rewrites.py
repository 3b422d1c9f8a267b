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
    site_names: One site or several (each at most once).
    layers: Layer(s) for the per-layer sites; None = all layers. Global sites
      (``embed``, ``final_norm``, ``logits``) have one capture each and
      ignore ``layers`` when listed beside per-layer sites, so
      ``capture(m, ["resid_post", "logits"], 3)`` captures ``resid_post[3]``
      and the logits; with only global sites ``layers`` must be None.

  Returns:
    ``(patched_model, captures)``.

  Raises:
    SiteError: Unknown or repeated sites, bad layers, or layers given for
      global sites only.
  """
  names = [site_names] if isinstance(site_names, str) else list(site_names)
  infos = [sites.site_info(site) for site in names]
  if len(set(names)) != len(names):
    raise errors.SiteError(f"Sites {names} name the same site twice.")
  if layers is not None and not any(info.per_layer for info in infos):
    raise errors.SiteError(
      f"Sites {names} are global (one per model): pass layers=None, got {layers!r}."
    )
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

  Args:
    model: A Penzai transformer LM (not modified).
    site: Any site name.
    layers: Layer(s), None for all; must be None at global sites.
    vector: NamedArray over (a subset of) the site's axes plus batch/seq.
    scale: Finite real number, or a ``{batch}`` NamedArray of per-row scales
      (row ``i`` of the input is steered by ``scale[i]``; the model then runs
      on exactly that many rows). A ``{batch, ...}`` vector is per-row too;
      `gemma_surgery.surgery.rows.stack_rows` makes any edit per-row.
    positions: ``"all"``, ``"prompt"`` or ``"generated"``.
    mask: Optional ``{seq}``/``{batch, seq}`` bool (or 0/1) NamedArray of
      positions to steer; its sizes must match the inputs the model runs on.
    skip_bos: Leave the BOS token unchanged.
    relative: Add ``scale * ||x|| * vector / ||vector||``, with norms over
      the site's axes other than ``heads`` (per position and head); the
      vector must have those axes and no zero-norm slice.

  Raises:
    SiteError: Unknown site, bad layers, layers at a global site.
    SurgeryError: Vector axes/sizes that don't fit the site, non-finite
      values, a zero-norm vector with ``relative=True`` (or ``relative``
      at ``attn.scores``), a mask with other
      axes or sizes or entries than 0/1, unknown ``positions``.
  """
  checks.check_value(
    model, site, vector, "Steering vector", layers=checks.layers_for(site, layers)
  )
  if positions not in base.POSITIONS:
    raise errors.SurgeryError(
      f"positions={positions!r}; valid: {', '.join(base.POSITIONS)}."
    )
  for flag, given in (("skip_bos", skip_bos), ("relative", relative)):
    if not isinstance(given, bool):
      raise errors.SurgeryError(f"{flag} must be True or False, got {given!r}.")
  if isinstance(scale, pz.nx.NamedArray | pz.nx.NamedArrayView):
    # Per-row scales: row i of the batch is steered by scale[i].
    checks.check_value(
      model, site, scale, "Steering scale", allowed=("batch",), required=("batch",)
    )
    scale = scale.astype(jnp.float32)
  else:
    checks.check_scalar("Steering scale", scale)
    scale = jnp.asarray(scale, jnp.float32)
  norm_axes = tuple(a for a in sites.site_info(site).axes if a != "heads")
  if relative and site == "attn.scores":
    raise errors.SurgeryError(
      "relative=True is not defined at 'attn.scores': masked entries hold a"
      " large negative constant, so the scores' norm is meaningless. Steer"
      " 'attn.scores' with relative=False, or 'attn.pattern' relatively."
    )
  if relative:
    checks.check_nonzero_norm("Steering vector", vector, norm_axes)
  seq_mask = checks.seq_index_mask(mask, vector.named_shape, "Steering mask")
  layers = checks.layers_for(site, layers)
  return sites.insert(
    model,
    site,
    layers,
    lambda _: SteerIntermediate(
      vector=vector,
      scale=scale,
      mask=None if seq_mask is None else seq_mask != 0,
      site=site,
      positions=positions,
      skip_bos=skip_bos,
      relative=relative,
      norm_axes=norm_axes,
    ),
  )


def chain(model: Any, *rewrites: Callable[[Any], Any]) -> Any:
  """Applies rewrites in order: ``chain(m, f, g) == g(f(m))``."""
  for rewrite in rewrites:
    model = rewrite(model)
  return model


def unpatch(model: Any, also: Iterable[type] = ()) -> Any:
  """Removes every gemma_surgery layer, and optionally layers of your own.

  Removes every instance of `SurgeryLayer`: all layers this library inserts
  (captures, steering, ablation, patching, neuron and attention edits, top-k
  captures, SAE/transcoder splices). Layers of other classes stay, e.g. a
  hand-written Penzai layer you inserted yourself, unless its class is listed
  in ``also``; then every instance of it (and of its subclasses) is removed
  too, along with anything nested inside it.

  Args:
    model: A Penzai transformer LM (not modified).
    also: More layer classes to remove (subclasses of ``pz.nn.Layer``).

  Returns:
    The model without those layers.

  Raises:
    SurgeryError: ``also`` holds something other than layer classes.
  """
  extra = tuple(also) if isinstance(also, Iterable) else (also,)
  for cls in extra:
    if not (isinstance(cls, type) and issubclass(cls, pz.nn.Layer)):
      raise errors.SurgeryError(
        f"unpatch(also=...) takes layer classes (subclasses of pz.nn.Layer),"
        f" got {cls!r}."
      )
  return (
    pz.select(model).at_instances_of((base.SurgeryLayer, *extra)).remove_from_parent()
  )
