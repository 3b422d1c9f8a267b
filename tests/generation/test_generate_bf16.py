"""bf16 weights or a bf16 KV cache with float32 activations vs float32.

``gs.load(..., dtype="bfloat16", activation_dtype="float32")`` halves the
bytes a decoding step streams. Rounding the weights moves the logits: on the
random-weight fixtures (logits up to about 30) by at most `LOGIT_TOL`. So the
greedy tokens may differ only where float32's top two logits are near-tied:
each row must agree with float32 until a step whose float32 top-2 gap is below
`GAP_TOL`, and at least 16 tokens with a larger gap must be compared.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import gemma4
from helpers.generation import random_tokens
from helpers.paths import HF_FIXTURES
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.model import caching

LOGIT_TOL = 1.0  # max |bf16 - float32| logit while the contexts agree
GAP_TOL = 0.5  # tokens may differ only where float32's top-2 gap is below this
NEW = 32


def _logits(result):
  return np.asarray(result.logits.unwrap("batch", "seq", "vocabulary"))


def _agree_away_from_ties(a, b, prompt):
  """Checks ``b`` (rounded) against ``a`` (float32) as the module says."""
  la, lb = _logits(a), _logits(b)
  assert lb.dtype == np.float32  # activations stay float32
  top2 = np.sort(la, axis=-1)[..., -2:]
  gap = top2[..., 1] - top2[..., 0]
  compared, worst = 0, 0.0
  for row in range(prompt.shape[0]):
    differs = np.flatnonzero(a.tokens[row] != b.tokens[row])
    end = int(differs[0]) if differs.size else NEW
    if end < NEW:
      assert gap[row, end] < GAP_TOL, (row, end, gap[row, end])
    compared += int((gap[row, :end] >= GAP_TOL).sum())
    # Logits of steps whose context is still the same (the diverging one too).
    worst = max(worst, float(np.abs(la[row, : end + 1] - lb[row, : end + 1]).max()))
  assert compared >= 16
  assert 0 < worst < LOGIT_TOL  # > 0: something really was rounded


@pytest.mark.parametrize("variant", ["gemma2", "gemma3"])
def test_bf16_weights_give_float32_tokens_away_from_ties(variant):
  full = gs.load(HF_FIXTURES / variant, dtype="float32", progress=False).model
  half = gs.load(
    HF_FIXTURES / variant, dtype="bfloat16", activation_dtype="float32", progress=False
  ).model
  assert {str(p.value.dtype) for p in pz.unbind_params(half)[1]} == {"bfloat16"}
  prompt = random_tokens(4, 8)
  a = gs.generate(full, prompt, max_new_tokens=NEW, return_logits=True)
  b = gs.generate(half, prompt, max_new_tokens=NEW, return_logits=True)
  _agree_away_from_ties(a, b, prompt)


def _cache_dtypes(model, dtype):
  cached = caching.kv_caching_lm(
    model, cache_len=8, batch_axes={"batch": 1}, cache_dtype=dtype
  )
  _, variables = pz.unbind_variables(cached)
  return {
    str(leaf.dtype)
    for var in variables
    if str(var.label).rsplit("/", 1)[-1].startswith("cache_")
    and not str(var.label).endswith("end_index")
    for leaf in jax.tree_util.tree_leaves(var.value)
  }


@pytest.mark.parametrize("variant", ["gemma2", "gemma3", "gemma4"])
def test_bf16_kv_cache_gives_float32_tokens_away_from_ties(variant, tmp_path):
  if variant == "gemma4":  # KV sharing: shared layers read the bf16 cache
    gemma4.write_checkpoint(tmp_path, **gemma4.ALL_FEATURES)
    source = tmp_path
  else:
    source = HF_FIXTURES / variant
  model = gs.load(source, dtype="float32", progress=False).model
  assert _cache_dtypes(model, "bfloat16") == {"bfloat16"}
  assert _cache_dtypes(model, None) == {"float32"}
  prompt = gemma4.tokens(4, 8) if variant == "gemma4" else random_tokens(4, 8)
  a = gs.generate(model, prompt, max_new_tokens=NEW, return_logits=True)
  b = gs.generate(
    model, prompt, max_new_tokens=NEW, return_logits=True, kv_cache_dtype="bfloat16"
  )
  _agree_away_from_ties(a, b, prompt)


def test_kv_cache_dtype_is_validated():
  model = gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False).model
  with pytest.raises(gs.errors.InputError, match="kv_cache_dtype='int8'.*bfloat16"):
    gs.generate(model, [[1, 2]], max_new_tokens=2, kv_cache_dtype="int8")
