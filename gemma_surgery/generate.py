"""Fused, jitted, KV-cached greedy decoding of (possibly patched) models.

The whole decode runs inside one ``jax.jit``: the model is converted to
Penzai's ``KVCachingTransformerLM``, its parameters and state (KV caches, the
written tokens, the cache index) are unbound and frozen, and a
``lax.fori_loop`` feeds back one token per step. This avoids the ~13 ms of
Python/pytree overhead per token of Penzai's Python sampling loop.

Axes: prompts are ``{batch, seq}`` int token ids, left-padded with the pad id
(0 for Gemma). Only that leading run counts as padding: it is marked with −1
for Penzai's cache, which gives those slots ``token_positions == -1`` so they
are never attended to, while a 0 generated later is an ordinary token (Penzai's
default would mask every 0, silently changing the continuation).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts, sampling_mode

from gemma_surgery import build, errors


def _as_prompt_array(prompt: Any) -> np.ndarray:
  if isinstance(prompt, pz.nx.NamedArray | pz.nx.NamedArrayView):
    prompt = prompt.untag_prefix("batch", "seq").unwrap()
  arr = np.asarray(prompt)
  if arr.ndim == 1:
    arr = arr[None]
  if arr.ndim != 2 or arr.shape[1] == 0:
    raise errors.InputError(
      f"Prompt must have shape [batch, seq] with seq >= 1, got {arr.shape}."
    )
  return arr


# Marks padding slots in Penzai's cache (never a real token id).
_PAD_MARK = -1


def mark_left_padding(ids: np.ndarray, pad_id: int) -> np.ndarray:
  """Replaces each row's leading run of ``pad_id`` with `_PAD_MARK`."""
  leading = np.cumsum(ids != pad_id, axis=1) == 0
  if leading.all(axis=1).any():
    raise errors.InputError("A prompt row consists only of padding.")
  return np.where(leading, _PAD_MARK, ids)


@functools.partial(jax.jit, static_argnames=("max_new_tokens",))
def _fused_greedy(
  unbound: Any,
  state: list[Any],
  prompt: jax.Array,
  eos_id: jax.Array,
  max_new_tokens: int,
) -> jax.Array:
  def step(state, tokens):
    variables = [v.unfreeze_as_copy() for v in state]
    lm = pz.bind_variables(unbound, variables)
    logits = lm(pz.nx.wrap(tokens).tag("batch", "seq"))
    last = logits[{"seq": -1}].unwrap("batch", "vocabulary").argmax(axis=-1)
    return [v.freeze() for v in variables], last.astype(jnp.int32)

  state, nxt = step(state, prompt)
  batch = prompt.shape[0]
  out = jnp.zeros((batch, max_new_tokens), jnp.int32)
  done = jnp.zeros((batch,), bool)

  def body(i, carry):
    state, nxt, out, done = carry
    token = jnp.where(done, 0, nxt)
    out = out.at[:, i].set(token)
    done = done | (nxt == eos_id)
    state, nxt = step(state, token[:, None])
    return state, nxt, out, done

  _, _, out, _ = jax.lax.fori_loop(0, max_new_tokens, body, (state, nxt, out, done))
  return out


def greedy_generate(
  model: model_parts.TransformerLM,
  prompt: Any,
  *,
  max_new_tokens: int,
  eos_id: int | None = None,
  pad_id: int = 0,
) -> np.ndarray:
  """Greedy continuation of ``prompt`` with a fused KV-cached loop.

  Args:
    model: A Penzai transformer LM (patched or not); layers inserted into it
      act during the prompt and every decoding step.
    prompt: Token ids ``[batch, seq]`` (numpy/jax array, list, or a
      ``{batch, seq}`` NamedArray); left-pad with 0.
    max_new_tokens: Number of tokens to generate.
    eos_id: Stop a row after this token (later positions are 0). None never
      stops early.
    pad_id: The id used for left padding.

  Returns:
    ``[batch, max_new_tokens]`` int32 numpy array of new tokens.

  Raises:
    InputError: Bad prompt shape, out-of-vocabulary ids, or a non-positive
      ``max_new_tokens``.
  """
  ids = _as_prompt_array(prompt)
  vocab = model.metadata.vocab_size
  build.check_concrete_token_ids(ids, vocab)
  if max_new_tokens <= 0:
    raise errors.InputError(f"max_new_tokens={max_new_tokens} must be >= 1.")
  batch, seq = ids.shape
  ids = mark_left_padding(ids, pad_id)
  cached = sampling_mode.KVCachingTransformerLM.from_uncached(
    model,
    cache_len=seq + max_new_tokens,
    batch_axes={"batch": batch},
    pad_id=_PAD_MARK,
  )
  unbound, state = pz.unbind_state_vars(cached, freeze=True)
  unbound = pz.freeze_params(unbound)
  eos = jnp.asarray(-1 if eos_id is None else eos_id, jnp.int32)
  out = _fused_greedy(
    unbound, list(state), jnp.asarray(ids, jnp.int32), eos, max_new_tokens
  )
  return np.asarray(out)
