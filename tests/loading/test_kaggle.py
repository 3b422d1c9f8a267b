"""Kaggle/Flax orbax checkpoints: every layout round-trips to canonical params."""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import kaggle_writers as writers
from penzai import pz

from gemma_surgery import config, errors
from gemma_surgery.loading import kaggle, params
from gemma_surgery.model import parameters


def shapes_differ():
  """The warning of a read whose sizes differ from the named variant's."""
  return pytest.warns(UserWarning, match="shapes differ from variant")


def write(path: pathlib.Path, tree) -> pathlib.Path:
  return writers.save(tree, path)


def read(path, variant, **kwargs):
  with shapes_differ():
    return kaggle.read_kaggle_checkpoint(
      path, variant=variant, progress=False, **kwargs
    )


def assert_same_params(got, want):
  assert sorted(got) == sorted(want)
  for name, value in want.items():
    assert got[name].dtype == value.dtype, name
    np.testing.assert_array_equal(got[name], value, err_msg=name)


def logits_pair(cfg, a, b) -> tuple[np.ndarray, np.ndarray]:
  """Logits of the models bound from ``a`` and ``b``, one compilation."""
  unbound, frozen_a = pz.unbind_params(params.bind_parameters(cfg, a), freeze=True)
  _, frozen_b = pz.unbind_params(params.bind_parameters(cfg, b), freeze=True)

  @jax.jit
  def run(frozen, tokens):
    model = pz.bind_variables(unbound, frozen)
    return model(tokens).unwrap("batch", "seq", "vocabulary")

  ids = np.random.default_rng(1).integers(0, cfg.vocab_size, size=(2, 9))
  tokens = pz.nx.wrap(jnp.asarray(ids, jnp.int32)).tag("batch", "seq")
  return np.asarray(run(frozen_a, tokens)), np.asarray(run(frozen_b, tokens))


ROUNDTRIPS = {
  "flat-gemma1-mha": ("gemma1_mha", "flat", {}),
  "flat-gemma1-mqa": ("gemma1_mqa", "flat", {}),
  "flat-gemma1-mqa-squeezed": ("gemma1_mqa", "flat", {"squeeze_mqa": True}),
  "flat-gemma2": ("gemma2", "flat", {}),
  "flat-gemma2-9b-transposed": ("gemma2_9b", "flat", {"transpose_gating": True}),
  "flat-gemma3-vision": (
    "gemma3",
    "flat",
    {"transpose_gating": True, "with_vision": True},
  ),
  "flat-gemma3-mqa": ("gemma3_mqa", "flat", {"transpose_gating": True}),
  "nested-gemma1-mha": ("gemma1_mha", "nested", {}),
  "nested-gemma2": ("gemma2", "nested", {}),
  "nested-gemma3-no-outer": (
    "gemma3",
    "nested",
    {"outer": False, "transpose_gating": True},
  ),
  "stacked-gemma3-p6-uneven": ("gemma3", "stacked", {"pattern_len": 6}),
  "stacked-gemma3-p6-nested": (
    "gemma3",
    "stacked",
    {"pattern_len": 6, "nested": True},
  ),
  "stacked-gemma2-p2": ("gemma2", "stacked", {"pattern_len": 2}),
  "stacked-gemma3-single-axis": ("gemma3_mqa", "stacked", {"pattern_len": None}),
}
_WRITERS = {
  "flat": writers.to_flat,
  "nested": writers.to_nested,
  "stacked": writers.to_stacked,
}


@pytest.mark.parametrize("case", list(ROUNDTRIPS))
def test_layout_roundtrip_is_exact(tmp_path, case):
  name, layout, kwargs = ROUNDTRIPS[case]
  cfg = writers.tiny_config(name)
  original = writers.random_params(cfg)
  path = write(tmp_path / "ckpt", _WRITERS[layout](cfg, original, **kwargs))
  got_cfg, got = read(path, writers.TINY[name][0])
  assert got_cfg == cfg
  assert_same_params(got, original)


@pytest.mark.parametrize(
  "case",
  [
    "flat-gemma1-mha",
    "flat-gemma1-mqa-squeezed",
    "flat-gemma2-9b-transposed",
    "stacked-gemma3-p6-uneven",
  ],
)
def test_loaded_model_logits_match(tmp_path, case):
  name, layout, kwargs = ROUNDTRIPS[case]
  cfg = writers.tiny_config(name)
  original = writers.random_params(cfg, seed=3)
  path = write(tmp_path / "ckpt", _WRITERS[layout](cfg, original, **kwargs))
  got_cfg, got = read(path, writers.TINY[name][0])
  want, have = logits_pair(got_cfg, original, got)
  assert want.shape == (2, 9, cfg.vocab_size)
  np.testing.assert_allclose(have, want, atol=1e-5, rtol=0)


def test_square_mlp_gating_follows_variant_negative_control(tmp_path):
  # D == F: the shape cannot tell the orientation, the variant decides.
  cfg = writers.tiny_config("gemma3", mlp_hidden_dim=32)
  original = writers.random_params(cfg, seed=4)
  right = write(
    tmp_path / "right", writers.to_flat(cfg, original, transpose_gating=True)
  )
  _, got = read(right, "gemma3_1b")
  assert_same_params(got, original)
  # Written un-transposed but read as Gemma 3 (transposed): wrong weights.
  wrong = write(tmp_path / "wrong", writers.to_flat(cfg, original))
  _, bad = read(wrong, "gemma3_1b")
  np.testing.assert_array_equal(bad["layer_0/mlp/gate"], original["layer_0/mlp/gate"].T)
  assert not np.allclose(bad["layer_0/mlp/gate"], original["layer_0/mlp/gate"])
  want, have = logits_pair(cfg, original, bad)
  assert np.abs(want - have).max() > 1e-3


