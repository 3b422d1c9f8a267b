"""Ablation and activation patching: `Ablate` and `Patch`.

Both replace (part of) the activation at a site by another value. The part is
chosen by optional 0/1 masks over heads (head sites), neurons
(``mlp.hidden``) and positions; the masks are array leaves, so changing which
heads are ablated does not change the model's structure.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.surgery import heads
from gemma_surgery.surgery.layers import base

ABLATE_MODES = ("zero", "mean", "value")


def replace_where(
  site: str,
  x: pz.nx.NamedArray,
  replacement: pz.nx.NamedArray,
  masks: tuple[pz.nx.NamedArray | None, ...],
) -> pz.nx.NamedArray:
  """``replacement`` where every given mask is nonzero, else ``x``.

  Args:
    site: Site name (masks with a ``heads`` axis are converted to the native
      head layout of ``x``).
    x: The activation.
    replacement: Broadcastable to ``x``.
    masks: User-facing masks (``{heads}``, ``{neurons}``, ``{batch?, seq}``…);
      None entries are ignored. No masks: replace everywhere.
  """
  replacement = replacement.astype(x.dtype)
  select = None
  for mask in masks:
    if mask is None:
      continue
    native = heads.native_value(site, mask, x) != 0
    select = native if select is None else select & native
  if select is None:
    return replacement + pz.nx.zeros(x.named_shape, x.dtype)
  # Keep x's storage layout: a no-op replacement must leave downstream
  # contractions (and their float32 summation order) unchanged.
  return pz.nx.nmap(jnp.where)(select, replacement, x).order_like(x)


@pz.pytree_dataclass
class Ablate(base.SurgeryLayer):
  """Replaces the activation (or chosen heads/neurons of it) by a constant.

  Modes: ``"zero"``; ``"mean"``, the mean of the activation itself over
  ``mean_axes`` (default ``batch`` and ``seq``; padding positions, where the
  ``token_positions`` side input is −1, are left out of a mean over ``seq``);
  ``"value"``, a given NamedArray broadcast over the missing axes. Under KV
  caching a mean over ``seq`` sees only the current step's tokens.

  Side inputs: ``token_positions`` (``{batch, seq}``; optional).

  Attributes:
    value: For ``mode="value"``: NamedArray over a subset of the site's
      user-facing axes (one ``heads`` axis at head sites) plus batch/seq.
    head_mask: Optional ``{heads}`` 0/1 float array: ablate heads where 1.
    neuron_mask: Optional ``{neurons}`` 0/1 float array (``mlp.hidden``).
    site: Site name (static).
    mode: ``"zero"``, ``"mean"`` or ``"value"`` (static).
    mean_axes: Axes averaged over in ``"mean"`` mode (static).
  """

  value: pz.nx.NamedArray | None = None
  head_mask: pz.nx.NamedArray | None = None
  neuron_mask: pz.nx.NamedArray | None = None
  site: str = base.static_field("resid_post")
  mode: str = base.static_field("zero")
  mean_axes: tuple[str, ...] = base.static_field(("batch", "seq"))

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> Any:
    base.check_rows(self, x)
    if self.mode == "zero":
      replacement = pz.nx.wrap(jnp.zeros((), x.dtype))
    elif self.mode == "mean":
      replacement = _mean(x, self.mean_axes, side_inputs.get("token_positions"))
    elif self.mode == "value":
      replacement = heads.native_value(self.site, self.value, x)
    else:
      raise errors.SurgeryError(f"mode={self.mode!r}; valid: {ABLATE_MODES}.")
    return replace_where(self.site, x, replacement, (self.head_mask, self.neuron_mask))

  def treescope_color(self) -> str:
    return "#e36d6d"


def _mean(
  x: pz.nx.NamedArray, axes: tuple[str, ...], token_positions: Any
) -> pz.nx.NamedArray:
  """Mean of ``x`` over ``axes``, ignoring padding positions along ``seq``."""
  axes = tuple(a for a in axes if a in x.named_shape)
  if not axes:
    return x
  if token_positions is not None and "seq" in axes:
    weight = (token_positions >= 0).astype(x.dtype)
    weight = weight + pz.nx.zeros({a: x.named_shape[a] for a in axes}, x.dtype)
  else:
    weight = pz.nx.ones({a: x.named_shape[a] for a in axes}, x.dtype)
  total = pz.nx.nmap(jnp.sum)((x * weight).untag(*axes))
  count = pz.nx.nmap(jnp.sum)(weight.untag(*axes))
  return total / pz.nx.nmap(jnp.maximum)(count, 1.0)


@pz.pytree_dataclass
class Patch(base.SurgeryLayer):
  """Replaces the activation by a stored one, optionally at chosen places.

  Typically the stored value was captured with `gemma_surgery.capture` on
  another prompt of the same length (activation patching).

  Attributes:
    value: The replacement in user-facing axes, e.g. ``{batch, seq,
      embedding}`` at residual sites or ``{batch, seq, heads, projection}`` at
      ``attn.z``; missing axes broadcast.
    seq_mask: Optional ``{seq}`` or ``{batch, seq}`` bool: patch there.
    head_mask: Optional ``{heads}`` 0/1 float array (head sites).
    site: Site name (static).
  """

  value: pz.nx.NamedArray
  seq_mask: pz.nx.NamedArray | None = None
  head_mask: pz.nx.NamedArray | None = None
  site: str = base.static_field("resid_post")

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> Any:
    base.check_rows(self, x)
    value = heads.native_value(self.site, self.value, x)
    return replace_where(self.site, x, value, (self.seq_mask, self.head_mask))

  def treescope_color(self) -> str:
    return "#6d9de3"
