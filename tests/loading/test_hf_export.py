"""`save_hf`: our models written as HF checkpoints, read back by us and by
`transformers` (the independent reference)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES, HF_VARIANTS
from penzai import pz

import gemma_surgery as gs
from gemma_surgery import errors
from gemma_surgery.loading.hf_export import save_hf


def _logits(model, tokens):
  named = pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq")
  return np.asarray(model(named).unwrap("batch", "seq", "vocabulary"))


TOKENS = np.array([[2, 17, 99, 3, 250, 41, 41, 7, 300, 12, 17, 99]], np.int32)


@pytest.mark.parametrize("variant", HF_VARIANTS)
def test_round_trip_is_exact(variant, tmp_path):
  lm = gs.load(HF_FIXTURES / variant, dtype="float32", progress=False)
  save_hf(lm.model, tmp_path / "out")
  again = gs.load(tmp_path / "out", dtype="float32", progress=False)
  assert again.config == lm.config
  np.testing.assert_array_equal(_logits(again.model, TOKENS), _logits(lm.model, TOKENS))


def test_transformers_reads_an_exported_random_gemma3(tmp_path):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  config = dataclasses.replace(
    gs.preset("gemma3_1b"),
    num_layers=3,
    embedding_dim=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_hidden_dim=48,
    vocab_size=320,
    attention_types=("local", "local", "global"),
    sliding_window=4,
    query_pre_attn_scalar=8,
    rope_global_scale=4.0,
  )
  model = gs.build_model(config, jax.random.key(3))
  # Random norm gains, so the exported ``w`` of ``1 + w`` is not all zeros.
  rng = np.random.default_rng(1)
  for param in pz.select(model).at_instances_of(pz.Parameter).get_sequence():
    if "scale" in param.label:
      axes = tuple(param.value.named_axes)
      noise = rng.normal(size=param.value.unwrap(*axes).shape).astype(np.float32)
      param.value = param.value + pz.nx.wrap(jnp.asarray(0.3 * noise)).tag(*axes)
  save_hf(model, tmp_path / "ckpt")
  cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
  assert (
    cfg["model_type"] == "gemma3_text" and cfg["layer_types"][-1] == "full_attention"
  )
  reference = transformers.AutoModelForCausalLM.from_pretrained(
    tmp_path / "ckpt", torch_dtype=torch.float32, attn_implementation="eager"
  ).eval()
  tokens = np.random.default_rng(0).integers(3, 320, (2, 11)).astype(np.int32)
  tokens[:, 0] = 2
  with torch.no_grad():
    expected = reference(torch.from_numpy(tokens).long()).logits.numpy()
  assert np.abs(_logits(model, tokens) - expected).max() <= 1e-4


def test_refuses_a_non_empty_folder_and_leaves_nothing_behind(tmp_path):
  lm = gs.load(HF_FIXTURES / "gemma2", dtype="float32", progress=False)
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "x").write_text("x")
  with pytest.raises(errors.InputError, match="not empty"):
    save_hf(lm.model, tmp_path / "busy")
  with pytest.raises(FileNotFoundError):
    save_hf(lm.model, tmp_path / "new", tokenizer_model=tmp_path / "missing.model")
  assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]
