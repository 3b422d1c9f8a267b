"""The replacement model as an affine function, for autodiff.

    reads = linear_reads(rep)
    mlp_in, logits = reads(embed_delta, mlp_out)   # [L, seq, d], [vocab]

``reads(e, v)`` runs `Replacement.model` with ``e`` added to the embedding
(``[seq, d]``) and ``v[k]`` written at layer ``k``'s ``mlp.out`` (``[L, seq,
d]``, replacing the recorded decoded features + error; the affine skip stays
live), and returns every layer's ``mlp.in`` and the last position's logits.
With the recorded pattern and norm scales it is linear in ``(e, v)`` plus
the embedding itself: ``jax.vjp`` of it gives the gradient of any target at
every ``mlp.out`` and at the embedding, which is what attribution edges are
made of. ``dtype=jnp.float64`` (inside ``jax.enable_x64()``)
runs it in double precision.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery.circuits.replacement import AddInput, ReplacedMLPOut, Replacement
from gemma_surgery.surgery import sites
from gemma_surgery.surgery.layers.capture import SaveIntermediate


def _cast(tree: Any, dtype: Any) -> Any:
  def cast(x: Any) -> Any:
    if isinstance(x, jax.Array | jnp.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  return jax.tree_util.tree_map(cast, tree)


@dataclasses.dataclass(frozen=True)
class ReadsSpec:
  """The static part of `frozen_reads` (hashable: a jit static argument).

  Attributes:
    n_vars: State variables of the unbound model (labelled ``reads/0..``).
    read_at: Which of them hold the wanted sites, in ``wanted`` order.
  """

  n_vars: int
  read_at: tuple[int, ...]


def frozen_reads(
  rep: Replacement, wanted: list[tuple[str, int]], dtype: Any = jnp.float32
) -> tuple[ReadsSpec, Any]:
  """``(spec, arrays)`` for `apply_reads`: the replacement with savers at
  ``wanted`` ``(site, layer)`` pairs, its parameters frozen (cast to
  ``dtype``), and its state variables relabelled canonically, so that two
  prompts of one length give the same pytree structure (one compile)."""
  savers = {}

  def saver(site: str, i: int) -> SaveIntermediate:
    savers[site, i] = SaveIntermediate.fresh(site, i)
    return savers[site, i]

  model = rep.model
  for site, layer in wanted:
    model = sites.insert(model, site, layer, lambda i, site=site: saver(site, i))
  unbound, variables = pz.unbind_state_vars(model)
  labels = [v.label for v in variables]
  canon = {label: f"reads/{j}" for j, label in enumerate(labels)}
  unbound = (
    pz.select(unbound)
    .at_instances_of(pz.StateVariableSlot)
    .apply(lambda slot: pz.StateVariableSlot(label=canon[slot.label]))
  )
  frozen = _cast(pz.freeze_params(unbound), dtype)
  read_at = tuple(labels.index(savers[key].saved.label) for key in wanted)
  return ReadsSpec(len(labels), read_at), (frozen, rep.tokens)


def apply_reads(
  spec: ReadsSpec, arrays: Any, embed_delta: jax.Array, mlp_out: jax.Array
) -> tuple[list[pz.nx.NamedArray], jax.Array]:
  """``(values, last logits)`` of the replacement given by `frozen_reads`
  with ``embed_delta`` (``[seq, d]``) added to the embedding and ``mlp_out``
  (``[L, seq, d]``) written at every ``mlp.out`` (a pure function of its
  array arguments: jit it with ``spec`` static)."""
  frozen, tokens = arrays

  def set_delta(layer: AddInput) -> AddInput:
    delta = pz.nx.wrap(embed_delta[None]).tag("batch", "seq", "embedding")
    return dataclasses.replace(layer, delta=delta)

  def set_value(layer: ReplacedMLPOut) -> ReplacedMLPOut:
    value = pz.nx.wrap(mlp_out[layer.layer][None]).tag("batch", "seq", "embedding")
    return dataclasses.replace(layer, value=value)

  m = pz.select(frozen).at_instances_of(AddInput).apply(set_delta)
  m = pz.select(m).at_instances_of(ReplacedMLPOut).apply(set_value)
  bound_vars = [
    pz.StateVariableValue(value=None, label=f"reads/{j}").unfreeze_as_copy()
    for j in range(spec.n_vars)
  ]
  logits = pz.bind_variables(m, bound_vars)(tokens)
  values = [bound_vars[j].value[{"batch": 0}] for j in spec.read_at]
  last = logits.unwrap("batch", "seq", "vocabulary")[0, -1]
  return values, last


def site_reads(
  rep: Replacement, wanted: list[tuple[str, int]], dtype: Any = jnp.float32
) -> Callable[[jax.Array, jax.Array], tuple[list[pz.nx.NamedArray], jax.Array]]:
  """``(embed_delta [seq, d], mlp_out [L, seq, d]) -> (values, last logits)``:
  the replacement's activations at ``wanted`` ``(site, layer)`` pairs (one
  `NamedArray` each, batch row 0) and its last position's logits."""
  spec, arrays = frozen_reads(rep, wanted, dtype)
  return functools.partial(apply_reads, spec, arrays)


def linear_reads(
  rep: Replacement, dtype: Any = jnp.float32
) -> Callable[[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
  """``(embed_delta [seq, d], mlp_out [L, seq, d]) -> (mlp_in [L, seq, d],
  last logits [vocab])`` of the replacement (see module doc)."""
  wanted = [("mlp.in", i) for i in range(rep.num_layers)]
  inner = site_reads(rep, wanted, dtype)

  def reads(embed_delta: jax.Array, mlp_out: jax.Array) -> tuple:
    values, last = inner(embed_delta, mlp_out)
    return jnp.stack([v.unwrap("seq", "embedding") for v in values]), last

  return reads
