"""The HF golden weights, written in every Kaggle/Flax layout, load through
the orbax path to the same logits as through the HF path (<= 1e-5)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.kaggle_writers import save, to_flat, to_nested, to_stacked
from helpers.paths import HF_FIXTURES
from penzai import pz

import gemma_surgery
from gemma_surgery.loading import hf, hf_config

LAYOUTS = {
  "flat": lambda c, p: to_flat(c, p),
  "flat_transposed_gating": lambda c, p: to_flat(c, p, transpose_gating=True),
  "flat_squeezed_mqa": lambda c, p: to_flat(c, p, squeeze_mqa=True),
  "nested": lambda c, p: to_nested(c, p),
  "stacked": lambda c, p: to_stacked(
    c, p, pattern_len=6 if c.num_layers % 6 == 0 else 2
  ),
}
CASES = [
  ("gemma1_mha", "flat"),
  ("gemma1_mqa", "flat"),
  ("gemma1_mqa", "flat_squeezed_mqa"),
  ("gemma2", "flat"),
  ("gemma2", "flat_transposed_gating"),
  ("gemma2", "nested"),
  ("gemma3", "flat_transposed_gating"),
  ("gemma3", "nested"),
  ("gemma3", "stacked"),
]


def _logits(model, tokens):
  named = pz.nx.wrap(jnp.asarray(tokens, jnp.int32)).tag("batch", "seq")
  return np.asarray(model(named).unwrap("batch", "seq", "vocabulary"))


@pytest.mark.parametrize("variant,layout", CASES)
def test_kaggle_layout_matches_hf_load(variant, layout, tmp_path):
  directory = HF_FIXTURES / variant
  config = hf_config.config_from_hf(hf_config.read_config_json(directory))
  canonical = hf.read_hf_params(directory, config, progress=False)
  save(LAYOUTS[layout](config, canonical), tmp_path / "ckpt")

  via_hf = gemma_surgery.load(directory, dtype="float32", progress=False)
  via_kaggle = gemma_surgery.load(
    tmp_path / "ckpt", config=config, dtype="float32", progress=False
  )
  assert via_kaggle.config == via_hf.config
  golden = np.load(directory / "golden.npz", allow_pickle=False)
  diff = np.abs(
    _logits(via_kaggle.model, golden["tokens"])
    - _logits(via_hf.model, golden["tokens"])
  )
  assert diff.max() <= 1e-5
