"""Kaggle/Flax checkpoints: bad inputs raise typed errors that name the problem."""

from __future__ import annotations

import gc
import os
import pathlib
import time

import numpy as np
import pytest
from helpers import kaggle_writers as writers

from gemma_surgery import errors
from gemma_surgery.loading import kaggle


def shapes_differ():
  return pytest.warns(UserWarning, match="shapes differ from variant")


def _read(path, variant="gemma2_2b", **kwargs):
  return kaggle.read_kaggle_checkpoint(path, variant=variant, progress=False, **kwargs)


@pytest.fixture(name="gemma2_flat")
def _gemma2_flat():
  cfg = writers.tiny_config("gemma2")
  return cfg, writers.to_flat(cfg, writers.random_params(cfg))


@pytest.fixture(name="written")
def _written(tmp_path, gemma2_flat) -> pathlib.Path:
  return writers.save(gemma2_flat[1], tmp_path / "ckpt")


def test_missing_path(tmp_path):
  with pytest.raises(errors.CheckpointError, match="does not exist"):
    _read(tmp_path / "nope")


def test_file_instead_of_folder(tmp_path):
  (tmp_path / "tokenizer.model").write_bytes(b"x")
  with pytest.raises(errors.CheckpointError, match="is a file"):
    _read(tmp_path / "tokenizer.model")


def test_folder_without_orbax_checkpoint(tmp_path):
  (tmp_path / "README.md").write_text("hello")
  with pytest.raises(errors.CheckpointError, match="No orbax checkpoint") as e:
    _read(tmp_path)
  assert "_METADATA" in str(e.value)


@pytest.mark.parametrize("also_step_metadata", [False, True])
def test_orbax_folder_without_metadata(written, also_step_metadata):
  os.remove(written / "_METADATA")
  if also_step_metadata:
    os.remove(written / "_CHECKPOINT_METADATA")
  with pytest.raises(errors.CheckpointError, match="has no orbax _METADATA") as e:
    _read(written)
  assert str(written) in str(e.value)
  assert ("_CHECKPOINT_METADATA" in str(e.value)) == also_step_metadata
  # Also when given the download root that holds it.
  with pytest.raises(errors.CheckpointError, match="has no orbax _METADATA"):
    _read(written.parent)


def test_corrupt_metadata_file(written):
  (written / "_METADATA").write_text('{"tree_metadata": ')
  with pytest.raises(errors.CheckpointError, match="_METADATA") as e:
    _read(written)
  assert "corrupt" in str(e.value)


def _data_files(directory: pathlib.Path) -> list[pathlib.Path]:
  files = [p for p in directory.rglob("*") if p.is_file() and p.parent.name == "d"]
  return sorted(files, key=lambda p: p.stat().st_size)


# Tensorstore's error path may leave an "Event loop is closed" behind.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:.*shapes differ from variant")
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_data(written, damage):
  biggest = _data_files(written)[-1]
  if damage == "truncate":
    with open(biggest, "r+b") as f:
      f.truncate(biggest.stat().st_size // 2)
  else:
    for path in _data_files(written):
      path.unlink()
  with pytest.raises(errors.CheckpointError) as e:
    _read(written)
  message = str(e.value)
  time.sleep(0.3)  # Let the aborted reads' callbacks fire inside this test.
  gc.collect()
  assert str(written) in message
  assert "truncated or corrupt" in message


def test_missing_weight_in_a_layer(tmp_path, gemma2_flat):
  _, tree = gemma2_flat
  del tree["transformer/layer_1/attn/q_einsum"]
  path = writers.save(tree, tmp_path / "ckpt")
  with shapes_differ(), pytest.raises(errors.CheckpointError) as e:
    _read(path)
  assert "transformer/layer_1/attn/q_einsum" in str(e.value)


def test_missing_layer(tmp_path, gemma2_flat):
  _, tree = gemma2_flat
  for key in [k for k in tree if k.startswith("transformer/layer_2/")]:
    del tree[key]
  path = writers.save(tree, tmp_path / "ckpt")
  with pytest.raises(errors.CheckpointError, match="layer_2") as e:
    _read(path)
  assert "missing" in str(e.value)


def test_missing_embedder(tmp_path, gemma2_flat):
  _, tree = gemma2_flat
  del tree["transformer/embedder"]
  path = writers.save(tree, tmp_path / "ckpt")
  with pytest.raises(errors.CheckpointError, match="embedder/input_embedding"):
    _read(path)


def test_layer_with_inconsistent_shape(tmp_path, gemma2_flat):
  _, tree = gemma2_flat
  q = tree["transformer/layer_1/attn/q_einsum"]["w"]
  tree["transformer/layer_1/attn/q_einsum"]["w"] = np.asarray(q)[:, :, :4]
  path = writers.save(tree, tmp_path / "ckpt")
  with shapes_differ(), pytest.raises(errors.CheckpointError, match="layer_1/attn/q"):
    _read(path)


def test_wrong_generation_for_explicit_variant(tmp_path):
  cfg = writers.tiny_config("gemma1_mqa")
  path = writers.save(writers.to_flat(cfg, writers.random_params(cfg)), tmp_path / "g1")
  with pytest.raises(errors.CheckpointError, match="post_attention_norm") as e:
    _read(path, "gemma2_2b")
  assert "'gemma2_2b'" in str(e.value)
  cfg = writers.tiny_config("gemma2")
  path = writers.save(writers.to_flat(cfg, writers.random_params(cfg)), tmp_path / "g2")
  with pytest.raises(errors.CheckpointError, match="QK-norm"):
    _read(path, "gemma3_1b")


def test_unsupported_layer_weight(tmp_path, gemma2_flat):
  _, tree = gemma2_flat
  tree["transformer/layer_0/altup/router"] = {"w": np.zeros((4, 32), np.float32)}
  path = writers.save(tree, tmp_path / "ckpt")
  with shapes_differ(), pytest.raises(errors.CheckpointError, match="altup/router"):
    _read(path)


def test_unknown_variant(written):
  with pytest.raises(errors.ConfigError, match="gemma5_2b") as e:
    _read(written, "gemma5_2b")
  assert "gemma2_2b" in str(e.value)  # Lists the valid names.


def test_no_variant_and_no_matching_preset(written):
  with pytest.raises(errors.ConfigError, match="variant=") as e:
    _read(written, None)
  assert "num_layers=4" in str(e.value)
  assert "gemma3_1b" in str(e.value)


def test_bad_dtype(written):
  with shapes_differ(), pytest.raises(errors.ConfigError, match="int8"):
    _read(written, parameter_dtype="int8")
