"""`GenerationResult.mask`, ``captures.masked`` and ``return_logits=True``.

The logits `generate` returns are checked against one uncached forward pass
over the final sequences; the mask of real tokens against the prompts'
lengths and where EOS first appears in an unstopped run.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.generation import PADDED_ROWS, uncached_pass
from helpers.paths import HF_FIXTURES

import gemma_surgery as gs
from gemma_surgery import errors

NEW = 6


@pytest.fixture(scope="module")
def base():
  return gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False).model


def test_returned_logits_match_an_uncached_forward(base):
  result = gs.generate(base, PADDED_ROWS, max_new_tokens=NEW, return_logits=True)
  assert dict(result.logits.named_shape) == {"batch": 2, "seq": NEW, "vocabulary": 512}
  logits = np.asarray(result.logits.unwrap("batch", "seq", "vocabulary"))
  # Greedy: each new token is the argmax of the logits it was chosen from.
  np.testing.assert_array_equal(logits.argmax(-1), result.tokens)
  patched, acts = gs.capture(base, "logits")
  uncached_pass(patched, result)
  full = np.asarray(acts["logits"].unwrap("batch", "seq", "vocabulary"))
  width = result.prompt.shape[1]
  expected = full[:, width - 1 : width - 1 + NEW]
  np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=1e-4)
  assert gs.generate(base, PADDED_ROWS, max_new_tokens=NEW).logits is None


def test_return_logits_must_be_a_bool(base):
  with pytest.raises(errors.InputError, match="return_logits"):
    gs.generate(base, PADDED_ROWS, max_new_tokens=2, return_logits="yes")


def test_mask_and_masked_captures_leave_out_padding_and_post_eos(base):
  free = gs.generate(base, PADDED_ROWS, max_new_tokens=NEW)
  eos = int(free.tokens[0, 2])  # row 0 stops at its first occurrence
  stop = [
    int(np.argmax(row == eos)) + 1 if (row == eos).any() else NEW for row in free.tokens
  ]
  model, acts = gs.capture(base, ["resid_post", "logits"], 1)
  result = gs.generate(
    model, PADDED_ROWS, max_new_tokens=NEW, eos_id=eos, captures=acts
  )
  np.testing.assert_array_equal(result.lengths, stop)
  width = max(len(row) for row in PADDED_ROWS)
  expected = np.zeros((2, width + NEW), bool)
  for b, row in enumerate(PADDED_ROWS):
    expected[b, width - len(row) : width + stop[b]] = True
  np.testing.assert_array_equal(result.mask, expected)

  captures = result.captures
  raw = np.asarray(captures["resid_post", 1].unwrap("batch", "seq", "embedding"))
  real = expected[:, : raw.shape[1]]
  assert (~real).any()
  masked = captures.masked("resid_post", 1).unwrap("batch", "seq", "embedding")
  masked = np.asarray(masked)
  np.testing.assert_array_equal(masked[real], raw[real])
  assert not masked[~real].any() and np.abs(raw[~real]).max() > 0
  logits = np.asarray(captures.masked("logits").unwrap("batch", "seq", "vocabulary"))
  assert not logits[~real].any()
