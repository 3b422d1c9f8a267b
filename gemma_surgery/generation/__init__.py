"""The generation wing: sampling from (patched) models in one fused loop.

* `generate`: `generate` / `greedy_generate` and `GenerationResult`.
* `decoding`: the jitted, KV-cached ``lax.while_loop`` over a patched model,
  with captures written into fixed-shape buffers.
* `inputs`: prompts to token-id arrays (`token_batch`, `named_tokens`) and
  argument checks.
* `streams`: `generate_stream` (new tokens chunk by chunk as they are
  decoded, `StreamChunk`), over the chunked loop of `chunked`.
* `sweeps`: `sweep` (grid of edits x prompts in one batch), `SweepResult`.
* `sampling`: temperature, top-k and top-p on the device.
"""

from gemma_surgery.generation import (
  chunked,
  decoding,
  inputs,
  sampling,
  streams,
  sweeps,
)
from gemma_surgery.generation.api import (
  GenerationResult,
  generate,
  greedy_generate,
)
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.generation.streams import StreamChunk, generate_stream
from gemma_surgery.generation.sweeps import SweepResult, sweep, sweep_model

__all__ = [
  "GenerationResult",
  "StreamChunk",
  "chunked",
  "decoding",
  "generate_stream",
  "generate",
  "greedy_generate",
  "inputs",
  "named_tokens",
  "sampling",
  "streams",
  "SweepResult",
  "sweep",
  "sweep_model",
  "sweeps",
  "token_batch",
]
