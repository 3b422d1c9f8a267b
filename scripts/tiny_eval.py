"""Evaluation of the embedded "tiny" model, shared by the training scripts.

The tests (``tests/test_tiny.py``) recompute the same quantities
independently; these functions produce the numbers in the manifest.
"""

from __future__ import annotations

import numpy as np
from penzai import pz

import gemma_surgery as gs

INDUCTION_SPAN = 24
INDUCTION_BATCH = 16
INDUCTION_SEED = 1234
FIRST_ORDINARY_ID = 262


def named(tokens: np.ndarray) -> pz.nx.NamedArray:
  return pz.nx.wrap(np.asarray(tokens)).tag("batch", "seq")


def nll(model, rows: np.ndarray, batch: int = 32) -> np.ndarray:
  """``[rows, seq]`` next-token NLLs of ``[rows, seq + 1]`` token rows."""
  fwd = gs.jit_forward(model)
  out = []
  for i in range(0, len(rows), batch):
    chunk = rows[i : i + batch]
    logits = np.asarray(fwd(named(chunk[:, :-1])).unwrap("batch", "seq", "vocabulary"))
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    out.append(-np.take_along_axis(logp, chunk[:, 1:, None], -1)[..., 0])
  return np.concatenate(out)


def unigram_entropy(rows: np.ndarray, vocab: int) -> float:
  """Loss of the best unigram model of the predicted tokens: their entropy."""
  counts = np.bincount(rows[:, 1:].ravel(), minlength=vocab).astype(np.float64)
  p = counts[counts > 0] / counts.sum()
  return float(-(p * np.log(p)).sum())


def induction_tokens(vocab: int) -> np.ndarray:
  """``[batch, 1 + 2·span]``: BOS, a random span, the same span again."""
  rng = np.random.default_rng(INDUCTION_SEED)
  span = rng.integers(FIRST_ORDINARY_ID, vocab, (INDUCTION_BATCH, INDUCTION_SPAN))
  bos = np.full((INDUCTION_BATCH, 1), 2)
  return np.concatenate([bos, span, span], axis=1).astype(np.int32)


def induction_scores(model, tokens: np.ndarray) -> np.ndarray:
  """``[layer, head]`` mean attention from each second-repeat token to the
  token after its previous occurrence (``kv = q − span + 1``)."""
  span = (tokens.shape[1] - 1) // 2
  patched, acts = gs.capture(model, "attn.pattern")
  gs.jit_forward(patched)(named(tokens))
  q = np.arange(1 + span, 1 + 2 * span)
  scores = []
  for layer in acts.layers("attn.pattern"):
    pattern = gs.heads.to_user_heads(acts["attn.pattern", layer])
    a = np.asarray(pattern.unwrap("batch", "heads", "seq", "kv_seq"))
    scores.append(a[:, :, q, q - span + 1].mean(axis=(0, 2)))
  return np.stack(scores)


def second_repeat_loss(model, tokens: np.ndarray) -> float:
  """Mean NLL of the second repeat's tokens (after its first one)."""
  span = (tokens.shape[1] - 1) // 2
  return float(nll(model, tokens)[:, span + 1 :].mean())
