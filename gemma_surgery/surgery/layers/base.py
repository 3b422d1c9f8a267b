"""Shared pieces of surgery layers.

Every surgery layer derives from `SurgeryLayer`, so ``unpatch`` can find and
remove them all, and records the site it was inserted at (static fields: they
are part of the structure, not array leaves, and never cause recompilation by
changing).

Side inputs read by position-aware layers:
  token_positions: ``{batch, seq}`` int positions (−1 = padding); BOS is the
    token at position 0.
  generation_prompt_end: optional ``{batch}`` or scalar int, set by the fused
    generation loop: tokens at positions ``>= generation_prompt_end`` are
    generated. Without it every token counts as prompt.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery import errors


@pz.pytree_dataclass
class SurgeryLayer(pz.nn.Layer):
  """Base class of gemma_surgery's inserted layers (a type tag)."""


def phase_mask(
  positions: str, side_inputs: dict, like: pz.nx.NamedArray, skip_bos: bool
) -> pz.nx.NamedArray | None:
  """``{batch?, seq}`` bool mask of positions an intervention applies to.

  Returns None when every position applies (no masking needed).
  """
  token_positions = side_inputs.get("token_positions")
  if token_positions is None:
    if positions != "all" or skip_bos:
      raise errors.SurgeryError(
        "Position-dependent interventions need the token_positions side input."
      )
    return None
  mask = token_positions >= 0
  if skip_bos:
    mask = mask & (token_positions != 0)
  if positions == "all":
    return mask
  prompt_end = side_inputs.get("generation_prompt_end")
  if prompt_end is None:
    is_generated = pz.nx.wrap(jnp.zeros((), bool))
  else:
    if not isinstance(prompt_end, pz.nx.NamedArray):
      prompt_end = pz.nx.wrap(jnp.asarray(prompt_end))
    is_generated = token_positions >= prompt_end
  if positions == "prompt":
    return mask & ~is_generated
  if positions == "generated":
    return mask & is_generated
  raise errors.SurgeryError(
    f"positions={positions!r}; valid: 'all', 'prompt', 'generated'."
  )


POSITIONS = ("all", "prompt", "generated")


def static_field(default=dataclasses.MISSING):
  """A static (non-array) dataclass field."""
  if default is dataclasses.MISSING:
    return dataclasses.field(metadata={"pytree_node": False})
  return dataclasses.field(default=default, metadata={"pytree_node": False})


def store(variable: pz.StateVariable, value: Any) -> None:
  """Sets ``variable.value`` to a pytree of arrays a jitted call returned.

  Penzai's setter maps ``jnp.asarray`` over the value, which costs ~0.1 ms
  per leaf even for JAX arrays — noticeable when a fused generation writes
  back many captures. Values that are already JAX arrays (or None) are
  stored as they are (same result, penzai 0.2.5's ``_raw_value`` slot);
  anything else goes through the setter.
  """
  leaves = jax.tree_util.tree_leaves(value)
  if all(isinstance(leaf, jax.Array) for leaf in leaves):
    variable._raw_value = value  # noqa: SLF001 - see docstring
  else:
    variable.value = value


def _is_array(x: Any) -> bool:
  return isinstance(x, pz.nx.NamedArray | pz.nx.NamedArrayView | pz.AbstractVariable)


def check_rows(layer: Any, value: pz.nx.NamedArray) -> None:
  """Raises `SurgeryError` if a layer's per-row edits don't fit the batch.

  Per-row edits are array fields with a ``batch`` axis (see
  `gemma_surgery.surgery.rows`); row ``i`` of the activation gets slice ``i``.
  Called by surgery layers at trace time (static shapes only): every such
  field must match the activation's ``batch`` size.
  """
  have = value.named_shape.get("batch")
  for leaf in jax.tree_util.tree_leaves(layer, is_leaf=_is_array):
    if not isinstance(leaf, pz.nx.NamedArray | pz.nx.NamedArrayView):
      continue
    rows = leaf.named_shape.get("batch")
    if rows is not None and rows != have:
      raise errors.SurgeryError(
        f"{type(layer).__name__} at {getattr(layer, 'site', '?')!r} has per-row"
        f" edits for batch={rows}, but the model runs on batch={have}"
        f" ({dict(value.named_shape)}). Run it on exactly {rows} rows."
      )
