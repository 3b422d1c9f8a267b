"""Interventions as pure model rewrites: ablation, patching, neuron scaling,
attention-pattern edits and top-k captures.

Each function returns a new model with surgery layers inserted at named sites
(see `gemma_surgery.surgery.sites`); the input model is never modified, and
`gemma_surgery.unpatch` removes them all. Heads are given as flat indices
``0 .. num_heads-1`` (``num_kv_heads`` at ``attn.k``/``attn.v``), neurons as
indices into ``mlp.hidden``'s ``neurons`` axis.

    model = gs.interventions.ablate(model, "attn.z", 3, heads=[0, 5])
    model = gs.interventions.knock_out_heads(model, [1, 2], heads=[4])
    _, acts = gs.capture(model_b, "resid_post", 6); model_b(tokens_b)
    patched = gs.interventions.patch(model_a, "resid_post", 6, acts["resid_post", 6])
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from gemma_surgery import errors
from gemma_surgery.surgery import sites
from gemma_surgery.surgery.captures import Captures
from gemma_surgery.surgery.checks import (
  check_scalar,
  check_value,
  edit_sizes,
  index_mask,
  layers_for,
  seq_index_mask,
)
from gemma_surgery.surgery.layers.ablate import ABLATE_MODES, Ablate, Patch
from gemma_surgery.surgery.layers.attention import (
  KnockOutHeads,
  OverridePattern,
  RescalePattern,
)
from gemma_surgery.surgery.layers.neurons import NeuronScale
from gemma_surgery.surgery.layers.topk import TopKCapture

Layers = int | Iterable[int] | None
Indices = int | Iterable[int] | None

_TOPK_AXES = {
  "mlp.hidden": "neurons",
  "attn.pattern": "kv_seq",
  "attn.scores": "kv_seq",
  "logits": "vocabulary",
}


# --- Ablation and patching -----------------------------------------------------


def ablate(
  model: Any,
  site: str,
  layers: Layers,
  *,
  heads: Indices = None,
  neurons: Indices = None,
  mode: str = "zero",
  value: pz.nx.NamedArray | None = None,
  mean_axes: tuple[str, ...] = ("batch", "seq"),
) -> Any:
  """Ablates the activation at a site (see `Ablate`).

  Args:
    model: A Penzai Gemma LM (uncached or KV-caching); not modified.
    site: Any site name.
    layers: Layer(s), or None for all layers (ignored at global sites).
    heads: Only these heads (head sites only).
    neurons: Only these neurons (``mlp.hidden`` only).
    mode: ``"zero"``, ``"mean"`` (over ``mean_axes``) or ``"value"``.
    value: The replacement for ``mode="value"``.
    mean_axes: Axes averaged over in mean mode.

  Raises:
    SiteError: Unknown site, bad layers, heads/neurons at the wrong site.
    SurgeryError: Bad mode, indices out of range, value that doesn't fit.
  """
  if mode not in ABLATE_MODES:
    raise errors.SurgeryError(f"mode={mode!r}; valid: {', '.join(ABLATE_MODES)}.")
  if (value is not None) != (mode == "value"):
    raise errors.SurgeryError("Pass value= exactly when mode='value'.")
  at = layers_for(site, layers)
  if value is not None:
    check_value(model, site, value, "Ablation value", layers=at)
  head_mask = index_mask(model, site, heads, "heads", at)
  neuron_mask = index_mask(model, site, neurons, "neurons", at)
  return sites.insert(
    model,
    site,
    at,
    lambda _: Ablate(
      value=value,
      head_mask=head_mask,
      neuron_mask=neuron_mask,
      site=site,
      mode=mode,
      mean_axes=tuple(mean_axes),
    ),
  )


def patch(
  model: Any,
  site: str,
  layer: int | None,
  value: pz.nx.NamedArray,
  *,
  positions: Any = None,
  heads: Indices = None,
) -> Any:
  """Replaces the activation at one site by ``value`` (see `Patch`).

  Args:
    model: The model (not modified).
    site: Any site name.
    layer: One layer index (None for global sites).
    value: Replacement in user-facing axes, e.g. a capture from another run.
    positions: None (all), a list of ``seq`` indices, or a ``{seq}``/
      ``{batch, seq}`` bool NamedArray.
    heads: Only these heads (head sites only).

  Raises:
    SiteError: Unknown site, bad layer.
    SurgeryError: Value or positions that don't fit.
  """
  if sites.site_info(site).per_layer and (
    isinstance(layer, bool) or not isinstance(layer, int | np.integer)
  ):
    raise errors.SiteError(f"patch takes one layer index, got {layer!r}.")
  layer = layers_for(site, layer)
  required = sites.site_info(site).axes
  check_value(model, site, value, "Patch value", required=required, layers=layer)
  head_mask = index_mask(model, site, heads, "heads", layer)
  positions_mask = seq_index_mask(positions, value.named_shape)
  return sites.insert(
    model,
    site,
    None if layer is None else int(layer),
    lambda _: Patch(
      value=value, seq_mask=positions_mask, head_mask=head_mask, site=site
    ),
  )


# --- Neurons --------------------------------------------------------------------


def scale_neurons(model: Any, layers: Layers, neurons: Indices, factor: Any) -> Any:
  """Multiplies chosen ``mlp.hidden`` neurons by ``factor`` (see `NeuronScale`).

  Args:
    model: The model (not modified).
    layers: Layer(s), or None for all.
    neurons: Neuron indices.
    factor: A float, or a ``{neurons}`` NamedArray of per-neuron factors for
      the chosen neurons (unchosen neurons keep factor 1).

  Raises:
    SurgeryError: Indices out of range, non-finite or ill-shaped factors.
  """
  mask = index_mask(model, "mlp.hidden", neurons, "neurons", layers)
  if mask is None:
    raise errors.SurgeryError("Pass the neuron indices to scale (a list of ints).")
  if isinstance(factor, pz.nx.NamedArray | pz.nx.NamedArrayView):
    check_value(
      model, "mlp.hidden", factor, "Neuron factor", allowed=("neurons",), layers=layers
    )
  else:
    check_scalar("Neuron factor (a number, or a {neurons} NamedArray)", factor)
    factor = jnp.asarray(factor, jnp.float32)
  factors = 1.0 + mask * (factor - 1.0)
  return sites.insert(
    model, "mlp.hidden", layers, lambda _: NeuronScale(factors=factors)
  )


def deactivate_neurons(model: Any, layers: Layers, neurons: Indices) -> Any:
  """Zeroes chosen ``mlp.hidden`` neurons (removes their MLP contribution)."""
  return scale_neurons(model, layers, neurons, 0.0)


def boost_neurons(model: Any, layers: Layers, neurons: Indices, factor: Any) -> Any:
  """Multiplies chosen ``mlp.hidden`` neurons by ``factor`` (e.g. 2.0)."""
  return scale_neurons(model, layers, neurons, factor)


# --- Attention patterns -----------------------------------------------------------


def _sliding_window(model: Any, layer: int) -> int | None:
  """The sliding window of block ``layer``'s attention mask, if local."""
  blocks = pz.select(model.body).at_instances_of(model_parts.TransformerBlock)
  block = blocks.get_sequence()[layer]
  windows = (
    pz.select(block)
    .at_instances_of(pz.nn.ApplyCausalSlidingWindowAttentionMask)
    .get_sequence()
  )
  return windows[0].sliding_window_size if windows else None


