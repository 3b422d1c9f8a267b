"""`gs.generate` on batches: left padding, string prompts, EOS stopping."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.generation import NEW, STRINGS, load, patched, tokenizer

import gemma_surgery as gs


@pytest.fixture(scope="module")
def tok():
  return tokenizer()


@pytest.fixture(scope="module")
def rows(tok):
  rows = tok.encode(STRINGS)
  assert len(rows[0]) < len(rows[1])
  return rows


@pytest.fixture(scope="module")
def model():
  return patched(load())[0]


@pytest.fixture(scope="module")
def greedy(model, rows):
  return gs.generate(model, rows, max_new_tokens=NEW)


def test_batch_rows_equal_single_prompts(model, rows, greedy):
  """Left padding changes nothing: each row as if run alone."""
  width = max(len(r) for r in rows)
  for b, row in enumerate(rows):
    alone = gs.generate(model, [row], max_new_tokens=NEW)
    np.testing.assert_array_equal(alone.tokens[0], greedy.tokens[b])
    for layer in (0, 2):
      got = greedy.captures["resid_post", layer].unwrap("batch", "seq", "embedding")
      want = alone.captures["resid_post", layer].unwrap("batch", "seq", "embedding")
      np.testing.assert_allclose(
        np.asarray(got)[b, width - len(row) :], np.asarray(want)[0], atol=1e-4
      )
  # An array prompt left-padded with pad_id (0) is the same batch.
  padded = np.zeros((2, width), np.int32)
  for b, row in enumerate(rows):
    padded[b, width - len(row) :] = row
  np.testing.assert_array_equal(
    gs.greedy_generate(model, padded, max_new_tokens=NEW), greedy.tokens
  )
  np.testing.assert_array_equal(greedy.prompt, padded)
  assert greedy.sequences() == [
    r + list(t) for r, t in zip(rows, greedy.tokens.tolist(), strict=True)
  ]


def test_string_prompts_and_eos_stopping(model, rows, greedy, tok):
  text = gs.generate(model, STRINGS, max_new_tokens=NEW, tokenizer=tok)
  np.testing.assert_array_equal(text.tokens, greedy.tokens)
  assert text.text == [tok.decode(list(t)) for t in greedy.tokens]
  # An EOS that both rows emit, at different steps.
  first = {t: i for i, t in reversed(list(enumerate(greedy.tokens[0].tolist())))}
  common = [t for t in first if t in greedy.tokens[1].tolist()]
  assert common, "pick other prompts: the rows share no token"
  eos = min(common, key=lambda t: first[t])
  stops = [row.tolist().index(eos) for row in greedy.tokens]
  out = gs.generate(
    model, STRINGS, max_new_tokens=NEW, tokenizer=tok, eos_id=eos, pad_id=5
  )
  for b, stop in enumerate(stops):
    np.testing.assert_array_equal(
      out.tokens[b, : stop + 1], greedy.tokens[b, : stop + 1]
    )
    assert (out.tokens[b, stop + 1 :] == 5).all()
    assert out.lengths[b] == stop + 1
    assert out.text[b] == tok.decode(greedy.tokens[b, :stop].tolist())
  # The loop stopped once both rows were done: captures end there too.
  seq = out.captures["resid_post", 0].named_shape["seq"]
  assert (
    seq == greedy.prompt.shape[1] + max(stops) + 1 < greedy.prompt.shape[1] + NEW + 1
  )
