"""Probes of the embedded tiny model shared by its tests."""

from __future__ import annotations

import numpy as np

SPAN = 24  # the span the tour and the manifest probe with (other random ids)
# Every span from 8 to the context limit (2 * 127 + 1 tokens fit 256).
SPANS = (8, 16, 32, 64, 127)
SEQ_LEN = 256  # the embedded model's training context
BATCH = 8
SEED = 7
EVAL_ROWS = 64
FIRST_ORDINARY_ID = 262  # after the 6 special and 256 byte pieces


def induction_batch(vocab: int, span: int = SPAN, *, repeat: bool = True) -> np.ndarray:
  """``[BATCH, 1 + 2·span]``: BOS, a random span of ordinary ids, again.

  With ``repeat=False`` the second half is other random ids (a control).
  """
  rng = np.random.default_rng(SEED)
  first = rng.integers(FIRST_ORDINARY_ID, vocab, (BATCH, span))
  second = first if repeat else rng.integers(FIRST_ORDINARY_ID, vocab, (BATCH, span))
  return np.concatenate([np.full((BATCH, 1), 2), first, second], axis=1)