def knock_out_heads(model: Any, layers: Layers, heads: Indices) -> Any:
  """Sends chosen heads' attention entirely to the BOS key (see `KnockOutHeads`).

  An empty head list inserts a layer that changes nothing.

  Raises:
    SiteError: Bad layers. SurgeryError: Head indices out of range.
  """
  mask = index_mask(model, "attn.pattern", [] if heads is None else heads, "heads")
  return sites.insert(
    model,
    "attn.pattern",
    layers,
    lambda layer: KnockOutHeads(
      head_mask=mask, sliding_window=_sliding_window(model, layer)
    ),
  )


def override_pattern(
  model: Any,
  layers: Layers,
  pattern: pz.nx.NamedArray,
  *,
  heads: Indices = None,
) -> Any:
  """Gives chosen heads (default all) a fixed ``{seq, kv_seq}`` pattern.

  Raises:
    SurgeryError: Pattern axes/sizes that don't fit, non-finite values,
      head indices out of range.
  """
  check_value(model, "attn.pattern", pattern, "Pattern", required=("seq", "kv_seq"))
  mask = index_mask(model, "attn.pattern", heads, "heads")
  return sites.insert(
    model,
    "attn.pattern",
    layers,
    lambda _: OverridePattern(pattern=pattern, head_mask=mask),
  )


def rescale_pattern(
  model: Any,
  layers: Layers,
  factors: pz.nx.NamedArray,
  *,
  renormalize: bool = False,
) -> Any:
  """Multiplies the attention pattern by ``{heads}``/``{kv_seq}`` factors.

  Raises:
    SurgeryError: Factor axes/sizes that don't fit, non-finite values.
  """
  check_value(
    model,
    "attn.pattern",
    factors,
    "Pattern factors",
    allowed=("heads", "kv_seq", "batch", "seq"),
  )
  return sites.insert(
    model,
    "attn.pattern",
    layers,
    lambda _: RescalePattern(factors=factors, renormalize=renormalize),
  )


# --- Top-k captures --------------------------------------------------------------


def capture_topk(
  model: Any, site: str, layers: Layers, k: int, *, axis: str | None = None
) -> tuple[Any, Captures]:
  """Inserts `TopKCapture` layers keeping the top ``k`` entries along an axis.

  Args:
    model: The model (not modified).
    site: Site name; ``axis`` defaults to ``neurons`` at ``mlp.hidden``,
      ``kv_seq`` at ``attn.pattern``/``attn.scores``, ``vocabulary`` at
      ``logits``.
    layers: Layer(s) or None (all; ignored at global sites).
    k: Entries kept, ``1 <= k <= size``.
    axis: The reduced axis (one of the site's axes).

  Returns:
    ``(patched_model, captures)``; after a run ``captures[site, layer]`` is
    ``(values, indices)`` with the axis replaced by ``top_k``.
  """
  info = sites.site_info(site)
  axis = axis or _TOPK_AXES.get(site)
  if axis is None or axis not in info.axes:
    raise errors.SiteError(
      f"Top-k at {site!r} needs axis= one of {info.axes}, got {axis!r}."
    )
  sizes, mixed = edit_sizes(model, site, layers_for(site, layers))
  # Gemma 4 layers of different widths: k must fit the narrowest.
  size = min(mixed[axis]) if axis in mixed else sizes.get(axis)
  if isinstance(k, bool) or not isinstance(k, int) or k < 1 or (size and k > size):
    raise errors.SurgeryError(
      f"k={k!r} must be an int in 1..{size or 'kv_seq size'} for {site}/{axis}."
    )
  savers: dict[tuple[str, int | None], TopKCapture] = {}

  def build(layer: int | None) -> TopKCapture:
    savers[site, layer] = TopKCapture.fresh(site, layer, k, axis)
    return savers[site, layer]

  model = sites.insert(model, site, layers_for(site, layers), build)
  return model, Captures(savers, sites.num_layers(model))
