"""Fused, jitted, KV-cached generation of (possibly patched) models.

    patched, acts = gs.capture(gs.steer(model, "resid_post", 3, v, 4.0),
                               "resid_post", [3])
    out = gs.generate(patched, ["The capital", "Once"], max_new_tokens=32,
                      temperature=0.7, top_p=0.9, tokenizer=tok, eos_id=1)
    out.text, out.tokens, out.lengths
    out.captures["resid_post", 3]      # {batch, seq: prompt + generated, embedding}

The prompt and all decoding steps run inside one ``jax.jit``
(`gemma_surgery.generation.decoding`): a ``lax.while_loop`` over Penzai's
``KVCachingTransformerLM`` with frozen parameters, stopping early once every
row has emitted EOS. Surgery layers act during the prompt and every step;
position-aware ones see the side input ``generation_prompt_end``. Capture
layers record every step into fixed buffers (`gemma_surgery.surgery.layers.buffer`).

Axes and padding: prompts become ``{batch, seq}`` int token ids, left-padded.
Only a row's *leading* pads are padding: they are marked −1 for Penzai's cache
(``token_positions == -1``, never attended to), while a 0 later in the prompt
or generated is an ordinary token (Penzai's default would mask every 0).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.generation import decoding
from gemma_surgery.generation.calls import KV_CACHE_DTYPES, setup
from gemma_surgery.generation.inputs import PAD_MARK, mark_left_padding
from gemma_surgery.host import to_numpy
from gemma_surgery.parallel import sharding
from gemma_surgery.surgery import Captures
from gemma_surgery.surgery.layers import base, buffer
from gemma_surgery.surgery.layers.capture import SaveIntermediate
from gemma_surgery.tokenizer import as_tokenizer

__all__ = [
  "KV_CACHE_DTYPES",
  "GenerationResult",
  "generate",
  "greedy_generate",
  "mark_left_padding",
]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
  """What `generate` returns.

  Attributes:
    tokens: ``[batch, max_new_tokens]`` int32 new tokens; after a row's EOS
      the rest of the row is ``pad_id``.
    lengths: ``[batch]`` number of new tokens per row, EOS included.
    prompt: ``[batch, prompt_len]`` int32 prompts, left-padded with ``pad_id``.
    prompt_lengths: ``[batch]`` non-pad prompt tokens per row (the
      ``generation_prompt_end`` side input the model saw).
    text: Decoded new text per row, up to (excluding) EOS; None without a
      tokenizer.
    captured: The whole-run activation of every capture layer, by ``(site,
      layer)``; read it through `captures`.
    logits: With ``generate(..., return_logits=True)``: ``{batch, seq:
      max_new_tokens, vocabulary}``, the model's logits each new token was
      chosen from (``seq`` aligned with ``tokens``; before temperature and
      top-k/top-p; meaningless after a row's EOS, see `mask`). Else None.
  """

  tokens: np.ndarray
  lengths: np.ndarray
  prompt: np.ndarray
  prompt_lengths: np.ndarray
  text: list[str] | None = None
  captured: dict[tuple[str, int | None], pz.nx.NamedArray] = dataclasses.field(
    default_factory=dict, repr=False
  )
  logits: pz.nx.NamedArray | None = dataclasses.field(default=None, repr=False)

  @property
  def mask(self) -> np.ndarray:
    """``[batch, prompt_len + max_new_tokens]`` bool: True at real tokens.

    Aligned with ``concatenate([prompt, tokens], axis=1)``: False at left
    padding and at the ``pad_id`` slots after a row's EOS.
    """
    width, new = self.prompt.shape[1], self.tokens.shape[1]
    prompt = np.arange(width)[None, :] >= width - self.prompt_lengths[:, None]
    generated = np.arange(new)[None, :] < self.lengths[:, None]
    return np.concatenate([prompt, generated], axis=1)

  @functools.cached_property
  def captures(self) -> Captures | None:
    """Activations of every capture layer over the whole run.

    Keyed like `surgery.Captures` (``captures["resid_post", 3]``,
    ``captures.stacked(site)``): ``{batch, seq, ...site axes}`` where ``seq``
    is ``prompt_len`` plus the tokens run through the model, aligned with
    ``concatenate([prompt, tokens], axis=1)``. Left-padding slots and
    positions after a row's EOS hold meaningless values:
    ``captures.masked(site, layer)`` zeroes them (with `mask`). None if the
    model has no capture layers.
    """
    if not self.captured:
      return None
    seq = next(iter(self.captured.values()))
    seq = jax.tree_util.tree_leaves(seq, is_leaf=buffer.is_named)[0]
    length = seq.named_shape["seq"]
    real = pz.nx.wrap(self.mask[:, :length]).tag("batch", "seq")
    return Captures(
      {
        key: SaveIntermediate(
          saved=pz.StateVariable(value=value, label=f"generated/{key}"),
          site=key[0],
          layer=key[1],
        )
        for key, value in self.captured.items()
      },
      mask=real,
    )

  def sequences(self) -> list[list[int]]:
    """Per row: prompt without padding followed by the new tokens."""
    width = self.prompt.shape[1]
    return [
      [int(t) for t in self.prompt[b, width - n :]]
      + [int(t) for t in self.tokens[b, : self.lengths[b]]]
      for b, n in enumerate(self.prompt_lengths)
    ]


def generate(
  model: Any,
  prompts: Any,
  *,
  max_new_tokens: int,
  temperature: float = 0.0,
  top_k: int | None = None,
  top_p: float | None = None,
  eos_id: int | None = None,
  seed: int = 0,
  pad_id: int = 0,
  tokenizer: Any = None,
  captures: Captures | None = None,
  mesh: Mesh | None = None,
  cache_len: int | None = None,
  sharding_rules: sharding.Rules | None = None,
  return_logits: bool = False,
  kv_cache_dtype: str | None = None,
) -> GenerationResult:
  """Generates continuations with one fused, jitted, KV-cached loop.

  Args:
    model: A Penzai transformer LM, patched or not: surgery layers act on the
      prompt and on every decoding step. Every `SaveIntermediate` in it
      records the whole run (see ``captures``).
    prompts: Token-id lists of any lengths (left-padded here), one list of
      ids, strings (needs ``tokenizer``; BOS is added), or a ``[batch, seq]``
      array / ``{batch, seq}`` NamedArray left-padded with ``pad_id``.
    max_new_tokens: Tokens to generate per row (>= 1).
    temperature: 0 = greedy (argmax; ``top_k``/``top_p`` are then ignored);
      > 0 samples from softmax(logits / T). Changing it (> 0), ``top_k``,
      ``top_p``, ``seed`` or ``eos_id`` never recompiles.
    top_k: Sample among the k most likely tokens (None: all).
    top_p: Nucleus sampling: sample among the smallest set of tokens whose
      probability sums to >= ``top_p`` (at least one token; None or 1: all).
    eos_id: A row stops after emitting this token; later positions hold
      ``pad_id``. The loop exits once every row has stopped. None: never.
    seed: Seed of the sampling keys (split per step like Penzai's
      ``temperature_sample_pyloop``, so equal seeds give equal samples).
    pad_id: The id of left padding in array prompts and after EOS.
    tokenizer: Encodes string prompts and decodes ``text`` (a
      `GemmaTokenizer` or `JsonTokenizer`, a ``tokenizer.model`` or
      ``tokenizer.json`` path, or any encode/decode object).
    captures: The `Captures` of ``gs.capture`` on this model (optional: all
      capture layers are found anyway). Its values are replaced by the
      whole-run activations, as in ``result.captures``.
    mesh: Shard parameters, KV caches, capture buffers and prompts over this
      mesh by axis name (``batch`` → ``data``, heads/neurons/vocabulary →
      ``model`` with the default rules). It may span several processes
      (`gemma_surgery.parallel.distributed`): every process then calls `generate`
      with the same prompts and gets the same tokens; captures stay global
      arrays (``gs.distributed.gather`` brings them to the host). None: the
      mesh of the model's parameters when they span several processes, else
      no placement.
    cache_len: KV-cache length (default: prompt length + ``max_new_tokens``).
    sharding_rules: Rules for ``mesh`` (default `sharding.DEFAULT_RULES`).
    return_logits: Also return, in ``result.logits``, the logits each new
      token was chosen from (before temperature and filtering).
    kv_cache_dtype: Store the key/value caches in this dtype (one of
      `KV_CACHE_DTYPES`), e.g. ``"bfloat16"`` beside float32 activations to
      halve the bytes each step reads from the cache; attention still runs in
      the activation dtype. None: the activation dtype.

  Returns:
    A `GenerationResult`.

  Raises:
    InputError: Malformed/empty prompts, ids outside the vocabulary, bad
      ``max_new_tokens``/``temperature``/``top_k``/``top_p``/ids, strings
      without a tokenizer, or a prompt plus ``max_new_tokens`` longer than
      ``cache_len``.
    InputError: also a ``kv_cache_dtype`` outside `KV_CACHE_DTYPES`.
    SurgeryError: ``captures`` that don't belong to ``model``; state of a
      layer in ``model`` whose shape changes at every decoding step (the
      fused loop carries a layer's own ``pz.StateVariable`` when its value
      keeps one shape once decoding has started, e.g. the Penzai tutorials'
      ``SaveIntermediate``: afterwards it holds the last step's value).
  """
  if not isinstance(return_logits, bool):
    raise errors.InputError(
      f"return_logits must be True or False, got {return_logits!r}."
    )
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
    captures=captures,
    mesh=mesh,
    cache_len=cache_len,
    sharding_rules=sharding_rules,
    kv_cache_dtype=kv_cache_dtype,
  )
  ids, prompt_lengths, prepared, needed = (
    call.ids,
    call.prompt_lengths,
    call.prepared,
    call.needed,
  )
  out = decoding.decode(
    prepared.structure,
    call.leaves,
    call.prompt,
    call.lengths,
    call.controls,
    call.key,
    max_new_tokens=max_new_tokens,
    mode=call.mode,
    return_logits=return_logits,
  )
  prepared.write_back(out)
  # Rows may live on other processes: gather them (a collective).
  tokens, lengths = (
    to_numpy(out["tokens"]),
    to_numpy(out["lengths"]),
  )
  text = None
  if tokenizer is not None:
    tok = as_tokenizer(tokenizer)
    text = [
      tok.decode([int(t) for t in row[:n] if eos_id is None or t != eos_id])
      for row, n in zip(tokens, lengths, strict=True)
    ]
  return GenerationResult(
    tokens=tokens,
    lengths=lengths,
    prompt=np.where(ids == PAD_MARK, pad_id, ids).astype(np.int32),
    prompt_lengths=prompt_lengths,
    text=text,
    # Without EOS every step runs: the filled length is known (no sync).
    captured=_captured(prepared, out, None if eos_id is not None else needed),
    logits=None if out["logits"] is None else _named_logits(out["logits"]),
  )


def _named_logits(logits: jax.Array) -> pz.nx.NamedArray:
  return pz.nx.wrap(logits).tag("batch", "seq", "vocabulary")


def _captured(
  prepared: decoding.Prepared, out: dict[str, Any], end: int | None
) -> dict:
  """Buffers trimmed to the filled slots (``end``, or read from ``out``).

  The values are also stored in the model's capture layers.
  """
  if not prepared.savers:
    return {}
  if end is None:
    end = int(to_numpy(out["cache_end"]))
  structure, captured = prepared.structure, {}
  for i, key, buf in zip(
    structure.saver_index, structure.saver_keys, out["captures"], strict=True
  ):
    trimmed = jax.tree_util.tree_map(
      lambda b: _trim_seq(b, end), buf, is_leaf=buffer.is_named
    )
    base.store(prepared.variables[i], trimmed)
    if key is not None:
      captured[key] = trimmed
  return captured


def _trim_seq(array: pz.nx.NamedArray, end: int) -> pz.nx.NamedArray:
  """``array[{"seq": :end}]`` with one slice op (no copy when nothing to cut)."""
  if array.named_shape["seq"] == end:
    return array
  names = list(array.named_axes)
  data = jax.lax.slice_in_dim(
    array.data_array, 0, end, axis=len(array.positional_shape) + names.index("seq")
  )
  return pz.nx.NamedArray(
    named_axes=collections.OrderedDict(
      zip(names, data.shape[-len(names) :], strict=True)
    ),
    data_array=data,
  )


def greedy_generate(
  model: Any,
  prompt: Any,
  *,
  max_new_tokens: int,
  eos_id: int | None = None,
  pad_id: int = 0,
) -> np.ndarray:
  """Greedy new tokens ``[batch, max_new_tokens]`` (`generate` with T = 0).

  Args:
    model: A Penzai transformer LM (patched or not).
    prompt: Token ids ``[batch, seq]`` left-padded with ``pad_id`` (array,
      nested list or ``{batch, seq}`` NamedArray), or a list of id lists.
    max_new_tokens: Number of tokens to generate.
    eos_id: Stop a row after this token (later positions are ``pad_id``).
    pad_id: The id used for left padding.

  Raises:
    InputError: See `generate`.
  """
  if isinstance(prompt, list | tuple) and prompt and not isinstance(prompt[0], str):
    rows = [np.atleast_1d(np.asarray(p)) for p in prompt]
    if len({r.shape for r in rows}) == 1:
      prompt = np.asarray(prompt)  # rectangular: leading pad_id runs are padding
  return generate(
    model, prompt, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id
  ).tokens
