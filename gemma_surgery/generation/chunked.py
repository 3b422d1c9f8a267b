"""The decode loop in chunks: prefill once, then a few steps per call.

`start` runs the prompt and chooses the first token; `advance` continues
the same ``lax.while_loop`` as `gemma_surgery.generation.decoding.decode` up
to a step number ``until`` given as an *array* argument, so every chunk of
every call reuses one compilation (the chunk length never appears in a
static argument). Between chunks the loop's carry (the KV caches and cache
index, the tokens so far, the finished rows and the PRNG key) stays on the
device; it is donated to `advance`, so the caches are updated in place.
Parameters and edit leaves are passed again on every call (never copied).

Each chunk runs the same step function as the fused loop, so the tokens are
the fused loop's tokens (`gemma_surgery.generation.streams.stream` shows
them as they come). Models with capture layers or their own state variables
are not supported here (`stream` refuses them).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery.generation import sampling
from gemma_surgery.generation.decoding import step_functions
from gemma_surgery.generation.prepared import Structure

__all__ = ["advance", "start", "trace_counts"]

_TRACES = {"start": 0, "advance": 0}


def trace_counts() -> dict[str, int]:
  """How many times `start` and `advance` have been traced (= compiled)."""
  return dict(_TRACES)


def _state_positions(values: list[Any]) -> list[int]:
  return [i for i, v in enumerate(values) if isinstance(v, pz.StateVariableValue)]


@functools.partial(jax.jit, static_argnames=("structure", "max_new_tokens", "mode"))
def start(
  structure: Structure,
  leaves: list[Any],
  prompt: jax.Array,
  prompt_end: jax.Array,
  controls: dict[str, jax.Array],
  rng: jax.Array,
  *,
  max_new_tokens: int,
  mode: sampling.SamplingMode,
) -> dict[str, Any]:
  """The prompt and the first token: the carry `advance` continues.

  Args: as `gemma_surgery.generation.decoding.decode`.

  Returns:
    ``{"i": 1, "state": [...], "prev", "tokens" [batch, max_new_tokens],
    "done" [batch], "lengths" [batch], "rng"}`` (``state``: the values of
    the model's state variables, i.e. the KV caches and cache index).
  """
  _TRACES["start"] += 1
  unbound, values = jax.tree_util.tree_unflatten(structure.treedef, leaves)
  batch = prompt.shape[0]
  run, choose = step_functions(controls, prompt_end, batch, mode)
  logits, values = run(unbound, list(values), prompt)
  first, rng = choose(logits[{"seq": -1}], rng)
  tokens = jnp.full((batch, max_new_tokens), controls["pad"], jnp.int32)
  done = first == controls["eos"]
  return {
    "i": jnp.int32(1),
    "state": [values[i] for i in _state_positions(values)],
    "prev": first,
    "tokens": tokens.at[:, 0].set(first),
    "done": done,
    "lengths": jnp.where(done, 1, max_new_tokens).astype(jnp.int32),
    "rng": rng,
  }


@functools.partial(
  jax.jit,
  static_argnames=("structure", "max_new_tokens", "mode"),
  donate_argnames=("carry",),
)
def advance(
  structure: Structure,
  leaves: list[Any],
  carry: dict[str, Any],
  until: jax.Array,
  prompt_end: jax.Array,
  controls: dict[str, jax.Array],
  *,
  max_new_tokens: int,
  mode: sampling.SamplingMode,
) -> dict[str, Any]:
  """Decoding steps from ``carry["i"]`` up to ``until`` (an int32 array).

  Stops early once every row has emitted EOS. ``carry`` is donated.

  Returns:
    The carry after the steps (same structure as `start`'s).
  """
  _TRACES["advance"] += 1
  unbound, values = jax.tree_util.tree_unflatten(structure.treedef, leaves)
  values = list(values)
  positions = _state_positions(values)
  batch = carry["prev"].shape[0]
  run, choose = step_functions(controls, prompt_end, batch, mode)
  pad, eos = controls["pad"], controls["eos"]
  limit = jnp.minimum(until, max_new_tokens)

  def cond(c):
    return (c["i"] < limit) & ~jnp.all(c["done"])

  def body(c):
    merged = list(values)
    for p, v in zip(positions, c["state"], strict=True):
      merged[p] = v
    logits, merged = run(unbound, merged, c["prev"][:, None])
    token, rng = choose(logits[{"seq": 0}], c["rng"])
    token = jnp.where(c["done"], pad, token)
    i = c["i"]
    tokens = jax.lax.dynamic_update_slice(
      c["tokens"], token[:, None], (jnp.zeros_like(i), i)
    )
    newly = ~c["done"] & (token == eos)
    return {
      "i": i + 1,
      "state": [merged[p] for p in positions],
      "prev": token,
      "tokens": tokens,
      "done": c["done"] | newly,
      "lengths": jnp.where(newly, i + 1, c["lengths"]),
      "rng": rng,
    }

  return jax.lax.while_loop(cond, body, carry)
