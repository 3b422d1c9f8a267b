"""AtP*'s QK fix: exact attention-pattern changes for query and key patches.

Patching a query or key changes the metric only through the attention
pattern, and the softmax between them saturates, where a linear estimate
fails (Kramár et al. 2024, "AtP*", section 3.1.1). The fix recomputes the
pattern exactly — with the model's own attention sublayers: query scaling,
score einsum, soft cap, causal/sliding mask and softmax — and linearises only
from the pattern onwards:

    effect ≈ Σ dM/dP · (P(q', k') − P(q, k))

A query patch changes one row of one head's pattern, so one call gives every
(position, head) query patch. A key patch at one position changes a column,
and the softmax renormalises the row, so the key patches of the positions run
vmapped, one pattern each.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from gemma_surgery import errors
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import heads

QK_SITES = ("attn.q", "attn.k")
UNSUPPORTED = (
  "atp* at attn.k by head_position is not supported: use by='position' or by='head'."
)
_ATTENTION_TYPES = (pz.nn.Attention, pz.nn.KVCachingAttention)
_HEAD_AXES = ("heads", "head_groups", "query_heads")


def attention_of(model: Any, layer: int) -> Any:
  """The attention layer of block ``layer`` (parameters frozen)."""
  blocks = pz.select(model).at_instances_of(model_parts.TransformerBlock)
  block = blocks.pick_nth_selected(layer).get()
  found = pz.select(block).at_instances_of(_ATTENTION_TYPES).get_sequence()
  if len(found) != 1:
    raise errors.SiteError(f"Block {layer} should hold one attention layer.")
  return pz.freeze_params(found[0])


def _native_heads(projection: Any) -> dict[str, int]:
  linear = pz.select(projection).at_instances_of(pz.nn.Linear).get_sequence()[0]
  shape = linear.weights.value.named_shape
  return {a: n for a, n in shape.items() if a in _HEAD_AXES}


def _after_rope(projection: Any) -> list[Any]:
  layers = list(projection.sublayers)
  at = [i for i, x in enumerate(layers) if isinstance(x, pz.nn.ApplyRoPE)]
  if len(at) != 1:
    raise errors.SiteError("Expected one RoPE layer in a query/key projection.")
  return layers[at[0] + 1 :]


def pattern(attn: Any, q: pz.nx.NamedArray, k: pz.nx.NamedArray) -> pz.nx.NamedArray:
  """The attention pattern (user heads) of ``attn`` for ``attn.q``/``attn.k``
  values ``q`` ``{batch, seq, heads, projection}`` and ``k`` (kv heads)."""
  q = heads.to_native_heads(q, _native_heads(attn.input_to_query))
  k = heads.to_native_heads(k, _native_heads(attn.input_to_key))
  side = {
    "token_positions": pz.nx.wrap(
      jnp.broadcast_to(
        jnp.arange(q.named_shape["seq"]),
        (q.named_shape["batch"], q.named_shape["seq"]),
      )
    ).tag("batch", "seq")
  }
  for layer in _after_rope(attn.input_to_query):
    q = layer(q, **side)
  for layer in _after_rope(attn.input_to_key):
    k = layer(k, **side)
  return heads.to_user_heads(attn.query_key_to_attn((q, k), **side))


def _sum_keep(x: pz.nx.NamedArray, keep: tuple[str, ...]) -> pz.nx.NamedArray:
  drop = [a for a in x.named_shape if a not in keep]
  return pz.nx.nmap(jnp.sum)(x.untag(*drop))


@functools.partial(jax.jit, static_argnums=0)
def _effects(site: str, attn, q, k, base_pattern, grad) -> pz.nx.NamedArray:
  """``{seq, heads}`` effects summed over the batch.

  ``attn.q``: one query (position, head) patched at a time. ``attn.k``: all
  kv heads' keys at one key position patched at a time (``seq`` = that
  position), per query head.
  """
  q_clean, q_bad = q
  k_clean, k_bad = k
  if site == "attn.q":
    change = (pattern(attn, q_clean, k_bad) - base_pattern) * grad
    return _sum_keep(change, ("seq", "heads"))
  seq = k_bad.named_shape["seq"]

  def one(t):
    at = pz.nx.wrap(jnp.arange(seq) == t).tag("seq")
    patched = pz.nx.nmap(jnp.where)(at, k_clean, k_bad)
    change = (pattern(attn, q_bad, patched) - base_pattern) * grad
    return _sum_keep(change, ("heads",)).unwrap("heads")

  return pz.nx.wrap(jax.vmap(one)(jnp.arange(seq))).tag("seq", "heads")


def pattern_effects(
  model: Any,
  layer: int,
  site: str,
  by: str,
  q: tuple[pz.nx.NamedArray, pz.nx.NamedArray],
  k: tuple[pz.nx.NamedArray, pz.nx.NamedArray],
  base_pattern: pz.nx.NamedArray,
  grad: pz.nx.NamedArray,
) -> np.ndarray:
  """QK-fixed AtP effects of patching clean queries or keys into a run.

  Args:
    model: The model (its attention at ``layer`` computes the patterns).
    layer: The layer.
    site: ``"attn.q"`` or ``"attn.k"``.
    by: ``"position"``, ``"head"`` or ``"head_position"``.
    q: ``(clean, corrupted)`` ``attn.q`` values ``{batch, seq, heads,
      projection}``.
    k: ``(clean, corrupted)`` ``attn.k`` values (kv heads).
    base_pattern: The corrupted run's ``attn.pattern``.
    grad: dM/d pattern on the corrupted run.

  Returns:
    ``[seq]``, ``[heads]`` or ``[seq, heads]`` effects, mean over the batch
    (key sites: kv heads; key positions).

  Raises:
    SiteError: Another site.
    InputError: ``attn.k`` by ``head_position`` (not supported).
  """
  if site not in QK_SITES:
    raise errors.SiteError(f"The QK fix applies at {QK_SITES}; got {site!r}.")
  if site == "attn.k" and by == "head_position":
    raise errors.InputError(UNSUPPORTED)
  attn = attention_of(model, layer)
  batch = grad.named_shape["batch"]
  if site == "attn.k" and by == "head":
    per_query = to_numpy(_key_heads_change(attn, q[1], k[0], base_pattern, grad))
    kv = k[1].named_shape["heads"]
    return per_query.reshape(kv, -1).sum(1) / batch
  per = _effects(site, attn, q, k, base_pattern, grad)
  per = to_numpy(per.unwrap("seq", "heads")) / batch
  if by == "position":
    return per.sum(1)
  if by == "head":
    return per.sum(0)
  return per


@jax.jit
def _key_heads_change(attn, q_bad, k_clean, base_pattern, grad):
  change = (pattern(attn, q_bad, k_clean) - base_pattern) * grad
  return _sum_keep(change, ("heads",)).unwrap("heads")
