"""Gemma 4 Hugging Face checkpoints: multimodal, sharded, and refused ones.

A tiny random checkpoint written by `transformers` (`helpers.gemma4`) is
re-packed as a multimodal ``Gemma4ForConditionalGeneration`` checkpoint
(``model.language_model.`` prefix, a vision tower beside it, the text config
under ``text_config``) and as two safetensors shards with an index; both must
load to exactly the logits of the plain one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

pytest.importorskip("transformers")

from helpers import gemma4 as g4  # noqa: E402

import gemma_surgery as gs  # noqa: E402
from gemma_surgery import cli, errors  # noqa: E402
from gemma_surgery.loading import hf  # noqa: E402


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gemma4_plain")
  g4.write_checkpoint(directory, **g4.ALL_FEATURES)
  lm = gs.load(directory, dtype="float32", progress=False)
  tokens = g4.tokens(2, 12)
  return directory, tokens, g4.logits(lm.model, tokens)


def _tensors(directory):
  return load_file(directory / "model.safetensors")


def test_multimodal_checkpoint_loads_text_weights_only(plain, tmp_path):
  directory, tokens, expected = plain
  text = json.loads((directory / "config.json").read_text())
  tensors = {
    "model.language_model." + k.removeprefix("model."): v
    for k, v in _tensors(directory).items()
    if k.startswith("model.")
  }
  tensors["model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight"] = np.ones(
    (3, 3), np.float32
  )
  tensors["model.embed_vision.embedding_projection.weight"] = np.ones(
    (3, 3), np.float32
  )
  save_file(tensors, tmp_path / "model.safetensors")
  config = {"model_type": "gemma4", "text_config": text, "vision_config": {}}
  (tmp_path / "config.json").write_text(json.dumps(config))
  lm = gs.load(tmp_path, dtype="float32", progress=False)
  np.testing.assert_array_equal(g4.logits(lm.model, tokens), expected)


def test_sharded_checkpoint_equals_single_file(plain, tmp_path):
  directory, tokens, expected = plain
  tensors = _tensors(directory)
  names = sorted(tensors)
  halves = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
  weight_map = {}
  for file, part in halves.items():
    save_file({n: tensors[n] for n in part}, tmp_path / file)
    weight_map.update(dict.fromkeys(part, file))
  (tmp_path / "model.safetensors.index.json").write_text(
    json.dumps({"weight_map": weight_map})
  )
  (tmp_path / "config.json").write_text((directory / "config.json").read_text())
  lm = gs.load(tmp_path, dtype="float32", progress=False)
  np.testing.assert_array_equal(g4.logits(lm.model, tokens), expected)


def test_shared_layers_stale_kv_weights_are_ignored(plain, tmp_path):
  """Checkpoints may keep k/v weights of KV-shared layers; transformers
  ignores them and so do we."""
  directory, tokens, expected = plain
  tensors = _tensors(directory)
  tensors["model.layers.5.self_attn.k_proj.weight"] = np.ones((32, 64), np.float32)
  tensors["model.layers.5.self_attn.k_norm.weight"] = np.ones((32,), np.float32)
  save_file(tensors, tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text((directory / "config.json").read_text())
  lm = gs.load(tmp_path, dtype="float32", progress=False)
  np.testing.assert_array_equal(g4.logits(lm.model, tokens), expected)


@pytest.mark.parametrize(
  "change,match",
  [
    ({"hidden_size_per_layer_input": 16}, "per_layer"),
    ({"num_kv_shared_layers": 1}, "missing"),
    ({"moe_intermediate_size": 32}, "moe/"),
    ({"enable_moe_block": False}, "unexpected"),
    ({"global_head_dim": 64, "per_layer_config": None}, "attn/q"),
    ({"num_experts": 8}, r"layer_0/moe/router.*\(64, 4\).*\(64, 8\)"),
    ({"attention_k_eq_v": False}, r"missing.*layer_2/attn/v"),
    ({"vocab_size_per_layer_input": 64}, r"per_layer_embedder.*\(64, 6, 8\)"),
    (
      {
        "per_layer_config": {
          str(i): {"head_dim": 32, "num_key_value_heads": 2} for i in (2, 5)
        }
      },
      r"layer_2/attn/k",
    ),
  ],
)
def test_config_disagreeing_with_weights_is_a_typed_error(
  plain, tmp_path, change, match
):
  directory, _, _ = plain
  config = json.loads((directory / "config.json").read_text())
  config.update(change)
  if change.get("per_layer_config", 0) is None:
    del config["per_layer_config"]
  (tmp_path / "config.json").write_text(json.dumps(config))
  (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
  with pytest.raises(errors.CheckpointError, match=match):
    gs.load(tmp_path, dtype="float32", progress=False)


@pytest.mark.filterwarnings("ignore::gemma_surgery.errors.ReplicationWarning")
def test_mesh_load_of_a_disagreeing_checkpoint_is_a_typed_error(plain, tmp_path):
  directory, _, _ = plain
  config = json.loads((directory / "config.json").read_text())
  config["moe_intermediate_size"] = 32
  (tmp_path / "config.json").write_text(json.dumps(config))
  (tmp_path / "model.safetensors").symlink_to(directory / "model.safetensors")
  mesh = gs.sharding.make_mesh({"data": 2, "model": 4})
  with pytest.raises(errors.CheckpointError, match=r"layer_0/moe/gate.*\(4, 64, 32\)"):
    gs.load(tmp_path, dtype="float32", mesh=mesh, progress=False)


@pytest.mark.parametrize(
  "config",
  [
    {"model_type": "gemma5_text"},
    {"model_type": "gemma4", "text_config": {"model_type": "gemma5_text"}},
  ],
)
def test_unknown_model_type_is_refused_before_any_weight_is_read(
  tmp_path, config, capsys
):
  (tmp_path / "config.json").write_text(json.dumps(config))  # no weights at all
  with pytest.raises(errors.ConfigError, match="gemma5_text.*gemma4_text"):
    gs.load(tmp_path, progress=False)
  assert cli.main(["info", str(tmp_path)]) == 2
  assert "model_type='gemma5_text'" in capsys.readouterr().err


def test_lazy_reader_equals_eager_reader(plain):
  directory, _, _ = plain
  config = gs.load(directory, dtype="float32", progress=False).config
  eager = hf.read_hf_params(directory, config, progress=False)
  with hf.open_hf_params(directory, config) as lazy:
    assert sorted(lazy) == sorted(eager)
    for name, value in eager.items():
      index = tuple(slice(0, n) for n in value.shape)
      np.testing.assert_array_equal(lazy[name].read(index), value, err_msg=name)
