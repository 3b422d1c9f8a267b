"""Model inputs: prompts to token-id arrays, and generation argument checks.

Prompts become ``[batch, seq]`` int32 token ids, left-padded. Only a row's
*leading* pads are padding; they are marked `PAD_MARK` (−1) for Penzai's KV
cache, which gives those slots ``token_positions == -1`` so they are never
attended to, while a 0 later in the prompt or generated is an ordinary token
(Penzai's default would mask every 0, silently changing continuations).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors, validation
from gemma_surgery.surgery import Captures
from gemma_surgery.surgery.layers.capture import SaveIntermediate
from gemma_surgery.tokenizer import as_tokenizer

# Marks padding slots in Penzai's cache (never a real token id).
PAD_MARK = -1


def mark_left_padding(ids: np.ndarray, pad_id: int) -> np.ndarray:
  """Replaces each row's leading run of ``pad_id`` with the cache's pad mark."""
  leading = np.cumsum(ids != pad_id, axis=1) == 0
  if leading.all(axis=1).any():
    raise errors.InputError("A prompt row consists only of padding.")
  return np.where(leading, PAD_MARK, ids)


def is_int(x: Any) -> bool:
  return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _rows_to_array(rows: list[Any], vocab: int) -> np.ndarray:
  """Left-pads token rows of different lengths with the pad mark."""
  arrays = []
  for b, row in enumerate(rows):
    arr = np.asarray(row)
    if arr.ndim != 1 or arr.size == 0:
      raise errors.InputError(
        f"Prompt {b} must be a non-empty list of token ids, got shape {arr.shape}."
      )
    validation.check_token_ids(arr, vocab)
    arrays.append(arr.astype(np.int32))
  width = max(len(a) for a in arrays)
  out = np.full((len(arrays), width), PAD_MARK, np.int32)
  for b, arr in enumerate(arrays):
    out[b, width - len(arr) :] = arr
  return out


def prompt_array(prompts: Any, vocab: int, pad_id: int, tokenizer: Any) -> np.ndarray:
  """``[batch, seq]`` int32 ids with left padding marked −1.

  Accepts a string or list of strings (with ``tokenizer``; BOS is added), a
  list of ids, a list of id lists (any lengths), or a ``[batch, seq]`` /
  ``[seq]`` array or ``{batch, seq}`` NamedArray whose leading ``pad_id``
  run is padding.

  Raises:
    InputError: Empty or malformed prompts, ids outside the vocabulary,
      strings without a tokenizer.
  """
  if isinstance(prompts, str):
    prompts = [prompts]
  if isinstance(prompts, pz.nx.NamedArray | pz.nx.NamedArrayView):
    prompts = prompts.untag_prefix("batch", "seq").unwrap()
  if isinstance(prompts, np.ndarray | jax.Array):
    arr = np.asarray(prompts)
    arr = arr[None] if arr.ndim == 1 else arr
    if arr.ndim != 2 or 0 in arr.shape:
      raise errors.InputError(
        f"Prompt arrays must have shape [batch, seq] with batch, seq >= 1, got"
        f" {arr.shape}."
      )
    validation.check_token_ids(arr, vocab)
    return mark_left_padding(arr.astype(np.int32), pad_id)
  if not isinstance(prompts, Sequence) or len(prompts) == 0:
    raise errors.InputError(
      "prompts must be a non-empty list of strings or of token-id lists, or a"
      f" [batch, seq] array; got {type(prompts).__name__} {prompts!r:.60}."
    )
  if all(isinstance(p, str) for p in prompts):
    if tokenizer is None:
      raise errors.InputError(
        "String prompts need a tokenizer: pass tokenizer=lm.tokenizer, or token ids."
      )
    return _rows_to_array(as_tokenizer(tokenizer).encode(list(prompts)), vocab)
  if all(is_int(p) for p in prompts):
    prompts = [prompts]
  if any(isinstance(p, str) or is_int(p) for p in prompts):
    raise errors.InputError(
      "prompts mixes strings, ids and lists; pass a list of strings or a list"
      " of token-id lists."
    )
  return _rows_to_array(list(prompts), vocab)


def check_controls(
  max_new_tokens, temperature, top_k, top_p, eos_id, pad_id, seed, vocab
) -> None:
  if not is_int(max_new_tokens) or max_new_tokens <= 0:
    raise errors.InputError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1.")
  if (
    not isinstance(temperature, numbers.Real)
    or not np.isfinite(temperature)
    or temperature < 0
  ):
    raise errors.InputError(
      f"temperature={temperature!r} must be a finite number >= 0 (0 = greedy)."
    )
  if top_k is not None and (not is_int(top_k) or top_k < 1):
    raise errors.InputError(f"top_k={top_k!r} must be None or an int >= 1.")
  if top_p is not None and (not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
    raise errors.InputError(f"top_p={top_p!r} must be None or a number in (0, 1].")
  for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
    if value is None and name == "eos_id":
      continue
    if not is_int(value) or not 0 <= value < vocab:
      raise errors.InputError(
        f"{name}={value!r} must be a token id in [0, {vocab})"
        + (" or None." if name == "eos_id" else ".")
      )
  if not is_int(seed):
    raise errors.InputError(f"seed={seed!r} must be an int.")


def check_model(model: Any, captures: Captures | None) -> None:
  if not hasattr(model, "metadata") or not isinstance(
    getattr(model, "body", None), pz.nn.Layer
  ):
    raise errors.InputError(
      f"generate needs a Penzai TransformerLM (e.g. gs.load(...).model), got"
      f" {type(model).__name__}."
    )
  if captures is None:
    return
  if not isinstance(captures, Captures):
    raise errors.SurgeryError(
      f"captures must be the Captures returned by gs.capture, got"
      f" {type(captures).__name__}."
    )
  present = {
    id(s.saved)
    for s in pz.select(model).at_instances_of(SaveIntermediate).get_sequence()
  }
  missing = [
    k
    for k, v in zip(captures.keys(), captures.variables(), strict=True)
    if id(v) not in present
  ]
  if missing:
    raise errors.SurgeryError(
      f"Captures {missing} are not in this model: pass the patched model"
      " returned by the same gs.capture call."
    )


def token_batch(model: Any, tokens: Any, tokenizer: Any = None) -> np.ndarray:
  """``[batch, seq]`` int32 token ids for an analysis (no padding).

  Args:
    model: The model (its vocabulary size bounds the ids).
    tokens: A string or list of strings (with ``tokenizer``; BOS is added), a
      list of ids, a list of equally long id lists, a ``[seq]`` / ``[batch,
      seq]`` array or a ``{batch, seq}`` NamedArray.
    tokenizer: Needed for strings.

  Raises:
    InputError: Ids outside the vocabulary, strings without a tokenizer, or
      rows of different lengths (analyses compare positions across rows).
  """
  ids = prompt_array(tokens, model.metadata.vocab_size, PAD_MARK, tokenizer)
  if (ids == PAD_MARK).any():
    lengths = (ids != PAD_MARK).sum(axis=1).tolist()
    raise errors.InputError(
      f"Analyses need prompts of equal length (positions are compared across"
      f" rows); got lengths {lengths}."
    )
  return ids


def named_tokens(ids: Any) -> pz.nx.NamedArray:
  """``[batch, seq]`` token ids as the ``{batch, seq}`` int32 model input.

  The ids' range is checked against the vocabulary when the model runs.

  Raises:
    InputError: Rows of different lengths, an array that is not 2-D, or ids
      that are not integers (floats would be truncated silently).
  """
  try:
    array = validation.to_host_array(ids)[0]
  except (TypeError, ValueError) as e:
    raise errors.InputError(
      f"Token ids must be a [batch, seq] array of equal-length rows: {e}"
    ) from e
  if array.ndim != 2:
    raise errors.InputError(
      f"Token ids must be a [batch, seq] array, got shape {array.shape}."
    )
  if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
    raise errors.InputError(
      f"Token ids must be integers, got dtype {array.dtype}; cast whole-number"
      " ids with .astype(np.int32)."
    )
  return pz.nx.wrap(jnp.asarray(array, jnp.int32)).tag("batch", "seq")
