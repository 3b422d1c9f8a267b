"""Checks of user inputs to rewrites, and the sizes of every site's axes.

The one place where the library validates what users pass to a rewrite
(`gemma_surgery.surgery.rewrites`, `gemma_surgery.surgery.interventions`,
`gemma_surgery.sae.splice`): head/neuron/position indices become 0/1 mask
arrays, user NamedArrays are checked against the site's axes and the model's
sizes. All checks run on the host, on concrete values, before anything is
inserted; errors name what was wrong and what would be valid.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import sites

Indices = int | Iterable[int] | None


def site_sizes(model: Any, site: str) -> dict[str, int]:
  """Sizes of the site's user-facing axes known from the model's metadata.

  ``heads`` is ``num_kv_heads`` at ``attn.k``/``attn.v`` and ``num_heads``
  elsewhere; ``kv_seq`` depends on the input and is not included.
  """
  meta = model.metadata
  kv_heads = math.prod(meta.common_head_axes.values())
  q_heads = kv_heads * math.prod(meta.query_only_head_axes.values())
  config = getattr(model, "config", None)
  gemma4 = {}
  if config is not None and config.family == "gemma4":
    gemma4 = {"experts": config.num_experts, "per_layer": config.per_layer_input_dim}
  return {
    **gemma4,
    "embedding": meta.embedding_dim,
    "neurons": meta.mlp_hidden_dim,
    "projection": meta.projection_dim,
    "vocabulary": meta.vocab_size,
    "heads": kv_heads if site in ("attn.k", "attn.v") else q_heads,
  }


def _layer_size(config: Any, site: str, axis: str, layer: int) -> int | None:
  """A Gemma 4 axis size that varies by layer (None: it doesn't)."""
  if axis == "neurons":
    return config.layer_mlp_dim(layer)
  if axis == "projection":
    return config.layer_head_dim(layer)
  if axis == "heads" and site in ("attn.k", "attn.v"):
    return config.layer_kv_heads(layer)
  return None


def edit_sizes(
  model: Any, site: str, layers: Any
) -> tuple[dict[str, int], dict[str, dict[int, list[int]]]]:
  """`site_sizes` at the layers an edit goes to.

  On Gemma 4 the neuron count (double-wide MLPs), head width and kv heads
  differ by layer; here they are those of ``layers`` (None: every layer).

  Returns:
    ``(sizes, mixed)``: ``mixed[axis]`` maps each size of an axis that
    differs among ``layers`` to its layers (that axis is left out of
    ``sizes``).
  """
  sizes = site_sizes(model, site)
  config = getattr(model, "config", None)
  if config is None or config.family != "gemma4" or not sites.site_info(site).per_layer:
    return sizes, {}
  mixed: dict[str, dict[int, list[int]]] = {}
  for axis in list(sizes):
    found: dict[int, list[int]] = {}
    for i in sites.layer_indices(model, layers):
      size = _layer_size(config, site, axis, i)
      if size is not None:
        found.setdefault(size, []).append(i)
    if len(found) == 1:
      sizes[axis] = next(iter(found))
    elif found:
      mixed[axis] = found
      del sizes[axis]
  return sizes, mixed


def _refuse_mixed(site: str, axis: str, mixed: dict[int, list[int]], what: str):
  by_size = "; ".join(f"{size} at layers {ls}" for size, ls in sorted(mixed.items()))
  raise errors.SurgeryError(
    f"{what} needs one {axis} size at {site!r}, but the layers differ ({by_size});"
    " edit layers of one size per call."
  )


def flat_width(model: Any, site: str, layer: int | None = None) -> int:
  """Values per token at ``site`` with its axes flattened (head-major).

  E.g. ``d_model`` at residual sites, ``num_heads * head_dim`` at ``attn.z``
  (the input width of a Gemma Scope attention SAE). On Gemma 4, where the
  neuron count and head width differ by layer, pass ``layer`` to get that
  layer's width (None: the base sizes, as in the model's metadata).

  Raises:
    SiteError: For sites with a ``kv_seq`` axis (their width depends on the
      input length).
  """
  axes = sites.site_info(site).axes
  if "kv_seq" in axes:
    raise errors.SiteError(f"Site {site!r} has no fixed width (kv_seq axis).")
  # edit_sizes gives the base sizes wherever they don't vary by layer.
  if layer is None:
    sizes = site_sizes(model, site)
  else:
    sizes, _ = edit_sizes(model, site, layer)
  return math.prod(sizes[axis] for axis in axes)


def check_finite(name: str, value: Any) -> None:
  """Raises `SurgeryError` if a concrete value has NaN/inf entries.

  Traced values (inside ``jax.jit``) are not checked.
  """
  data = value.data_array if isinstance(value, pz.nx.NamedArray) else value
  if isinstance(data, jax.core.Tracer):
    return
  if not np.all(np.isfinite(to_numpy(data))):
    raise errors.SurgeryError(f"{name} contains NaN or infinite values.")


def check_scalar(name: str, value: Any) -> None:
  """Raises `SurgeryError` unless ``value`` is a finite real scalar.

  Python numbers and 0-d arrays pass; traced values are not checked.
  """
  data = value.data_array if isinstance(value, pz.nx.NamedArray) else value
  if isinstance(data, jax.core.Tracer):
    return
  ok = isinstance(data, int | float | np.number | np.ndarray | jax.Array)
  if ok and not isinstance(data, int | float):
    ok = np.shape(data) == () and np.issubdtype(np.asarray(data).dtype, np.number)
  if isinstance(value, pz.nx.NamedArray | pz.nx.NamedArrayView) or not ok:
    raise errors.SurgeryError(
      f"{name} must be a real number (or 0-d array), got {value!r:.80}."
    )
  check_finite(name, value)


def check_nonzero_norm(name: str, value: pz.nx.NamedArray, axes: Iterable[str]) -> None:
  """Raises `SurgeryError` if any slice of ``value`` has zero norm over ``axes``.

  For values that get normalized (relative steering divides by this norm).
  Traced values are not checked.

  Raises:
    SurgeryError: ``value`` lacks one of ``axes``, or a zero-norm slice.
  """
  axes = tuple(axes)
  missing = [a for a in axes if a not in value.named_shape]
  if missing:
    raise errors.SurgeryError(
      f"{name} is normalized over {list(axes)} but has axes"
      f" {dict(value.named_shape)}: give it the axes {missing}."
    )
  if isinstance(value.data_array, jax.core.Tracer):
    return
  others = [a for a in value.named_shape if a not in axes]
  data = to_numpy(value.unwrap(*others, *axes)).astype(np.float64)
  norms = np.sqrt((data.reshape(*data.shape[: len(others)], -1) ** 2).sum(-1))
  zero = int((norms == 0).sum())
  if zero:
    raise errors.SurgeryError(
      f"{name} has zero norm over {list(axes)}"
      + (f" at {zero} of {norms.size} slices ({others})" if others else "")
      + ": relative steering would divide by zero. Use a nonzero vector."
    )


def layers_for(site: str, layers: Any) -> Any:
  """The layer argument for `sites.insert`: ``layers``, None at global sites.

  Raises:
    SiteError: Layers given for a global site (they would be ignored).
  """
  if sites.site_info(site).per_layer:
    return layers
  if layers is not None:
    raise errors.SiteError(
      f"Site {site!r} is global (one per model): pass layers=None, got {layers!r}."
    )
  return None


def index_mask(
  model: Any, site: str, indices: Indices, axis: str, layers: Any = None
) -> pz.nx.NamedArray | None:
  """A ``{axis}`` 0/1 float mask from indices; None when ``indices`` is None.

  ``layers`` are those the edit goes to (None: all), whose ``axis`` size
  (`edit_sizes`) bounds the indices.

  Raises:
    SiteError: ``axis`` is not an axis of ``site``.
    SurgeryError: Non-integer or out-of-range indices, or ``layers`` that
      differ in the size of ``axis``.
  """
  if indices is None:
    return None
  if axis not in sites.site_info(site).axes:
    where = "a head site (" + ", ".join(sorted(sites.HEAD_SITES)) + ")"
    if axis == "neurons":
      where = "'mlp.hidden'"
    raise errors.SiteError(f"{axis}= needs {where}; site {site!r} has no {axis} axis.")
  sizes, mixed = edit_sizes(model, site, layers)
  if axis in mixed:
    _refuse_mixed(site, axis, mixed[axis], f"{axis}={indices!r}")
  size = sizes[axis]
  items = [indices] if isinstance(indices, int | np.integer) else list(indices)
  for i in items:
    if isinstance(i, bool) or not isinstance(i, int | np.integer):
      raise errors.SurgeryError(f"{axis} indices must be ints, got {i!r}.")
    if not 0 <= i < size:
      raise errors.SurgeryError(
        f"{axis} index {i} is out of range at {site!r}; valid: 0..{size - 1}."
      )
  mask = np.zeros(size, np.float32)
  mask[np.asarray(items, np.int64)] = 1.0
  return pz.nx.wrap(jnp.asarray(mask)).tag(axis)


def check_value(
  model: Any,
  site: str,
  value: Any,
  name: str,
  *,
  allowed: Iterable[str] | None = None,
  required: Iterable[str] = (),
  layers: Any = None,
) -> None:
  """Checks a user NamedArray's type, axes, sizes and finiteness.

  Args:
    model: The model (for axis sizes).
    site: The site the value is used at.
    value: The value.
    name: Its name in messages.
    allowed: Axes it may have; default the site's axes plus batch/seq.
    required: Axes it must have.
    layers: The layers it is used at (None: all), for sizes that differ by
      layer on Gemma 4 (`edit_sizes`).

  Raises:
    SurgeryError: On any mismatch (sizes differing among ``layers`` on an
      axis the value has included), or NaN/inf entries.
  """
  info = sites.site_info(site)
  allowed = set(allowed or (*info.axes, "batch", "seq"))
  if not isinstance(value, pz.nx.NamedArray | pz.nx.NamedArrayView):
    raise errors.SurgeryError(
      f"{name} must be a NamedArray over {sorted(allowed)}, got"
      f" {type(value).__name__} (e.g. pz.nx.wrap(v).tag('embedding'))."
    )
  axes = set(value.named_shape)
  if value.positional_shape or not axes <= allowed or not set(required) <= axes:
    raise errors.SurgeryError(
      f"{name} has axes {dict(value.named_shape)} (positional"
      f" {value.positional_shape}); site {site!r} takes axes among"
      f" {sorted(allowed)}, including {sorted(required)}."
    )
  sizes, mixed = edit_sizes(model, site, layers)
  for axis, size in value.named_shape.items():
    if axis in mixed:
      _refuse_mixed(site, axis, mixed[axis], name)
    if axis in sizes and sizes[axis] != size:
      raise errors.SurgeryError(
        f"{name} has {axis}={size}; the model has {axis}={sizes[axis]} at {site!r}."
      )
  check_finite(name, value)


def seq_index_mask(
  positions: Any, sizes: Mapping[str, int], name: str = "Positions mask"
) -> pz.nx.NamedArray | None:
  """A ``{batch?, seq}`` 0/1 float mask from seq indices or a mask NamedArray.

  Args:
    positions: None (every position), seq indices, or a ``{seq}`` /
      ``{batch, seq}`` NamedArray of bools (or of 0/1 numbers).
    sizes: Known axis sizes, e.g. the ``named_shape`` of the value the mask
      goes with: its ``seq`` size bounds indices, and a mask's ``batch``/
      ``seq`` sizes must match the ones given here.
    name: What the mask is called in messages.

  Returns:
    None, or a float ``{batch?, seq}`` NamedArray of 0/1.

  Raises:
    SurgeryError: Other axes, positional axes, entries other than 0/1,
      sizes that differ from ``sizes``, indices out of range or without a
      known ``seq`` size.
  """
  if positions is None:
    return None
  if isinstance(positions, pz.nx.NamedArray | pz.nx.NamedArrayView):
    axes = dict(positions.named_shape)
    if (
      positions.positional_shape
      or "seq" not in axes
      or not set(axes)
      <= {
        "batch",
        "seq",
      }
    ):
      raise errors.SurgeryError(
        f"{name} must have axes {{seq}} or {{batch, seq}} (and no positional"
        f" axes), got {axes} (positional {positions.positional_shape})."
      )
    for axis, size in axes.items():
      if axis in sizes and sizes[axis] != size:
        raise errors.SurgeryError(
          f"{name} has {axis}={size}, but {axis}={sizes[axis]} is needed here."
        )
    dtype = positions.dtype
    if not (jnp.issubdtype(dtype, jnp.bool_) or jnp.issubdtype(dtype, jnp.number)):
      raise errors.SurgeryError(f"{name} must hold bools (or 0/1), got {dtype}.")
    data = positions.data_array
    if not isinstance(data, jax.core.Tracer) and dtype != jnp.bool_:
      entries = to_numpy(data)
      if not np.all((entries == 0) | (entries == 1)):
        raise errors.SurgeryError(
          f"{name} must hold bools or 0/1, got other values (e.g."
          f" {entries[(entries != 0) & (entries != 1)].flat[0]!r})."
        )
    return positions.astype(jnp.float32)
  if "seq" not in sizes:
    raise errors.SurgeryError(
      f"{name}: seq indices need a known seq length here; pass a {{seq}} bool"
      " NamedArray instead."
    )
  seq = sizes["seq"]
  if isinstance(positions, str) or not isinstance(
    positions, int | np.integer | Iterable
  ):
    raise errors.SurgeryError(
      f"{name} must be seq indices or a {{batch?, seq}} bool NamedArray, got"
      f" {type(positions).__name__}."
    )
  items = [positions] if isinstance(positions, int | np.integer) else list(positions)
  for p in items:
    if isinstance(p, bool) or not isinstance(p, int | np.integer) or not 0 <= p < seq:
      raise errors.SurgeryError(
        f"Position {p!r} is not a valid seq index; valid: 0..{seq - 1}."
      )
  mask = np.zeros(seq, np.float32)
  mask[np.asarray(items, np.int64)] = 1.0
  return pz.nx.wrap(jnp.asarray(mask)).tag("seq")
