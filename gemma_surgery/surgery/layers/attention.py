"""Attention-pattern interceptors at ``attn.pattern``.

`KnockOutHeads` sends chosen heads' attention entirely to the BOS key,
`OverridePattern` gives chosen heads a fixed pattern and `RescalePattern`
reweights the pattern. All act on the softmax output, before it mixes the
values, and work uncached and under Penzai's KV caching (where the pattern's
``kv_seq`` axis spans the whole cache).

Side inputs: ``token_positions`` (``{batch, seq}`` query positions, −1 =
padding) and, under KV caching, ``kv_token_positions`` (``{batch, seq}`` over
the cache slots; unwritten slots are −1).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.surgery import heads
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.ablate import replace_where


def bos_pattern(side_inputs: dict, sliding_window: int | None) -> pz.nx.NamedArray:
  """``{batch?, seq, kv_seq}`` pattern putting all weight on the BOS key.

  The BOS key is the key at position 0, so it is found correctly with left
  padding and in a KV cache. Rows whose query cannot see it (padding queries,
  or queries beyond a sliding window) are all zeros.
  """
  q_pos = side_inputs.get("token_positions")
  if q_pos is None:
    raise errors.SurgeryError(
      "Knocking out heads needs the token_positions side input."
    )
  kv_pos = side_inputs.get("kv_token_positions")
  if kv_pos is None:
    kv_pos = q_pos
  kv_pos = kv_pos.untag("seq").tag("kv_seq")
  visible = q_pos >= 0
  if sliding_window is not None:
    visible = visible & (q_pos < sliding_window)
  return ((kv_pos == 0) & visible).astype(jnp.float32)


@pz.pytree_dataclass
class KnockOutHeads(base.SurgeryLayer):
  """Replaces masked heads' pattern rows by all attention on the BOS key.

  Attributes:
    head_mask: ``{heads}`` 0/1 float array: knock out heads where 1.
    site: Site name (static; ``attn.pattern``).
    sliding_window: The layer's sliding window, or None for global layers
      (static): a query beyond the window cannot see BOS and gets zeros.
  """

  head_mask: pz.nx.NamedArray
  site: str = base.static_field("attn.pattern")
  sliding_window: int | None = base.static_field(None)

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> Any:
    base.check_rows(self, x)
    target = bos_pattern(side_inputs, self.sliding_window)
    return replace_where(self.site, x, target, (self.head_mask,))

  def treescope_color(self) -> str:
    return "#e3a86d"


@pz.pytree_dataclass
class OverridePattern(base.SurgeryLayer):
  """Gives chosen heads a fixed attention pattern.

  Attributes:
    pattern: ``{seq, kv_seq}`` array (optionally also ``batch``/``heads``).
    head_mask: Optional ``{heads}`` 0/1 float array; None = all heads.
    site: Site name (static; ``attn.pattern``).
  """

  pattern: pz.nx.NamedArray
  head_mask: pz.nx.NamedArray | None = None
  site: str = base.static_field("attn.pattern")

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> Any:
    base.check_rows(self, x)
    pattern = heads.native_value(self.site, self.pattern, x)
    return replace_where(self.site, x, pattern, (self.head_mask,))

  def treescope_color(self) -> str:
    return "#e3a86d"


@pz.pytree_dataclass
class RescalePattern(base.SurgeryLayer):
  """Multiplies the pattern by factors, optionally renormalising rows.

  Attributes:
    factors: NamedArray over a subset of ``heads``, ``kv_seq`` (and
      ``batch``/``seq``), e.g. ``{heads}`` to damp heads or ``{kv_seq}`` to
      reweight keys.
    site: Site name (static; ``attn.pattern``).
    renormalize: Divide each row by its sum over ``kv_seq`` afterwards (rows
      summing to zero stay zero) (static).
  """

  factors: pz.nx.NamedArray
  site: str = base.static_field("attn.pattern")
  renormalize: bool = base.static_field(False)

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> Any:
    base.check_rows(self, x)
    out = x * heads.native_value(self.site, self.factors, x).astype(x.dtype)
    if self.renormalize:
      total = pz.nx.nmap(jnp.sum)(out.untag("kv_seq"))
      safe = pz.nx.nmap(jnp.where)(total == 0, 1.0, total).astype(x.dtype)
      out = out / safe
    return out

  def treescope_color(self) -> str:
    return "#e3a86d"
