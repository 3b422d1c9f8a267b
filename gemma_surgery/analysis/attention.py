"""Attention heads: patterns, detector scores, induction, knockouts.

Patterns are ``[layer, batch, heads, query, key]`` numpy arrays (``heads`` is
the user-facing head axis: query heads, whatever the variant). Detector
scores follow the usual definitions (the mean attention a head puts on the
keys a pattern predicts, over the queries where the prediction exists):

* previous-token: key ``q − 1``;
* duplicate-token: earlier keys holding the same token as the query;
* induction: keys right after an earlier occurrence of the query's token
  (``tokens[j − 1] == tokens[q]``, ``j ≤ q``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gemma_surgery import errors
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import capture, interventions, sites
from gemma_surgery.surgery.run import jit_forward, run_frozen


def attention_patterns(
  model: Any, tokens: Any, *, layers: Any = None, tokenizer: Any = None
) -> np.ndarray:
  """``[layer, batch, heads, query, key]`` softmax patterns (one forward)."""
  ids = token_batch(model, tokens, tokenizer)
  chosen = sites.layer_indices(model, layers)
  patched, acts = capture(model, "attn.pattern", chosen)
  jit_forward(patched)(named_tokens(ids))
  return np.stack(
    [
      to_numpy(acts["attn.pattern", i].unwrap("batch", "heads", "seq", "kv_seq"))
      for i in chosen
    ]
  )


def mask_bos(pattern: np.ndarray) -> np.ndarray:
  """The pattern without the BOS key (column 0), renormalised per query.

  Heads park attention on BOS when they have nothing to do; hiding it makes
  the remaining structure visible. Rows with all mass on BOS become zero.
  """
  out = np.array(pattern, np.float64)
  out[..., 0] = 0.0
  total = out.sum(-1, keepdims=True)
  return np.divide(out, total, out=np.zeros_like(out), where=total > 0)


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


def previous_token_scores(pattern: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """``[layer, heads]`` mean attention to the previous position (queries ≥ 1)."""
  batch, seq = to_numpy(tokens).shape
  targets = np.zeros((batch, seq, seq), bool)
  targets[:, np.arange(1, seq), np.arange(seq - 1)] = True
  return _score(pattern, targets)


def duplicate_token_scores(pattern: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """``[layer, heads]`` mean attention to earlier copies of the query token."""
  tokens = to_numpy(tokens)
  seq = tokens.shape[1]
  same = tokens[:, :, None] == tokens[:, None, :]
  earlier = np.tril(np.ones((seq, seq), bool), -1)
  return _score(pattern, same & earlier[None])


def induction_targets(tokens: np.ndarray) -> np.ndarray:
  """``[batch, query, key]``: keys j ≤ q with ``tokens[j − 1] == tokens[q]``."""
  tokens = to_numpy(tokens)
  batch, seq = tokens.shape
  targets = np.zeros((batch, seq, seq), bool)
  targets[:, :, 1:] = tokens[:, :, None] == tokens[:, None, :-1]
  causal = np.tril(np.ones((seq, seq), bool))
  return targets & causal[None]


def induction_token_scores(pattern: np.ndarray, tokens: np.ndarray) -> np.ndarray:
  """``[layer, heads]`` mean attention to the token after an earlier copy."""
  return _score(pattern, induction_targets(tokens))


def repeated_tokens(
  vocab_size: int,
  length: int,
  *,
  batch: int = 4,
  seed: int = 0,
  bos_id: int = 2,
  low: int = 4,
) -> np.ndarray:
  """``[batch, 1 + 2·length]``: BOS, ``length`` random tokens, the same again.

  Tokens are drawn uniformly from ``[low, vocab_size)`` (skipping special
  ids below ``low``).
  """
  if length < 2 or not 0 <= low < vocab_size - 1:
    raise errors.InputError(
      f"length={length} must be >= 2 and low={low} in 0..{vocab_size - 2}."
    )
  rng = np.random.default_rng(seed)
  half = rng.integers(low, vocab_size, (batch, length))
  bos = np.full((batch, 1), bos_id)
  return np.concatenate([bos, half, half], axis=1).astype(np.int32)


def _token_losses(model: Any, tokens: Any) -> jax.Array:
  logits = model(tokens).unwrap("batch", "seq", "vocabulary").astype(jnp.float32)
  logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
  ids = tokens.unwrap("batch", "seq")[:, 1:]
  return -jnp.take_along_axis(logp, ids[..., None], axis=-1)[..., 0]


def token_losses(model: Any, tokens: Any, *, tokenizer: Any = None) -> np.ndarray:
  """``[batch, seq − 1]`` next-token cross-entropy (nats), one jitted call.

  The model must not hold captures (use it before `gemma_surgery.capture`).
  """
  ids = token_batch(model, tokens, tokenizer)
  return to_numpy(run_frozen(model, _token_losses, named_tokens(ids)))


@dataclasses.dataclass(frozen=True)
class InductionResult:
  """Induction on repeated random sequences (see `induction_scores`).

  Attributes:
    tokens: ``[batch, 1 + 2·length]`` the sequences.
    length: Length of one repeat.
    scores: ``[layer, heads]`` mean attention from each second-repeat token
      to the token after its first occurrence.
    loss_first: Mean next-token loss over the first repeat (unpredictable).
    loss_second: Mean loss over the second repeat (predictable by copying).
  """

  tokens: np.ndarray
  length: int
  scores: np.ndarray
  loss_first: float
  loss_second: float

  def best_heads(self, n: int = 3) -> list[tuple[int, int, float]]:
    """The ``n`` highest-scoring heads as ``(layer, head, score)``."""
    flat = np.argsort(-self.scores, axis=None, kind="stable")[:n]
    layers, heads = np.unravel_index(flat, self.scores.shape)
    return [
      (int(a), int(b), float(self.scores[a, b]))
      for a, b in zip(layers, heads, strict=True)
    ]


def repeat_losses(losses: np.ndarray, length: int) -> tuple[float, float]:
  """Mean loss predicting the first repeat's tokens 2.. and the second repeat.

  ``losses[:, t]`` is the loss of predicting token ``t + 1``; the first
  repeat occupies positions ``1..length``, the second ``length + 1..2·length``.
  The first token of each repeat is excluded (not predictable in the first,
  the boundary in the second).
  """
  first = losses[:, 1:length].mean()
  second = losses[:, length + 1 : 2 * length].mean()
  return float(first), float(second)


def induction_scores(
  model: Any, *, length: int = 32, batch: int = 4, seed: int = 0, bos_id: int = 2
) -> InductionResult:
  """Scores every head for induction on ``[BOS, r, r]`` random sequences.

  The score of a head is its mean attention from second-repeat position
  ``q`` (token ``r_i``) to position ``q − length + 1`` (``r_{i+1}`` in the
  first repeat), the key an induction head copies from.
  """
  tokens = repeated_tokens(
    model.metadata.vocab_size, length, batch=batch, seed=seed, bos_id=bos_id
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
  model: Any, heads: list[tuple[int, int]], tokens: np.ndarray, length: int
) -> dict[str, float]:
  """Second-repeat loss with and without knocking out ``heads``.

  Returns:
    ``{"clean": …, "knocked_out": …, "increase": knocked_out − clean}``.
  """
  clean = repeat_losses(token_losses(model, tokens), length)[1]
  knocked = repeat_losses(token_losses(knock_out(model, heads), tokens), length)[1]
  return {"clean": clean, "knocked_out": knocked, "increase": knocked - clean}
