"""Checked inputs of one generation call, shared by `generate` and `stream`.

`setup` validates the prompts and controls of a call, pads the prompts,
converts the model for fused decoding (`gemma_surgery.generation.prepared`)
and returns everything the jitted loops receive as a `Call`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.generation import sampling
from gemma_surgery.generation.inputs import (
  PAD_MARK,
  check_controls,
  check_model,
  is_int,
  prompt_array,
)
from gemma_surgery.generation.prepared import Prepared, prepare
from gemma_surgery.parallel import sharding

__all__ = ["KV_CACHE_DTYPES", "Call", "setup"]


@dataclasses.dataclass(frozen=True)
class Call:
  """One checked generation call.

  Attributes:
    ids: ``[batch, width]`` int32 prompts, left padding marked `PAD_MARK`.
    prompt_lengths: ``[batch]`` non-pad prompt tokens per row.
    prepared: The converted model; ``leaves`` its current array leaves.
    prompt: ``ids`` as the loop gets them (placed on ``mesh`` if any).
    lengths: ``prompt_lengths`` as the loop gets them.
    controls: Scalar controls of the loop (see `decoding.decode`).
    mode: Greedy or sampling (static).
    key: The PRNG key of ``seed``.
    needed: Prompt width plus ``max_new_tokens``.
  """

  ids: np.ndarray
  prompt_lengths: np.ndarray
  prepared: Prepared
  leaves: list[Any]
  prompt: Any
  lengths: Any
  controls: dict[str, Any]
  mode: sampling.SamplingMode
  key: jax.Array
  needed: int


# Key/value cache dtypes `generate` accepts beside the activation dtype.
KV_CACHE_DTYPES = ("bfloat16", "float16", "float32")


def setup(
  model: Any,
  prompts: Any,
  *,
  max_new_tokens: int,
  temperature: float,
  top_k: int | None,
  top_p: float | None,
  eos_id: int | None,
  seed: int,
  pad_id: int,
  tokenizer: Any,
  captures: Any,
  mesh: Mesh | None,
  cache_len: int | None,
  sharding_rules: Any,
  kv_cache_dtype: str | None = None,
) -> Call:
  """Checks a call's arguments (see `generate`) and prepares its model.

  Raises:
    InputError: See `gemma_surgery.generation.api.generate`.
    SurgeryError: ``captures`` that don't belong to ``model``.
  """
  check_model(model, captures)
  if kv_cache_dtype is not None and kv_cache_dtype not in KV_CACHE_DTYPES:
    raise errors.InputError(
      f"kv_cache_dtype={kv_cache_dtype!r} is not supported; valid: None or one"
      f" of {', '.join(KV_CACHE_DTYPES)}."
    )
  vocab = model.metadata.vocab_size
  check_controls(max_new_tokens, temperature, top_k, top_p, eos_id, pad_id, seed, vocab)
  ids = prompt_array(prompts, vocab, pad_id, tokenizer)
  batch, width = ids.shape
  needed = width + max_new_tokens
  if cache_len is None:
    cache_len = needed
  elif not is_int(cache_len) or cache_len < needed:
    raise errors.InputError(
      f"A prompt of {width} tokens plus max_new_tokens={max_new_tokens} needs"
      f" {needed} cache slots; cache_len={cache_len!r} is too short."
    )
  prompt_lengths = (ids != PAD_MARK).sum(axis=1).astype(np.int32)
  if mesh is None and jax.process_count() > 1:
    # A model sharded over several processes needs its mesh for the caches.
    mesh = sharding.spanning_mesh([p.value for p in pz.unbind_params(model)[1]])
  prepared, leaves = prepare(
    model, batch, cache_len, mesh, sharding_rules, kv_cache_dtype
  )
  prompt_in, lengths_in = ids, prompt_lengths
  if mesh is not None:
    prompt_in = _on_mesh(ids, ("batch", "seq"), mesh, sharding_rules)
    lengths_in = _on_mesh(prompt_lengths, ("batch",), mesh, sharding_rules)
  greedy = temperature == 0
  controls = {
    "eos": np.int32(-1 if eos_id is None else eos_id),
    "pad": np.int32(pad_id),
    "temperature": np.float32(1.0 if greedy else temperature),
    "top_k": np.int32(min(top_k or vocab, vocab)),
    "top_p": np.float32(2.0 if top_p is None or top_p >= 1 else top_p),
  }
  # A filter that keeps every token is no filter (same tokens, no extra work).
  filtered = (top_k is not None and top_k < vocab) or (top_p is not None and top_p < 1)
  mode = sampling.SamplingMode(greedy=greedy, filtered=not greedy and filtered)
  return Call(
    ids=ids,
    prompt_lengths=prompt_lengths,
    prepared=prepared,
    leaves=leaves,
    prompt=prompt_in,
    lengths=lengths_in,
    controls=controls,
    mode=mode,
    key=_key(seed),
    needed=needed,
  )


@functools.lru_cache(maxsize=16)
def _key(seed: int) -> jax.Array:
  return jax.random.key(seed)


def _on_mesh(array: np.ndarray, names: tuple[str, ...], mesh: Mesh, rules) -> Any:
  spec = sharding.partition_spec(
    dict(zip(names, array.shape, strict=True)), 0, mesh, rules
  )
  return jax.device_put(array, NamedSharding(mesh, spec))
