"""Token inputs and compiled forward passes shared by the analyses."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.generation_inputs import PAD_MARK, prompt_array


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


def named_tokens(ids: np.ndarray) -> pz.nx.NamedArray:
  return pz.nx.wrap(jnp.asarray(ids, jnp.int32)).tag("batch", "seq")


@functools.partial(jax.jit, static_argnums=0)
def _apply(fn: Callable[[Any, Any], Any], frozen_model: Any, tokens: Any) -> Any:
  return fn(frozen_model, tokens)


def run_frozen(model: Any, fn: Callable[[Any, Any], Any], tokens: Any) -> Any:
  """``fn(model, tokens)`` jitted with the model's parameters frozen.

  ``fn`` must be hashable and stable across calls (a module-level function
  or a `functools.partial` of one with hashable arguments) so repeated calls
  with models of the same structure share one compilation; the model's
  arrays (parameters, patch values, masks) are ordinary jit arguments. The
  model must not hold state variables (captures): use `jit_forward` there.
  """
  return _apply(fn, pz.freeze_params(model), tokens)


def call_model(model: Any, tokens: Any) -> Any:
  """``model(tokens)``: the logits ``{batch, seq, vocabulary}``."""
  return model(tokens)
