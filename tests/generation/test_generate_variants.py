"""Whole-run captures == uncached pass on Gemma 3 and Gemma 1 MQA fixtures.

Gemma 3: QK-norm, 5 local : 1 global layers (window 8); Gemma 1 MQA: one
shared kv head, so ``attn.k`` has a ``heads`` axis of size 1.
"""

from __future__ import annotations

import pytest
from helpers.generation import (
  PADDED_ROWS,
  check_against_uncached,
  load,
  richly_patched,
)

import gemma_surgery as gs


@pytest.mark.parametrize("variant", ["gemma3", "gemma1_mqa"])
def test_float32_captures_match_uncached_to_rounding(variant):
  model, acts = richly_patched(load(variant), 4.0)
  result = gs.generate(model, PADDED_ROWS, max_new_tokens=30)
  assert set(result.captures.keys()) == set(acts.keys())
  if variant == "gemma1_mqa":
    assert result.captures["attn.k", -1 % 3].named_shape["heads"] == 1
  check_against_uncached(model, acts, result)
