"""`gs.named_tokens`: the {batch, seq} model input, or a clear error."""

from __future__ import annotations

import numpy as np
import pytest

import gemma_surgery as gs


def test_ids_become_the_batch_seq_input():
  ids = [[2, 17, 400], [2, 5, 6]]
  named = gs.named_tokens(ids)
  assert named.named_shape == {"batch": 2, "seq": 3}
  np.testing.assert_array_equal(np.asarray(named.unwrap("batch", "seq")), ids)


@pytest.mark.parametrize(
  ("ids", "words"),
  [
    ([2, 17, 400], "[batch, seq]"),  # one row without a batch axis
    ([[2, 17], [2]], "equal-length"),  # ragged rows
    (np.array([[2.0, 17.7]]), "integers"),  # would truncate 17.7 to 17
    (np.array([[True, False]]), "integers"),
  ],
)
def test_bad_ids_are_a_clear_error(ids, words):
  with pytest.raises(gs.InputError, match=words.replace("[", r"\[")):
    gs.named_tokens(ids)
