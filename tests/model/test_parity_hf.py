"""Parity of our Penzai Gemma 1/2/3 with Hugging Face `transformers`.

Golden logits and greedy continuations were produced by
``scripts/make_hf_golden.py`` running `transformers` (float32, eager
attention). A live comparison against `transformers` also runs whenever it
imports. Negative controls show that the comparison detects a wrong sliding
window, query scale or RoPE scaling.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES, HF_VARIANTS
from penzai import pz

import gemma_surgery
from gemma_surgery.generation.api import greedy_generate
from gemma_surgery.loading import hf, hf_config, params

TOLERANCE = 1e-4


def _logits(model, tokens) -> np.ndarray:
  named = pz.nx.wrap(jnp.asarray(tokens, jnp.int32)).tag("batch", "seq")
  return np.asarray(model(named).unwrap("batch", "seq", "vocabulary"))


def _golden(variant):
  return np.load(HF_FIXTURES / variant / "golden.npz", allow_pickle=False)


@pytest.fixture(scope="module", params=HF_VARIANTS)
def loaded(request):
  return request.param, gemma_surgery.load(
    HF_FIXTURES / request.param, dtype="float32", progress=False
  )


def test_logits_match_golden(loaded):
  variant, lm = loaded
  golden = _golden(variant)
  diff = np.abs(_logits(lm.model, golden["tokens"]) - golden["logits"]).max()
  assert diff <= TOLERANCE, f"{variant}: max |diff| {diff}"


def test_greedy_matches_golden(loaded):
  variant, lm = loaded
  golden = _golden(variant)
  new = golden["greedy"].shape[1]
  assert new >= 32
  # Prompt (8) + 40 new tokens runs far past the sliding window (8).
  out = greedy_generate(lm.model, golden["prompt"], max_new_tokens=new)
  np.testing.assert_array_equal(out, golden["greedy"])


def _reload(variant, **config_changes):
  directory = HF_FIXTURES / variant
  config = hf_config.config_from_hf(hf_config.read_config_json(directory))
  config = dataclasses.replace(config, **config_changes)
  canonical = hf.read_hf_params(directory, config, progress=False)
  return params.bind_parameters(config, canonical)


@pytest.mark.parametrize(
  "variant,change",
  [
    ("gemma2", {"sliding_window": 9}),
    ("gemma2", {"query_pre_attn_scalar": 16.0}),
    ("gemma2", {"attn_logits_soft_cap": None}),
    ("gemma3", {"sliding_window": 9}),
    ("gemma3", {"rope_global_scale": 1.0}),
    ("gemma3", {"rope_global_base": 10_000.0}),
  ],
)
def test_negative_controls_are_detected(variant, change):
  """A wrong window, query scale, soft cap or RoPE must break parity."""
  golden = _golden(variant)
  diff = np.abs(
    _logits(_reload(variant, **change), golden["tokens"]) - golden["logits"]
  )
  assert diff.max() > 100 * TOLERANCE, f"{change} went unnoticed ({diff.max()})"


def test_old_and_new_config_schemas_agree():
  new = hf_config.config_from_hf(hf_config.read_config_json(HF_FIXTURES / "gemma3"))
  old = hf_config.config_from_hf(
    hf_config.read_config_json(HF_FIXTURES / "gemma3_old_schema_config.json")
  )
  assert old == new
  assert new.rope_global_scale == 8.0 and new.rope_local_scale == 1.0
  assert new.rope_global_base == 1e6 and new.rope_local_base == 1e4
  assert new.attention_types == ("local",) * 5 + ("global",)


# --- Live comparison with transformers (runs in CI, where it imports). -----


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_live_transformers_parity(variant):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  directory = HF_FIXTURES / variant
  reference = transformers.AutoModelForCausalLM.from_pretrained(
    directory, torch_dtype=torch.float32, attn_implementation="eager"
  ).eval()
  rng = np.random.default_rng(7)
  tokens = rng.integers(4, 512, size=(3, 40)).astype(np.int32)
  tokens[:, 0] = 2
  with torch.no_grad():
    expected = reference(torch.from_numpy(tokens).long()).logits.numpy()
  ours = gemma_surgery.load(directory, dtype="float32", progress=False)
  diff = np.abs(_logits(ours.model, tokens) - expected).max()
  assert diff <= TOLERANCE, f"{variant}: max |diff| {diff}"

  prompt = tokens[:1, :6]
  with torch.no_grad():
    ref_out = reference.generate(
      torch.from_numpy(prompt).long(),
      max_new_tokens=36,
      min_new_tokens=36,
      do_sample=False,
      eos_token_id=None,
      pad_token_id=0,
    )[:, 6:].numpy()
  out = greedy_generate(ours.model, prompt, max_new_tokens=36)
  np.testing.assert_array_equal(out, ref_out)
