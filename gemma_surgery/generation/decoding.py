"""The fused decode loop: one ``jax.jit`` over prefill and every decoding step.

`gemma_surgery.generation.prepared.Prepared` converts a (possibly patched)
model to Penzai's ``KVCachingTransformerLM`` once, unbinds *all* variables
(parameters and state) and flattens the result into a static tree structure
plus a list of array leaves. `decode` receives only those leaves; the
structure is a static argument with a precomputed hash (`Structure`). So

* parameters are frozen values, not mutable ``Parameter`` objects threaded
  through each call (they are re-read from the model's ``Parameter`` objects
  on every call, by identity, so in-place updates are seen);
* steering vectors, scales and masks are ordinary leaves: changing them never
  recompiles, while a structural change (another layer, another site) gives a
  new structure and a new compile;
* a repeated call on the same model costs a cache lookup and a dispatch with
  a flat list of arrays, not a walk over the model's pytree.

Inside `decode` the prompt runs through the model with its `SaveIntermediate`
layers, their values become fixed ``{batch, seq: cache_len, ...}`` buffers
(`gemma_surgery.surgery.layers.buffer`), and a ``lax.while_loop`` feeds back
one token per step through the same model with `CaptureBuffer` layers until
every row has emitted EOS or ``max_new_tokens`` tokens exist. Every call
receives the side input ``generation_prompt_end`` (``{batch}`` int: the number
of non-pad prompt tokens), so layers know which positions are generated.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery.generation import sampling, state
from gemma_surgery.generation.prepared import (
  Prepared,
  Structure,
  conversion_count,
  prepare,
)
from gemma_surgery.parallel import sharding
from gemma_surgery.surgery.layers import buffer

__all__ = [
  "Prepared",
  "Structure",
  "conversion_count",
  "decode",
  "prepare",
  "step_functions",
  "trace_count",
]

_TRACES = 0


def trace_count() -> int:
  """How many times the decode loop has been traced (= compiled) so far."""
  return _TRACES


def _constrain(array: pz.nx.NamedArray, structure: Structure) -> pz.nx.NamedArray:
  if structure.mesh is None:
    return array
  spec = sharding.named_sharding(array, structure.mesh, structure.rules)
  return jax.tree_util.tree_map(
    lambda x: jax.lax.with_sharding_constraint(x, spec), array
  )


def step_functions(
  controls: dict[str, jax.Array],
  prompt_end: jax.Array,
  batch: int,
  mode: sampling.SamplingMode,
) -> tuple[Any, Any]:
  """The two steps every decode loop takes (called while tracing).

  Returns:
    ``run(tree, values, tokens) -> (logits, values)``: binds the variable
    values to the unbound ``tree``, runs ``{batch, seq}`` ``tokens`` with the
    side input ``generation_prompt_end`` and freezes the variables again;
    ``choose(logits, rng) -> (token [batch], rng)``: picks the next tokens
    from ``{batch, vocabulary}`` logits (see `sampling.choose_tokens`).
  """
  side = {"generation_prompt_end": pz.nx.wrap(prompt_end).tag("batch")}

  def run(tree, values, tokens):
    bound = [
      v.unfreeze_as_copy() if isinstance(v, pz.StateVariableValue) else v
      for v in values
    ]
    logits = pz.bind_variables(tree, bound)(
      pz.nx.wrap(tokens).tag("batch", "seq"), **side
    )
    return logits, [v.freeze() if isinstance(v, pz.StateVariable) else v for v in bound]

  def choose(logits, rng):
    token, rng = sampling.choose_tokens(
      logits,
      rng,
      mode,
      temperature=controls["temperature"],
      top_k=controls["top_k"],
      top_p=controls["top_p"],
      batch_axes={"batch": batch},
    )
    return token.unwrap("batch"), rng

  return run, choose


@functools.partial(
  jax.jit, static_argnames=("structure", "max_new_tokens", "mode", "return_logits")
)
def decode(
  structure: Structure,
  leaves: list[Any],
  prompt: jax.Array,
  prompt_end: jax.Array,
  controls: dict[str, jax.Array],
  rng: jax.Array,
  *,
  max_new_tokens: int,
  mode: sampling.SamplingMode,
  return_logits: bool = False,
) -> dict[str, Any]:
  """Prefill plus a ``while_loop`` of decoding steps (see module docstring).

  Args:
    structure: Static structure of the prepared model.
    leaves: Its array leaves (`Prepared.current_leaves`).
    prompt: ``[batch, seq]`` int32, left padding marked `PAD_MARK`.
    prompt_end: ``[batch]`` int32 non-pad prompt tokens per row.
    controls: Scalars ``eos`` (−1: none), ``pad``, ``temperature``,
      ``top_k``, ``top_p``.
    rng: PRNG key (split per step as in `sampling`).
    max_new_tokens: Tokens to emit per row (static).
    mode: Greedy or sampling (static).
    return_logits: Also return the logits each new token was chosen from.

  Returns:
    ``tokens`` ``[batch, max_new_tokens]``, ``lengths`` ``[batch]`` (tokens
    up to and including EOS), ``cache_end`` (filled cache slots), ``captures``
    (buffers in `Structure.saver_keys` order), ``user_state`` (final values),
    ``prefill_state`` (values after the prompt of state whose shape settles
    only after a step, by position in ``user_state``) and ``stepped``
    (whether a step ran after the prompt), ``logits`` (``[batch,
    max_new_tokens, vocabulary]`` or None).

  Raises:
    SurgeryError: (when traced) state of the model that changes shape at every
      decoding step.
  """
  global _TRACES
  _TRACES += 1
  unbound, values = jax.tree_util.tree_unflatten(structure.treedef, leaves)
  values = list(values)
  batch, n_new = prompt.shape[0], max_new_tokens
  run, choose = step_functions(controls, prompt_end, batch, mode)
  pad, eos = controls["pad"], controls["eos"]

  logits, values = run(unbound, values, prompt)
  for i in structure.saver_index:
    buf = buffer.new_buffers(values[i].value, unbound.cache_len)
    buf = jax.tree_util.tree_map(
      lambda b: _constrain(b, structure), buf, is_leaf=buffer.is_named
    )
    values[i] = dataclasses.replace(values[i], value=buf)
  decoding = buffer.to_buffers(unbound)

  last_logits = logits[{"seq": -1}]
  first, rng = choose(last_logits, rng)
  out = jnp.full((batch, n_new), pad, jnp.int32).at[:, 0].set(first)
  done = first == eos
  lengths = jnp.where(done, 1, n_new).astype(jnp.int32)
  kept = None
  if return_logits:
    step = last_logits.unwrap("batch", "vocabulary")
    kept = jnp.zeros((batch, n_new, step.shape[-1]), step.dtype).at[:, 0].set(step)

  def cond(carry):
    return (carry[0] < n_new) & ~jnp.all(carry[4])

  def body(carry):
    i, values, prev, out, done, lengths, rng, kept = carry
    logits, values = run(decoding, values, prev[:, None])
    step = logits[{"seq": 0}]
    token, rng = choose(step, rng)
    token = jnp.where(done, pad, token)
    out = jax.lax.dynamic_update_slice(out, token[:, None], (jnp.zeros_like(i), i))
    if kept is not None:
      update = step.unwrap("batch", "vocabulary")[:, None].astype(kept.dtype)
      zero = jnp.zeros_like(i)
      kept = jax.lax.dynamic_update_slice(kept, update, (zero, i, zero))
    newly = ~done & (token == eos)
    lengths = jnp.where(newly, i + 1, lengths)
    return i + 1, values, token, out, done | newly, lengths, rng, kept

  carry = (jnp.int32(1), values, first, out, done, lengths, rng, kept)
  prefill_state, stepped = {}, jnp.bool_(True)
  if n_new > 1:
    carry, prefill_state, stepped = state.settle(
      structure.user_state_index, structure.user_state_names, cond, body, carry
    )
    carry = jax.lax.while_loop(cond, body, carry)
  _, values, last, out, _, lengths, _, kept = carry
  if structure.saver_index:
    # Run the last token too, so captures cover every emitted token.
    values = state.one_more_step(
      lambda v: run(decoding, v, last[:, None])[1], values, prefill_state, stepped
    )
    prefill_state, stepped = {}, jnp.bool_(True)
  return {
    "tokens": out,
    "lengths": lengths,
    "cache_end": values[structure.end_index].value,
    "captures": [values[i].value for i in structure.saver_index],
    "user_state": [values[i] for i in structure.user_state_index],
    "prefill_state": {
      structure.user_state_index.index(i): v for i, v in prefill_state.items()
    },
    "stepped": stepped,
    "logits": kept,
  }
