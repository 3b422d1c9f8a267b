"""Probes of the embedded tiny model shared by its tests."""

from __future__ import annotations

import numpy as np

SPAN = 24  # the span the tour and the manifest probe with (other random ids)
BATCH = 8
SEED = 7
EVAL_ROWS = 64
FIRST_ORDINARY_ID = 262  # after the 6 special and 256 byte pieces


def induction_batch(vocab: int) -> np.ndarray:
  """``[BATCH, 1 + 2·SPAN]``: BOS, a random span of ordinary ids, again."""
  rng = np.random.default_rng(SEED)
  span = rng.integers(FIRST_ORDINARY_ID, vocab, (BATCH, SPAN))
  return np.concatenate([np.full((BATCH, 1), 2), span, span], axis=1)
