"""Presets carry the published hyperparameters; configs round-trip."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.config import GemmaConfig, normalize_variant_name
from gemma_surgery.loading import hf_config
from gemma_surgery.surgery import heads

# Parameter counts of the text models as published on the model cards /
# Hugging Face (tied embeddings counted once), in billions.
PUBLISHED_BILLIONS = {
  "gemma_2b": 2.51,
  "gemma_7b": 8.54,
  "gemma2_2b": 2.61,
  "gemma2_9b": 9.24,
  "gemma2_27b": 27.23,
  "gemma3_270m": 0.268,
  "gemma3_1b": 1.00,
  "gemma3_4b": 3.88,
  "gemma3_12b": 11.77,
  "gemma3_27b": 27.01,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED_BILLIONS))
def test_preset_parameter_counts_match_published(name):
  count = gs.preset(name).num_parameters() / 1e9
  assert count == pytest.approx(PUBLISHED_BILLIONS[name], rel=0.01)


def test_preset_architecture_details():
  g2 = gs.preset("gemma2_27b")
  assert g2.query_pre_attn_scalar == 4608 / 32  # (d_model / heads), not head_dim
  assert g2.attention_types[:2] == ("local", "global") and g2.sliding_window == 4096
  g3 = gs.preset("gemma3_4b")
  assert g3.attention_types[:6] == ("local",) * 5 + ("global",)
  assert (g3.rope_global_base, g3.rope_local_base) == (1e6, 1e4)
  assert (g3.rope_global_scale, g3.rope_local_scale) == (8.0, 1.0)
  assert g3.sliding_window == 1024 and gs.preset("gemma3_1b").sliding_window == 512
  assert gs.preset("gemma3_1b").rope_global_scale == 1.0
  assert gs.preset("gemma_7b").num_kv_heads == 16  # MHA
  assert gs.preset("gemma_2b").num_kv_heads == 1  # MQA


@pytest.mark.parametrize(
  "spelling,name",
  [
    ("gemma-2-2b-it", "gemma2_2b"),
    ("gemma-3-1b-pt", "gemma3_1b"),
    ("gemma3-270m", "gemma3_270m"),
    ("Gemma-7B", "gemma_7b"),
  ],
)
def test_variant_spellings(spelling, name):
  assert normalize_variant_name(spelling) == name


def test_to_dict_round_trip():
  config = gs.preset("gemma3_12b", parameter_dtype="bfloat16")
  assert GemmaConfig.from_dict(config.to_dict()) == config
  with pytest.raises(gs.ConfigError, match="Unknown GemmaConfig fields"):
    GemmaConfig.from_dict({**config.to_dict(), "n_layers": 3})


def test_hf_multimodal_config_reads_the_text_config():
  """Gemma 3 4B's Hub config: text fields under text_config, defaults omitted."""
  raw = {
    "model_type": "gemma3",
    "text_config": {
      "model_type": "gemma3_text",
      "hidden_size": 2560,
      "intermediate_size": 10240,
      "num_hidden_layers": 34,
      "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
      "sliding_window": 1024,
    },
    "vision_config": {"hidden_size": 1152},
  }
  config = hf_config.config_from_hf(raw)
  preset = gs.preset("gemma3_4b")
  same = ("num_layers", "embedding_dim", "num_heads", "num_kv_heads", "head_dim")
  for field in (*same, "attention_types", "rope_global_scale", "rope_global_base"):
    assert getattr(config, field) == getattr(preset, field), field
  assert config.vocab_size == 262_208  # the HF multimodal table has image tokens


@settings(max_examples=40, deadline=None)
@given(
  kind=st.sampled_from(["mha", "mqa", "gqa"]),
  groups=st.integers(1, 4),
  per_group=st.integers(1, 4),
  seed=st.integers(0, 2**16),
)
def test_heads_round_trip(kind, groups, per_group, seed):
  """to_user_heads and to_native_heads are inverse; the order is HF's."""
  rng = np.random.default_rng(seed)
  native = {
    "mha": {"heads": groups * per_group},
    "mqa": {"query_heads": groups * per_group},
    "gqa": {"head_groups": groups, "query_heads": per_group},
  }[kind]
  data = rng.standard_normal((*native.values(), 3)).astype(np.float32)
  x = pz.nx.wrap(jnp.asarray(data)).tag(*native, "projection")
  user = heads.to_user_heads(x)
  flat = np.asarray(user.unwrap("heads", "projection"))
  np.testing.assert_array_equal(flat, data.reshape(-1, 3))  # h = g * Q + q
  back = heads.to_native_heads(user, dict(x.named_shape))
  np.testing.assert_array_equal(np.asarray(back.unwrap(*native, "projection")), data)
