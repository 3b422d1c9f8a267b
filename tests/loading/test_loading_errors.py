"""Bad input to the HF loader, the front door and the model gives typed errors."""

from __future__ import annotations

import json
import shutil
import time

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES
from penzai import pz

import gemma_surgery
from gemma_surgery import errors


@pytest.fixture
def hf_copy(tmp_path):
  target = tmp_path / "ckpt"
  shutil.copytree(HF_FIXTURES / "gemma2", target)
  return target


def _load(path, **kw):
  return gemma_surgery.load(path, dtype="float32", progress=False, **kw)


def test_missing_path_is_not_mistaken_for_a_repo(tmp_path):
  with pytest.raises(errors.CheckpointError, match="not an existing path"):
    _load(str(tmp_path / "nope" / "deeper" / "x"))


def test_unknown_variant_name_lists_valid_ones():
  with pytest.raises(
    errors.ConfigError, match="Unknown Gemma variant 'gemma9_1b'.*gemma2_2b"
  ):
    gemma_surgery.preset("gemma9_1b")


def test_no_safetensors(hf_copy):
  (hf_copy / "model.safetensors").unlink()
  with pytest.raises(errors.CheckpointError, match=r"No \*\.safetensors files"):
    _load(hf_copy)


def test_pytorch_bin_is_refused_not_unpickled(hf_copy):
  (hf_copy / "model.safetensors").rename(hf_copy / "pytorch_model.bin")
  with pytest.raises(errors.CheckpointError, match="pickles and are never loaded"):
    _load(hf_copy)


def test_truncated_safetensors(hf_copy):
  data = (hf_copy / "model.safetensors").read_bytes()
  (hf_copy / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(errors.CheckpointError, match="truncated or corrupt"):
    _load(hf_copy)


def test_corrupt_config_json(hf_copy):
  (hf_copy / "config.json").write_text("{not json")
  with pytest.raises(errors.CheckpointError, match="not valid JSON"):
    _load(hf_copy)


def test_shape_mismatch_against_config(hf_copy):
  config = json.loads((hf_copy / "config.json").read_text())
  config["intermediate_size"] = 96
  (hf_copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(
    errors.CheckpointError, match=r"mlp/gate.*\(64, 128\).*needs \(64, 96\)"
  ):
    _load(hf_copy)


def test_missing_layer_in_checkpoint(hf_copy):
  config = json.loads((hf_copy / "config.json").read_text())
  config["num_hidden_layers"] = 5
  config["layer_types"] = config["layer_types"] + ["sliding_attention"]
  (hf_copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(errors.CheckpointError, match=r"missing 11 parameter.*layer_4/"):
    _load(hf_copy)


def test_sharded_index_missing_shard(hf_copy):
  (hf_copy / "model.safetensors").rename(hf_copy / "model-00001-of-00002.safetensors")
  index = {
    "weight_map": {
      "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
      "model.norm.weight": "model-00002-of-00002.safetensors",
    }
  }
  (hf_copy / "model.safetensors.index.json").write_text(json.dumps(index))
  with pytest.raises(errors.CheckpointError, match="model-00002-of-00002.*incomplete"):
    _load(hf_copy)


def test_unsupported_model_type(hf_copy):
  config = json.loads((hf_copy / "config.json").read_text())
  config["model_type"] = "llama"
  (hf_copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(errors.ConfigError, match="model_type='llama'"):
    _load(hf_copy)


def test_unsupported_rope_type(hf_copy):
  config = json.loads((hf_copy / "config.json").read_text())
  config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0}
  (hf_copy / "config.json").write_text(json.dumps(config))
  with pytest.raises(errors.ConfigError, match="Unsupported RoPE type 'yarn'"):
    _load(hf_copy)


def test_inconsistent_config_values():
  base = gemma_surgery.preset("gemma2_2b")
  with pytest.raises(
    errors.ConfigError, match="num_heads=8 is not a multiple of num_kv_heads=3"
  ):
    base.replace(num_kv_heads=3)
  with pytest.raises(errors.ConfigError, match="attention_types has 2 entries"):
    base.replace(attention_types=("local", "global"))
  with pytest.raises(errors.ConfigError, match="parameter_dtype='int8'"):
    base.replace(parameter_dtype="int8")


@pytest.mark.parametrize("bad", [512, -1, 10_000])
def test_token_ids_outside_vocabulary(bad):
  lm = _load(HF_FIXTURES / "gemma1_mqa")
  tokens = np.array([[2, 5, bad, 7]], np.int32)
  with pytest.raises(
    errors.InputError, match=rf"range \[0, 512\): id {bad} at position"
  ):
    lm.model(pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"))
  with pytest.raises(errors.InputError, match=rf"{bad}"):
    gemma_surgery.greedy_generate(lm.model, tokens, max_new_tokens=2)


def test_largest_valid_token_id_is_accepted():
  """Negative control for the vocabulary check: 511 is valid for vocab 512."""
  lm = _load(HF_FIXTURES / "gemma1_mqa")
  out = lm.model(pz.nx.wrap(jnp.array([[2, 511]], jnp.int32)).tag("batch", "seq"))
  assert out.named_shape["vocabulary"] == 512


def test_float_token_ids_are_rejected():
  lm = _load(HF_FIXTURES / "gemma1_mqa")
  with pytest.raises(errors.InputError, match="integer"):
    lm.model(pz.nx.wrap(jnp.array([[2.0, 3.0]])).tag("batch", "seq"))


def test_hub_variant_without_network_fails_fast(monkeypatch, tmp_path):
  monkeypatch.setenv("HF_HOME", str(tmp_path))
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")
  start = time.monotonic()
  with pytest.raises(errors.HubError, match="local checkpoint directory") as info:
    _load("gemma2_2b")
  assert time.monotonic() - start < 10
  assert "google/gemma-2-2b" in str(info.value)


def test_kaggle_without_credentials_via_front_door(monkeypatch, tmp_path):
  for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle"))
  monkeypatch.setenv("HOME", str(tmp_path))
  monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
  with pytest.raises(errors.HubError, match="(?i)credentials"):
    _load("kaggle:google/gemma-2/flax/gemma2-2b-it")


class _BigTokenizer:
  """A duck-typed tokenizer (like the `gemma` package's) with too many ids."""

  bos_id = 2
  vocab_size = 1000

  def encode(self, text, add_bos=False):
    return [2] * add_bos + [5] * len(text)

  def decode(self, ids):
    return "x" * len(ids)


def test_tokenizer_larger_than_model_vocabulary():
  with pytest.raises(errors.TokenizerError, match="1000 tokens.*512"):
    _load(HF_FIXTURES / "gemma2", tokenizer=_BigTokenizer())
