"""Shared pieces of the generation tests: prompts and a patched fixture model."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from penzai import pz

import gemma_surgery as gs
from helpers.paths import FIXTURES, HF_FIXTURES

# Two prompts of different lengths (6 and 8 tokens with BOS).
STRINGS = ["def main(", "hello world"]
NEW = 16


def tokenizer() -> gs.GemmaTokenizer:
  return gs.GemmaTokenizer.from_file(FIXTURES / "tokenizer" / "tiny.model")


def load(variant: str = "gemma2", dtype: str = "float32"):
  return gs.load(HF_FIXTURES / variant, dtype=dtype, progress=False).model


def random_tokens(batch: int, seq: int, seed: int = 0) -> np.ndarray:
  """``[batch, seq]`` int32 ids of the fixtures' vocabulary: BOS (2), then
  uniform random ids 4..511."""
  ids = np.random.default_rng(seed).integers(4, 512, (batch, seq)).astype(np.int32)
  ids[:, 0] = 2
  return ids


def patched(base, scale: float = 3.0, seed: int = 0, layer: int = 1):
  """Steering (all positions) at ``resid_post[layer]`` plus two captures.

  Returns ``(model, captures)``; captures are ``resid_post`` at layers 0, 2.
  """
  vector = np.random.default_rng(seed).standard_normal(64).astype(np.float32)
  model = gs.steer(
    base, "resid_post", layer, pz.nx.wrap(jnp.asarray(vector)).tag("embedding"), scale
  )
  return gs.capture(model, "resid_post", [0, 2])


# Prompts of 5 and 9 tokens (a 0 inside is a token, not padding).
PADDED_ROWS = [[2, 17, 4, 0, 250], [2, 311, 45, 7, 8, 9, 10, 400, 12]]
CAPTURED_SITES = ["resid_post", "attn.pattern", "attn.k", "mlp.hidden"]


def richly_patched(base, scale, positions="generated"):
  """Steering, a one-head edit, a head knockout and captures.

  Steering at resid_post[1], an edit of head 1 at attn.z[2], head 2 of the
  last layer knocked out, captures of `CAPTURED_SITES` at layers 1 and -1.
  """
  rng = np.random.default_rng(0)
  vector = pz.nx.wrap(jnp.asarray(rng.standard_normal(64), jnp.float32))
  head = np.zeros((4, 16), np.float32)
  head[1] = 3 * rng.standard_normal(16)  # only head 1 (kv group 0, query 1)
  model = gs.steer(
    base, "resid_post", 1, vector.tag("embedding"), scale, positions=positions
  )
  model = gs.steer(
    model, "attn.z", 2, pz.nx.wrap(jnp.asarray(head)).tag("heads", "projection")
  )
  model = gs.interventions.knock_out_heads(model, [-1], [2])
  return gs.capture(model, [*CAPTURED_SITES, "logits"], [1, -1])


def uncached_pass(model, result) -> np.ndarray:
  """Runs ``model`` uncached on the final sequences (updating its captures).

  Returns the ``[batch, seq]`` mask of real (non-pad) positions.
  """
  tokens = np.concatenate([result.prompt, result.tokens], axis=1)
  width = result.prompt.shape[1]
  real = np.arange(tokens.shape[1])[None] >= (width - result.prompt_lengths)[:, None]
  positions = np.where(real, np.cumsum(real, axis=1) - 1, -1)
  gs.jit_forward(model)(
    pz.nx.wrap(jnp.asarray(tokens, jnp.int32)).tag("batch", "seq"),
    token_positions=pz.nx.wrap(jnp.asarray(positions, jnp.int32)).tag("batch", "seq"),
    generation_prompt_end=pz.nx.wrap(jnp.asarray(result.prompt_lengths)).tag("batch"),
  )
  return real


def as_array(value: pz.nx.NamedArray) -> np.ndarray:
  """``[batch, seq, ...]`` with the other axes in sorted order."""
  rest = sorted(set(value.named_shape) - {"batch", "seq"})
  return np.asarray(value.unwrap("batch", "seq", *rest))


def check_against_uncached(model, acts, result, tol: float = 1e-5) -> None:
  """Whole-run captures == an uncached pass, to ``tol`` relative to the scale."""
  cached = {key: as_array(result.captures[key]) for key in acts.keys()}
  real = uncached_pass(model, result)
  for key, value in cached.items():
    expected = as_array(acts[key])
    scale = max(1.0, float(np.abs(expected[real]).max()))
    diff = np.abs(value - expected)[real].max()
    assert diff <= tol * scale, f"{key}: {diff} (scale {scale})"
