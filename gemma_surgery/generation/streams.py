"""Streaming generation: new tokens as they are decoded, chunk by chunk.

    for chunk in gs.generate_stream(model, ["The cat"], max_new_tokens=64,
                                    chunk_tokens=8, tokenizer=tok):
      chunk.tokens            # [batch, k] new tokens chunk.start .. chunk.start+k

The first chunk (the prompt's first token) comes right after the prompt has
run; every later one after ``chunk_tokens`` more decoding steps (or fewer:
the last one, or once every row has emitted EOS). The steps are those of the
fused loop (`gemma_surgery.generation.chunked`), so the concatenated chunks
are `generate`'s tokens for the same arguments; per-row edits
(``gs.stack_rows``, ``{batch}`` steering) work the same way. Two compilations
serve every chunk and every later call of the same shapes (`start` and
`advance`; changing edit values, ``chunk_tokens`` or the sampling values
never recompiles).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
from jax.sharding import Mesh

from gemma_surgery import errors
from gemma_surgery.generation import chunked
from gemma_surgery.generation.calls import setup
from gemma_surgery.generation.inputs import is_int
from gemma_surgery.host import to_numpy

__all__ = ["StreamChunk", "generate_stream"]


@dataclasses.dataclass(frozen=True)
class StreamChunk:
  """New tokens of every row since the previous chunk.

  Attributes:
    start: Index (among the new tokens) of this chunk's first token.
    tokens: ``[batch, k]`` int32 new tokens ``start .. start + k - 1``;
      ``pad_id`` after a row's EOS.
    done: ``[batch]`` bool: the row has emitted EOS.
    lengths: ``[batch]`` new tokens per row so far (EOS included).
    last: No chunk follows (``max_new_tokens`` reached or every row done).
  """

  start: int
  tokens: np.ndarray
  done: np.ndarray
  lengths: np.ndarray
  last: bool


def generate_stream(
  model: Any,
  prompts: Any,
  *,
  max_new_tokens: int,
  chunk_tokens: int = 8,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  eos_id: int | None = None,
  seed: int = 0,
  pad_id: int = 0,
  tokenizer: Any = None,
  mesh: Mesh | None = None,
  cache_len: int | None = None,
  sharding_rules: Any = None,
) -> Iterator[StreamChunk]:
  """`generate`, yielding the new tokens in chunks as they are decoded.

  Args:
    model: A Penzai transformer LM, patched or not (no capture layers and
      no state variables of its own: use `generate` for those).
    prompts: As `generate`.
    max_new_tokens: Tokens to generate per row (>= 1).
    chunk_tokens: Decoding steps per chunk after the first token (>= 1).
    temperature, top_k, top_p, eos_id, seed, pad_id, tokenizer, mesh,
      cache_len, sharding_rules: As `generate` (same tokens for the same
      values).

  Yields:
    `StreamChunk` s; the first holds each row's first new token. Every
    process of a multi-process mesh must consume the same chunks.

  Raises:
    InputError: See `generate`; a ``chunk_tokens`` that is not an int >= 1.
    SurgeryError: A model with capture layers or state of its own.
  """
  if not is_int(chunk_tokens) or chunk_tokens < 1:
    raise errors.InputError(f"chunk_tokens must be an int >= 1, got {chunk_tokens!r}.")
  call = setup(
    model,
    prompts,
    max_new_tokens=max_new_tokens,
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    eos_id=eos_id,
    seed=seed,
    pad_id=pad_id,
    tokenizer=tokenizer,
    captures=None,
    mesh=mesh,
    cache_len=cache_len,
    sharding_rules=sharding_rules,
  )
  structure = call.prepared.structure
  if structure.saver_index or structure.user_state_index:
    raise errors.SurgeryError(
      "generate_stream runs models without capture layers or state variables of"
      f" their own ({', '.join(structure.user_state_names) or 'capture layers'});"
      " use gs.generate, which records them."
    )
  static = {"max_new_tokens": max_new_tokens, "mode": call.mode}
  carry = chunked.start(
    structure, call.leaves, call.prompt, call.lengths, call.controls, call.key, **static
  )
  sent = 0
  while True:
    step = int(to_numpy(carry["i"]))
    tokens, done = to_numpy(carry["tokens"]), to_numpy(carry["done"])
    lengths = np.where(done, to_numpy(carry["lengths"]), step).astype(np.int32)
    last = step >= max_new_tokens or bool(done.all())
    yield StreamChunk(sent, tokens[:, sent:step], done, lengths, last)
    if last:
      return
    sent = step
    until = np.int32(min(step + chunk_tokens, max_new_tokens))
    carry = chunked.advance(
      structure, call.leaves, carry, until, call.lengths, call.controls, **static
    )
