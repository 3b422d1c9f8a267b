"""gemma_surgery: mechanistic interpretability on Gemma, natively in Penzai.

The curated public API. Everything here is documented in the README.
"""

from gemma_surgery import errors, sharding
from gemma_surgery.build import GemmaTransformerLM, build_model
from gemma_surgery.config import GemmaConfig, preset, preset_names
from gemma_surgery.errors import (
  CheckpointError,
  ConfigError,
  GemmaSurgeryError,
  HubError,
  InputError,
  ShardingError,
  TokenizerError,
)
from gemma_surgery.generate import greedy_generate
from gemma_surgery.loading.api import LoadedModel, load
from gemma_surgery.sharding import make_mesh, shard_model
from gemma_surgery.tokenizer import GemmaTokenizer

__version__ = "0.1.0"

__all__ = [
  "CheckpointError",
  "ConfigError",
  "GemmaConfig",
  "GemmaSurgeryError",
  "GemmaTokenizer",
  "GemmaTransformerLM",
  "HubError",
  "InputError",
  "LoadedModel",
  "ShardingError",
  "TokenizerError",
  "build_model",
  "errors",
  "greedy_generate",
  "load",
  "make_mesh",
  "preset",
  "preset_names",
  "shard_model",
  "sharding",
]
