"""The model wing: a Gemma architecture as a Penzai model, and its parameters.

* `build`: `build_model` turns a `gemma_surgery.GemmaConfig` into a Penzai
  ``TransformerLM`` (Gemma 1/2/3: MHA/MQA/GQA, soft caps, sliding windows,
  QK-norm, per-layer RoPE; Gemma 4 through `build_gemma4`).
* `gemma4`, `moe`: the Penzai layers Gemma 4 adds (per-layer embeddings, KV
  sharing, layer scalars; the mixture of experts on an ``experts`` axis).
* `caching`: `kv_caching_lm`, Penzai's KV-caching conversion with Gemma 4's
  per-layer cache shapes and cache-free KV-shared layers.
* `decode_layers`: the layers that conversion puts in place of Penzai's so
  one decoding step runs fast on XLA:CPU (in-place cache writes, single-query
  attention, one-token unembedding).
* `parameters`: the canonical checkpoint names and shapes every loader
  produces, and how each becomes a Penzai parameter (`Target`).

Imports only the ground floor (`config`, `errors`, `validation`).
"""

from gemma_surgery.model import (
  build,
  build_gemma4,
  caching,
  decode_layers,
  gemma4,
  moe,
  parameters,
)
from gemma_surgery.model.build import GemmaTransformerLM, build_model
from gemma_surgery.model.caching import kv_caching_lm

__all__ = [
  "GemmaTransformerLM",
  "build",
  "build_gemma4",
  "build_model",
  "caching",
  "decode_layers",
  "gemma4",
  "kv_caching_lm",
  "moe",
  "parameters",
]
