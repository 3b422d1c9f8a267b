"""Attention heads: patterns, detector scores, induction, knockouts.

Patterns are ``[layer, batch, heads, query, key]`` numpy arrays (``heads`` is
the user-facing head axis: query heads, whatever the variant), with axis
names ``{layer, batch, heads, seq, kv_seq}`` (`PATTERN_AXES`; ``named=True``
returns a NamedArray, and the scores accept one). Detector
scores follow the usual definitions (the mean attention a head puts on the
keys a pattern predicts, over the queries where the prediction exists):

* previous-token: key ``q − 1``;
* duplicate-token: earlier keys holding the same token as the query;
* induction: keys right after an earlier occurrence of the query's token
  (``tokens[j − 1] == tokens[q]``, ``j ≤ q``).

Scores check that the pattern and the tokens belong together (batch and
sequence sizes) and that the pattern holds attention weights (each query's
weights in [0, 1], summing to at most 1), so a score is always in [0, 1].
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_surgery import errors
from gemma_surgery.analysis import random_tokens
from gemma_surgery.analysis.named import (
  PATTERN_AXES,
  SCORE_AXES,
  TOKEN_AXES,
  NamedResult,
  check_pattern,
  token_array,
  unwrap,
  wrap,
)
from gemma_surgery.analysis.random_tokens import repeated_tokens, token_pool
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import capture, interventions, sites
from gemma_surgery.surgery.run import jit_forward, run_frozen
from gemma_surgery.tokenizer import as_tokenizer

__all__ = [
  "PATTERN_AXES",
  "SCORE_AXES",
  "TOKEN_AXES",
  "InductionResult",
  "attention_patterns",
  "duplicate_token_scores",
  "induction_scores",
  "induction_targets",
  "induction_token_scores",
  "knock_out",
  "knockout_losses",
  "mask_bos",
  "previous_token_scores",
  "repeat_losses",
  "repeated_tokens",
  "token_losses",
  "token_pool",
]


def _maybe_named(array: np.ndarray, axes: tuple[str, ...], named: bool) -> Any:
  return wrap(array, axes) if named else array


def attention_patterns(
  model: Any,
  tokens: Any,
  *,
  layers: Any = None,
  tokenizer: Any = None,
  named: bool = False,
) -> Any:
  """``[layer, batch, heads, query, key]`` softmax patterns (one forward).

  Returns:
    Numpy, or with ``named=True`` a NamedArray with axes `PATTERN_AXES`
    (``layer, batch, heads, seq, kv_seq``).
  """
  ids = token_batch(model, tokens, tokenizer)
  chosen = sites.layer_indices(model, layers)
  patched, acts = capture(model, "attn.pattern", chosen)
  jit_forward(patched)(named_tokens(ids))
  pattern = np.stack(
    [to_numpy(acts["attn.pattern", i].unwrap(*PATTERN_AXES[1:])) for i in chosen]
  )
  return _maybe_named(pattern, PATTERN_AXES, named)


def mask_bos(pattern: Any) -> Any:
  """The pattern without the BOS key (column 0), renormalised per query.

  Heads park attention on BOS when they have nothing to do; hiding it makes
  the remaining structure visible. Rows with all mass on BOS become zero.

  Args:
    pattern: Numpy with the key axis last, or a NamedArray with a ``kv_seq``
      axis (returned as a NamedArray with the same axes).
  """
  axes = None
  if hasattr(pattern, "named_shape"):
    axes = tuple(a for a in pattern.named_shape if a != "kv_seq") + ("kv_seq",)
    pattern = unwrap(pattern, axes, "pattern")
  out = np.array(pattern, np.float64)
  out[..., 0] = 0.0
  total = out.sum(-1, keepdims=True)
  out = np.divide(out, total, out=np.zeros_like(out), where=total > 0)
  return out if axes is None else wrap(out, axes)


def _score(pattern: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """Mean over valid queries of the mass on target keys.

  Args:
    pattern: ``[layer, batch, heads, query, key]``.
    targets: ``[batch, query, key]`` bool.

  Returns:
    ``[layer, heads]``.
  """
  valid = targets.any(-1)  # [batch, query]
  if not valid.any():
    raise errors.InputError("No query has a target key for this score.")
  mass = (pattern * targets[None, :, None]).sum(-1)  # [layer, batch, heads, query]
  return (mass * valid[None, :, None]).sum((1, 3)) / valid.sum()


def previous_token_scores(pattern: Any, tokens: Any, *, named: bool = False) -> Any:
  """``[layer, heads]`` mean attention to the previous position (queries ≥ 1).

  Args:
    pattern: ``[layer, batch, heads, query, key]`` weights of ``tokens``
      (`attention_patterns`), numpy or a NamedArray with `PATTERN_AXES`.
    tokens: ``[batch, seq]`` the ids the pattern was computed on.
    named: Return a NamedArray with axes `SCORE_AXES` (``layer, heads``).

  Returns:
    ``[layer, heads]`` scores in [0, 1].

  Raises:
    InputError: A pattern and tokens that don't belong together (batch or
      sequence sizes), values that are not attention weights, or no query
      for which the score's target exists.
  """
  pattern, ids = check_pattern(pattern, tokens)
  batch, seq = ids.shape
  targets = np.zeros((batch, seq, seq), bool)
  targets[:, np.arange(1, seq), np.arange(seq - 1)] = True
  return _maybe_named(_score(pattern, targets), SCORE_AXES, named)


def duplicate_token_scores(pattern: Any, tokens: Any, *, named: bool = False) -> Any:
  """``[layer, heads]`` mean attention to earlier copies of the query token.

  Arguments, result and errors as in `previous_token_scores`.
  """
  pattern, ids = check_pattern(pattern, tokens)
  seq = ids.shape[1]
  same = ids[:, :, None] == ids[:, None, :]
  earlier = np.tril(np.ones((seq, seq), bool), -1)
  return _maybe_named(_score(pattern, same & earlier[None]), SCORE_AXES, named)


def induction_targets(tokens: Any) -> np.ndarray:
  """``[batch, query, key]``: keys j ≤ q with ``tokens[j − 1] == tokens[q]``."""
  tokens = token_array(tokens)
  batch, seq = tokens.shape
  targets = np.zeros((batch, seq, seq), bool)
  targets[:, :, 1:] = tokens[:, :, None] == tokens[:, None, :-1]
  causal = np.tril(np.ones((seq, seq), bool))
  return targets & causal[None]


def induction_token_scores(pattern: Any, tokens: Any, *, named: bool = False) -> Any:
  """``[layer, heads]`` mean attention to the token after an earlier copy.

  Arguments, result and errors as in `previous_token_scores`.
  """
  pattern, ids = check_pattern(pattern, tokens)
  return _maybe_named(_score(pattern, induction_targets(ids)), SCORE_AXES, named)


def _token_losses(model: Any, tokens: Any) -> jax.Array:
  logits = model(tokens).unwrap("batch", "seq", "vocabulary").astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  ids = tokens.unwrap("batch", "seq")[:, 1:]
  return -jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]


def token_losses(
  model: Any, tokens: Any, *, tokenizer: Any = None, named: bool = False
) -> Any:
  """``[batch, seq − 1]`` next-token cross-entropy (nats), one jitted call.

  ``losses[:, t]`` is the loss of predicting token ``t + 1``. The model must
  not hold captures (use it before `gemma_surgery.capture`).

  Returns:
    Numpy, or with ``named=True`` a NamedArray with axes ``batch, seq``
    (``seq`` one shorter than the tokens').
  """
  ids = token_batch(model, tokens, tokenizer)
  losses = to_numpy(run_frozen(model, _token_losses, named_tokens(ids)))
  return _maybe_named(losses, TOKEN_AXES, named)


@dataclasses.dataclass(frozen=True)
class InductionResult(NamedResult):
  """Induction on repeated random sequences (see `induction_scores`).

  Attributes:
    tokens: ``[batch, 1 + 2·length]`` the sequences (axes ``batch, seq``).
    length: Length of one repeat.
    scores: ``[layer, heads]`` mean attention from each second-repeat token
      to the token after its first occurrence, in [0, 1].
    loss_first: Mean next-token loss over the first repeat (unpredictable).
    loss_second: Mean loss over the second repeat (predictable by copying).
  """

  AXES = {"tokens": TOKEN_AXES, "scores": SCORE_AXES}

  tokens: np.ndarray
  length: int
  scores: np.ndarray
  loss_first: float
  loss_second: float

  def best_heads(self, n: int = 3) -> list[tuple[int, int, float]]:
    """The ``n`` highest-scoring heads as ``(layer, head, score)``."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
      raise errors.InputError(f"n={n!r} must be a positive int.")
    flat = np.argsort(-self.scores, axis=None, kind="stable")[:n]
    layers, heads = np.unravel_index(flat, self.scores.shape)
    return [
      (int(a), int(b), float(self.scores[a, b]))
      for a, b in zip(layers, heads, strict=True)
    ]


def repeat_losses(losses: Any, length: int) -> tuple[float, float]:
  """Mean loss predicting the first repeat's tokens 2.. and the second repeat.

  ``losses[:, t]`` is the loss of predicting token ``t + 1``; the first
  repeat occupies positions ``1..length``, the second ``length + 1..2·length``.
  The first token of each repeat is excluded (not predictable in the first,
  the boundary in the second).

  Raises:
    InputError: ``losses`` that are not ``[batch, 2·length]`` (the losses of
      ``[BOS, r, r]`` sequences with repeats of ``length``).
  """
  losses = unwrap(losses, TOKEN_AXES, "losses")
  if isinstance(length, bool) or not isinstance(length, int | np.integer):
    raise errors.InputError(f"length={length!r} must be an int >= 2.")
  if length < 2 or losses.ndim != 2 or losses.shape[1] != 2 * length:
    raise errors.InputError(
      f"length={length} doesn't fit losses of shape {losses.shape}: [BOS, r, r]"
      " sequences with repeats of length L (>= 2) have 2·L losses per row."
    )
  first = losses[:, 1:length].mean()
  second = losses[:, length + 1 : 2 * length].mean()
  return float(first), float(second)


def _repeat_length(tokens: np.ndarray) -> int:
  """L of ``[batch, 1 + 2·L]`` ``[BOS, r, r]`` sequences; InputError otherwise."""
  seq = tokens.shape[1]
  length = (seq - 1) // 2
  if (
    seq % 2 == 0
    or length < 2
    or (tokens[:, 1 : 1 + length] != tokens[:, 1 + length :]).any()
  ):
    raise errors.InputError(
      f"tokens of shape {tokens.shape} are not [BOS, r, r] sequences: each row"
      " needs a first token and then the same L >= 2 tokens twice"
      " (see repeated_tokens)."
    )
  return length


def induction_scores(
  model: Any,
  *,
  length: int | None = None,
  batch: int = 4,
  seed: int = 0,
  bos_id: int | None = None,
  tokenizer: Any = None,
  id_range: Any = None,
  tokens: Any = None,
) -> InductionResult:
  """Scores every head for induction on ``[BOS, r, r]`` random sequences.

  The score of a head is its mean attention from second-repeat position
  ``q`` (token ``r_i``) to position ``q − length + 1`` (``r_{i+1}`` in the
  first repeat), the key an induction head copies from.

  Args:
    model: A Penzai ``TransformerLM`` without captures.
    length: Tokens in one repeat (default 32; inferred from ``tokens``).
    batch: Sequences drawn.
    seed: Seed of the draw.
    bos_id: First token of each row (default: the tokenizer's BOS, else 2).
    tokenizer: Draw the tokenizer's ordinary pieces (recommended: no
      control or byte-fallback pieces; see `random_tokens`).
    id_range: ``(low, high)``: draw ids ``low..high − 1`` instead. Without
      ``tokenizer`` or ``id_range``, ids ``4..vocab_size − 1`` are drawn.
    tokens: Your own ``[batch, 1 + 2·L]`` ``[BOS, r, r]`` sequences instead
      of a draw.

  Raises:
    InputError: Bad draw arguments (see `random_tokens.token_pool`), tokens
      that are not ``[BOS, r, r]`` or whose L differs from ``length``, ids
      outside the vocabulary.
  """
  vocab = model.metadata.vocab_size
  if tokens is not None:
    if tokenizer is not None or id_range is not None:
      raise errors.InputError(
        "tokens= replaces the random draw; pass either tokens or"
        " tokenizer=/id_range= (which choose the drawn ids), not both."
      )
    tokens = token_batch(model, tokens)
    inferred = _repeat_length(tokens)
    if length is not None and length != inferred:
      raise errors.InputError(
        f"length={length} but the tokens repeat {inferred} tokens; omit length."
      )
    length = inferred
  else:
    length = 32 if length is None else length
    pool = random_tokens.token_pool(vocab, tokenizer=tokenizer, id_range=id_range)
    if bos_id is None:
      bos_id = 2 if tokenizer is None else as_tokenizer(tokenizer).bos_id
    tokens = random_tokens.repeated_tokens(
      vocab, length, batch=batch, seed=seed, bos_id=bos_id, pool=pool
    )
  pattern = attention_patterns(model, tokens)
  queries = np.arange(length + 1, 2 * length + 1)
  on_target = pattern[..., queries, queries - length + 1]  # [layer, batch, heads, q]
  loss_first, loss_second = repeat_losses(token_losses(model, tokens), length)
  return InductionResult(
    tokens=tokens,
    length=length,
    scores=on_target.mean((1, 3)),
    loss_first=loss_first,
    loss_second=loss_second,
  )


def knock_out(model: Any, heads: list[tuple[int, int]]) -> Any:
  """The model with each ``(layer, head)`` knocked out (attention on BOS)."""
  by_layer: dict[int, list[int]] = {}
  for layer, head in heads:
    (layer,) = sites.layer_indices(model, layer)
    by_layer.setdefault(layer, []).append(int(head))
  for layer, chosen in sorted(by_layer.items()):
    model = interventions.knock_out_heads(model, [layer], chosen)
  return model


def knockout_losses(
  model: Any, heads: list[tuple[int, int]], tokens: Any, length: int
) -> dict[str, float]:
  """Second-repeat loss with and without knocking out ``heads``.

  Args:
    model: The model.
    heads: ``(layer, head)`` pairs.
    tokens: ``[batch, 1 + 2·length]`` ``[BOS, r, r]`` sequences.
    length: The repeat length L.

  Returns:
    ``{"clean": …, "knocked_out": …, "increase": knocked_out − clean}``.

  Raises:
    InputError: Tokens that are not ``[BOS, r, r]`` with repeats of
      ``length``; bad heads (see `interventions.knock_out_heads`).
  """
  ids = token_batch(model, tokens)
  if _repeat_length(ids) != length:
    raise errors.InputError(
      f"length={length} but the tokens repeat {_repeat_length(ids)} tokens."
    )
  knocked_model = knock_out(model, heads)
  clean = repeat_losses(token_losses(model, ids), length)[1]
  knocked = repeat_losses(token_losses(knocked_model, ids), length)[1]
  return {"clean": clean, "knocked_out": knocked, "increase": knocked - clean}
