"""The model wing: a Gemma architecture as a Penzai model, and its parameters.

* `build`: `build_model` turns a `gemma_surgery.GemmaConfig` into a Penzai
  ``TransformerLM`` (Gemma 1/2/3: MHA/MQA/GQA, soft caps, sliding windows,
  QK-norm, per-layer RoPE).
* `parameters`: the canonical checkpoint names and shapes every loader
  produces, and how each becomes a Penzai parameter (`Target`).

Imports only the ground floor (`config`, `errors`, `validation`).
"""

from gemma_surgery.model import build, parameters
from gemma_surgery.model.build import GemmaTransformerLM, build_model

__all__ = ["GemmaTransformerLM", "build", "build_model", "parameters"]
