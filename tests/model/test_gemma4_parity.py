"""Parity of our Penzai Gemma 4 with `transformers`' ``Gemma4ForCausalLM``.

Tiny random checkpoints are written by `transformers` itself
(`helpers.gemma4`) and loaded through `gemma_surgery.load`; logits must agree
to 1e-4 in float32 and greedy continuations of 36 tokens (far past the
sliding windows of 4 and 5) must be identical. Between them the two configs
exercise every Gemma 4 feature; each feature has a negative control: the same
weights with that feature switched off in our model must break the
comparison.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import gemma4 as g4  # noqa: E402

import gemma_surgery  # noqa: E402
from gemma_surgery.generation.api import greedy_generate  # noqa: E402
from gemma_surgery.loading import hf, hf_config, params  # noqa: E402
from gemma_surgery.model import parameters  # noqa: E402

TOLERANCE = 1e-4
CONFIGS = {"all_features": g4.ALL_FEATURES, "dense_mqa": g4.DENSE_MQA}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def checkpoint(request, tmp_path_factory):
  directory = tmp_path_factory.mktemp(request.param)
  reference = g4.write_checkpoint(directory, **CONFIGS[request.param])
  return directory, reference


@pytest.fixture(scope="module")
def all_features(tmp_path_factory):
  directory = tmp_path_factory.mktemp("controls")
  reference = g4.write_checkpoint(directory, **g4.ALL_FEATURES)
  tokens = g4.tokens(3, 20, seed=1)
  return directory, tokens, g4.torch_logits(reference, tokens)


def test_logits_match_transformers(checkpoint):
  directory, reference = checkpoint
  lm = gemma_surgery.load(directory, dtype="float32", progress=False)
  assert lm.config.family == "gemma4"
  tokens = g4.tokens(3, 20)
  diff = np.abs(g4.logits(lm.model, tokens) - g4.torch_logits(reference, tokens))
  assert diff.max() <= TOLERANCE, diff.max()


def test_greedy_continuation_matches_transformers(checkpoint):
  directory, reference = checkpoint
  lm = gemma_surgery.load(directory, dtype="float32", progress=False)
  prompt = g4.tokens(2, 6, seed=3)
  expected = g4.torch_greedy(reference, prompt, 36)
  assert min(len(set(row)) for row in expected) >= 5  # not a degenerate repeat
  np.testing.assert_array_equal(g4.greedy_uncached(lm.model, prompt, 36), expected)
  # The fused KV-cached loop (shared layers read their producer's cache).
  np.testing.assert_array_equal(
    greedy_generate(lm.model, prompt, max_new_tokens=36), expected
  )


def _switched_off(directory, changes: dict, edit=None):
  """Our model on the same weights with ``changes`` to the config.

  Weights the changed config needs but the checkpoint lacks are taken from
  the layer whose keys/values the original shared (KV sharing off) or drawn
  at random (separate values); larger ones are cut to size.
  """
  base = hf_config.config_from_hf(hf_config.read_config_json(directory))
  canonical = hf.read_hf_params(directory, base, progress=False)
  config = dataclasses.replace(base, **changes)
  rng = np.random.default_rng(5)
  fitted = {}
  for name, shape in parameters.expected_shapes(config).items():
    if name in canonical:
      fitted[name] = canonical[name][tuple(slice(0, n) for n in shape)]
      continue
    layer, leaf = name.split("/", 1)
    source = f"layer_{base.kv_source(int(layer.removeprefix('layer_')))}/{leaf}"
    fitted[name] = canonical.get(source, rng.normal(0, 0.2, shape).astype(np.float32))
  if edit is not None:
    edit(fitted)
  return params.bind_parameters(config, fitted)


def _unit_layer_scalars(p):
  for name in p:
    if name.endswith("layer_scalar"):
      p[name] = np.ones_like(p[name])


def _one_plus_w_norms(p):
  for name in p:
    if "norm" in name and "router_norm" not in name:
      p[name] = p[name] + 1.0


CONTROLS = {
  "per-layer embeddings": ({"per_layer_input_dim": 0}, None),
  "KV sharing": ({"num_kv_shared_layers": 0}, None),
  "k = v": ({"k_eq_v_global": False}, None),
  "global head_dim": ({"global_head_dim": None}, None),
  "proportional RoPE": ({"rope_global_proportion": 1.0}, None),
  "sliding window": ({"sliding_window": 64}, None),
  "top-k > 1": ({"top_k_experts": 1}, None),
  "mixture of experts": (
    {"num_experts": 0, "top_k_experts": 0, "expert_hidden_dim": 0},
    None,
  ),
  "double-wide MLP": ({"double_wide_shared_mlp": False}, None),
  "final soft cap": ({"final_logit_softcap": None}, None),
  "layer scalar": ({}, _unit_layer_scalars),
  "norm applies w (not 1 + w)": ({}, _one_plus_w_norms),
}


@pytest.mark.parametrize("feature", sorted(CONTROLS))
def test_negative_controls_break_parity(all_features, feature):
  directory, tokens, expected = all_features
  changes, edit = CONTROLS[feature]
  diff = np.abs(g4.logits(_switched_off(directory, changes, edit), tokens) - expected)
  assert diff.max() > 100 * TOLERANCE, f"{feature} off went unnoticed ({diff.max()})"


def test_unchanged_control_still_matches(all_features):
  """The control machinery itself (no change) keeps parity."""
  directory, tokens, expected = all_features
  diff = np.abs(g4.logits(_switched_off(directory, {}), tokens) - expected)
  assert diff.max() <= TOLERANCE
