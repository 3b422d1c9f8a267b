"""Shared pieces of the generation tests: prompts and a patched fixture model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from conftest import FIXTURES, HF_FIXTURES
from penzai import pz

import gemma_surgery as gs

# Two prompts of different lengths (6 and 8 tokens with BOS).
STRINGS = ["def main(", "hello world"]
NEW = 16


def tokenizer() -> gs.GemmaTokenizer:
  return gs.GemmaTokenizer.from_file(FIXTURES / "tokenizer" / "tiny.model")


def load(variant: str = "gemma2", dtype: str = "float32"):
  return gs.load(HF_FIXTURES / variant, dtype=dtype, progress=False).model


def patched(base, scale: float = 3.0, seed: int = 0, layer: int = 1):
  """Steering (all positions) at ``resid_post[layer]`` plus two captures.

  Returns ``(model, captures)``; captures are ``resid_post`` at layers 0, 2.
  """
  vector = np.random.default_rng(seed).standard_normal(64).astype(np.float32)
  model = gs.steer(
    base, "resid_post", layer, pz.nx.wrap(jnp.asarray(vector)).tag("embedding"), scale
  )
  return gs.capture(model, "resid_post", [0, 2])