def test_bfloat16_kept_and_bindable(tmp_path):
  cfg = writers.tiny_config("gemma2")
  original = writers.random_params(cfg, dtype=ml_dtypes.bfloat16)
  path = write(tmp_path / "ckpt", writers.to_flat(cfg, original))
  got_cfg, got = read(path, "gemma2_2b", parameter_dtype="bfloat16")
  assert got_cfg.parameter_dtype == "bfloat16"
  assert_same_params(got, original)
  params.bind_parameters(got_cfg, got)


def test_small_chunks_and_progress_bar(tmp_path, monkeypatch):
  cfg = writers.tiny_config("gemma3")
  original = writers.random_params(cfg)
  path = write(tmp_path / "ckpt", writers.to_stacked(cfg, original, pattern_len=6))
  monkeypatch.setattr(kaggle, "CHUNK_BYTES", 1)  # One orbax restore per leaf.
  with shapes_differ():
    _, got = kaggle.read_kaggle_checkpoint(path, variant="gemma3_1b", progress=True)
  assert_same_params(got, original)


def test_finds_checkpoint_in_download_root(tmp_path):
  cfg = writers.tiny_config("gemma2")
  original = writers.random_params(cfg)
  write(tmp_path / "gemma2-tiny-it", writers.to_flat(cfg, original))
  (tmp_path / "tokenizer.model").write_bytes(b"spm")
  assert kaggle.find_checkpoint_dir(tmp_path) == tmp_path / "gemma2-tiny-it"
  _, got = read(tmp_path, "gemma-2-2b-it")
  assert_same_params(got, original)
  write(tmp_path / "other", writers.to_flat(cfg, original))
  with pytest.raises(errors.CheckpointError, match="several orbax checkpoints"):
    kaggle.find_checkpoint_dir(tmp_path)


def _preset_tree(name: str, layout: str):
  """Shape-only tree of a full-size preset (nothing is allocated)."""
  cfg = config.preset(name)
  shapes = {
    k: jax.ShapeDtypeStruct(s, jnp.bfloat16)
    for k, s in parameters.expected_shapes(cfg).items()
  }
  transpose = kaggle.needs_gating_transpose(name)

  def fn(p):
    if layout == "flat":
      return writers.to_flat(cfg, p, transpose_gating=transpose)
    if layout == "nested":
      return writers.to_nested(cfg, p, transpose_gating=transpose)
    return writers.to_stacked(cfg, p, pattern_len=6, transpose_gating=transpose)

  return jax.eval_shape(fn, shapes)


# Gemma 4 has no Kaggle/Flax layout reader yet (issue 15: the PyPI `gemma`
# package has no Gemma 4 to learn it from); it loads from Hugging Face files.
KAGGLE_PRESETS = [n for n in config.preset_names() if not n.startswith("gemma4")]


@pytest.mark.parametrize("name", KAGGLE_PRESETS)
def test_infers_every_published_preset_from_shapes(name):
  layouts = ["flat", "nested"] + (["stacked"] if name.startswith("gemma3") else [])
  for layout in layouts:
    tree = _preset_tree(name, layout)
    assert kaggle.infer_config_from_kaggle(tree) == config.preset(name), layout
    assert kaggle.infer_config_from_kaggle(tree, name) == config.preset(name)


def test_gemma3_270m_and_gemma_2b_are_told_apart():
  # Both have 18 layers; QK-norm (and widths) tell them apart.
  assert kaggle.infer_config_from_kaggle(
    _preset_tree("gemma3_270m", "flat")
  ).family == ("gemma3")
  assert kaggle.infer_config_from_kaggle(_preset_tree("gemma_2b", "flat")).family == (
    "gemma1"
  )


def test_needs_gating_transpose():
  assert not kaggle.needs_gating_transpose("gemma_2b")
  assert not kaggle.needs_gating_transpose("gemma-2-2b-it")
  assert kaggle.needs_gating_transpose("gemma2_9b")
  assert kaggle.needs_gating_transpose("gemma2-27b")
  assert kaggle.needs_gating_transpose("gemma3_1b")
  assert kaggle.needs_gating_transpose(config.preset("gemma2_9b"))
  assert not kaggle.needs_gating_transpose(config.preset("gemma2_2b"))
  assert kaggle.needs_gating_transpose(writers.tiny_config("gemma3"))
  assert not kaggle.needs_gating_transpose(writers.tiny_config("gemma2"))
  with pytest.raises(errors.ConfigError, match="gemma9_1b"):
    kaggle.needs_gating_transpose("gemma9_1b")


def test_reads_checkpoint_without_step_metadata(tmp_path):
  # Checkpoints written by older orbax have _METADATA but no _CHECKPOINT_METADATA.
  cfg = writers.tiny_config("gemma1_mqa")
  original = writers.random_params(cfg)
  path = write(tmp_path / "ckpt", writers.to_flat(cfg, original))
  (path / "_CHECKPOINT_METADATA").unlink()
  _, got = read(path, "gemma_2b")
  assert_same_params(got, original)
