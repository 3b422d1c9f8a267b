"""Streaming generation: chunks as they are decoded == the fused loop's tokens.

The reference is `gs.generate` (the fused ``while_loop``) with the same
arguments; the chunked loop compiles once for every chunk and call.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.generation import chunked

PROMPTS = ["The cat sat on", "Once upon a time there"]
NEW = 12


@pytest.fixture(scope="module")
def lm():
  return gs.load("tiny", progress=False)


def _vector():
  rng = np.random.default_rng(1)
  return pz.nx.wrap(jnp.asarray(rng.standard_normal(256), jnp.float32)).tag("embedding")


def _per_row(lm, scales):
  vector = _vector()
  return gs.stack_rows([gs.steer(lm.model, "resid_post", 2, vector, s) for s in scales])


def _joined(chunks):
  return np.concatenate([c.tokens for c in chunks], axis=1)


@pytest.mark.parametrize(
  "sampling", [{}, {"temperature": 0.9, "top_p": 0.9, "seed": 3}]
)
def test_chunks_concatenate_to_generate_with_per_row_edits(lm, sampling):
  scales = [-12.0, 0.0, 12.0]
  model = _per_row(lm, scales)
  prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
  args = dict(max_new_tokens=NEW, tokenizer=lm.tokenizer, **sampling)
  ref = gs.generate(model, prompts, **args)
  chunks = list(gs.generate_stream(model, prompts, chunk_tokens=5, **args))
  # First the prompt's token, then chunks of 5 (the last one shorter).
  assert [c.start for c in chunks] == [0, 1, 6, 11]
  assert [c.tokens.shape[1] for c in chunks] == [1, 5, 5, 1]
  assert [c.last for c in chunks] == [False, False, False, True]
  np.testing.assert_array_equal(_joined(chunks), ref.tokens)
  np.testing.assert_array_equal(chunks[-1].lengths, ref.lengths)
  # Negative control: the rows' edits really differ.
  assert len({tuple(r) for r in ref.tokens[[0, 2]]}) == 2


def test_first_chunk_comes_before_the_rest_is_decoded_and_one_compile(lm):
  model = _per_row(lm, [4.0, -4.0])
  args = dict(max_new_tokens=NEW, tokenizer=lm.tokenizer, chunk_tokens=2)
  before = chunked.trace_counts()
  stream = gs.generate_stream(model, PROMPTS, **args)
  first = next(stream)
  # The generator stopped after the prompt: one token per row, more to come.
  assert first.tokens.shape == (2, 1) and not first.last
  assert (first.lengths == 1).all()
  rest = list(stream)
  assert len(rest) == 6  # 11 more tokens, 2 per chunk
  # Other edit values and chunk size: no new compilation of either step.
  mid = chunked.trace_counts()
  again = list(
    gs.generate_stream(
      _per_row(lm, [-4.0, 4.0]), PROMPTS, **{**args, "chunk_tokens": 3}
    )
  )
  after = chunked.trace_counts()
  assert after == mid and after["advance"] - before["advance"] <= 1
  assert not np.array_equal(_joined(again), _joined([first, *rest]))


def test_eos_stops_rows_and_the_stream(lm):
  ref = gs.generate(lm.model, PROMPTS, max_new_tokens=NEW, tokenizer=lm.tokenizer)
  eos = int(ref.tokens[0, 2])  # row 0 "ends" at its third token
  args = dict(max_new_tokens=NEW, tokenizer=lm.tokenizer, eos_id=eos)
  expected = gs.generate(lm.model, PROMPTS, **args)
  chunks = list(gs.generate_stream(lm.model, PROMPTS, chunk_tokens=4, **args))
  joined = _joined(chunks)
  np.testing.assert_array_equal(joined, expected.tokens[:, : joined.shape[1]])
  assert (expected.tokens[:, joined.shape[1] :] == 0).all()
  np.testing.assert_array_equal(chunks[-1].lengths, expected.lengths)
  assert chunks[-1].done[0] and chunks[-1].lengths[0] == 3


def test_bad_arguments(lm):
  with pytest.raises(gs.InputError, match="chunk_tokens"):
    next(gs.generate_stream(lm.model, PROMPTS, max_new_tokens=4, chunk_tokens=0))
  captured, _ = gs.capture(lm.model, "resid_post", [1])
  with pytest.raises(gs.SurgeryError, match="capture layers"):
    next(
      gs.generate_stream(captured, PROMPTS, max_new_tokens=4, tokenizer=lm.tokenizer)
    )
