"""Rewrites on Gemma 4 mixture-of-experts layers: ablate experts, force routing.

Both are pure rewrites inserting a small layer at a MoE site
(`gemma_surgery.surgery.sites_gemma4`); expert indices are validated against
the model's ``num_experts`` (JAX would otherwise clamp them silently).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.surgery import sites
from gemma_surgery.surgery.layers.experts import ExpertMask, ForceRouting


def num_experts(model: Any) -> int:
  """Experts per MoE layer, or a `SiteError` for a model without experts."""
  config = getattr(model, "config", None)
  count = getattr(config, "num_experts", 0) if config is not None else 0
  if not count:
    raise errors.SiteError(
      "This model has no mixture-of-experts layers (only Gemma 4 26B-A4B-style"
      " configs with num_experts > 0 do)."
    )
  return count


def expert_mask(model: Any, experts: int | Iterable[int]) -> np.ndarray:
  """``[num_experts]`` bool mask of ``experts``, validated.

  Raises:
    SurgeryError: An index that is not an int in ``0..num_experts-1``, a
      repeated or empty list.
  """
  n = num_experts(model)
  if isinstance(experts, Iterable) and not isinstance(experts, str | bytes):
    items = list(experts)
  else:
    items = [experts]
  if not items:
    raise errors.SurgeryError("Pass at least one expert index.")
  for e in items:
    if isinstance(e, bool) or not isinstance(e, int | np.integer) or not 0 <= e < n:
      raise errors.SurgeryError(
        f"Expert index {e!r} is out of range; valid: 0..{n - 1} (ints)."
      )
  if len(set(int(e) for e in items)) != len(items):
    raise errors.SurgeryError(f"Expert indices {items} name an expert twice.")
  mask = np.zeros(n, bool)
  mask[[int(e) for e in items]] = True
  return mask


def row_mask(model: Any, mask: pz.nx.NamedArray) -> pz.nx.NamedArray:
  """A checked per-row ``{batch, experts}`` ablation mask as float factors.

  Raises:
    SurgeryError: Other axes than ``batch`` and ``experts``, no ``experts``
      axis or one of another size than ``num_experts``, non-bool/0-1 values.
  """
  n = num_experts(model)
  shape = dict(mask.named_shape)
  other = set(shape) - {"batch", "experts"}
  if mask.positional_shape or other or "experts" not in shape:
    raise errors.SurgeryError(
      f"A per-row expert mask has named axes {{batch, experts}}; got"
      f" {shape} (positional {mask.positional_shape})."
    )
  if shape["experts"] != n:
    raise errors.SurgeryError(
      f"The expert mask has experts={shape['experts']}; this model has {n}."
    )
  values = np.asarray(mask.data_array)
  if values.dtype != bool and not np.isin(values, (0, 1)).all():
    raise errors.SurgeryError("An expert mask holds bools (or 0/1): True = ablate.")
  return pz.nx.nmap(lambda m: 1.0 - m.astype(jnp.float32))(mask)


def ablate_experts(
  model: Any,
  layers: int | Iterable[int] | None,
  experts: int | Iterable[int] | pz.nx.NamedArray,
) -> Any:
  """Removes chosen experts' contributions at ``layers`` (routing weight 0).

  Args:
    model: A Gemma 4 MoE model (not modified).
    layers: Layer(s), or None for all.
    experts: Expert index or indices; or a per-row ``{batch, experts}`` bool
      NamedArray (True = ablated in that row; run the model on exactly
      ``batch`` rows), the form `gs.stack_rows` gives a sweep of ablations.

  Raises:
    SiteError: No MoE layers. SurgeryError: bad expert indices or mask.
  """
  if isinstance(experts, pz.nx.NamedArray | pz.nx.NamedArrayView):
    factors = row_mask(model, experts)
  else:
    factors = pz.nx.wrap(jnp.asarray(~expert_mask(model, experts), jnp.float32))
    factors = factors.tag("experts")
  return sites.insert(model, "moe.weights", layers, lambda _: ExpertMask(factors))


def force_routing(
  model: Any, layers: int | Iterable[int] | None, experts: int | Iterable[int]
) -> Any:
  """Routes every token at ``layers`` among ``experts`` only (see `ForceRouting`).

  Raises:
    SiteError: No MoE layers. SurgeryError: bad expert indices.
  """
  allowed = pz.nx.wrap(jnp.asarray(expert_mask(model, experts))).tag("experts")
  return sites.insert(
    model, "moe.router_logits", layers, lambda _: ForceRouting(allowed)
  )
