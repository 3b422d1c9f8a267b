"""gemma_surgery: mechanistic interpretability on Gemma, natively in Penzai.

The curated public API. Everything here is documented in the README.
"""

from gemma_surgery import (
  analysis,
  assets,
  distributed,
  errors,
  heads,
  interventions,
  memory,
  sae,
  sharding,
  sites,
  viz,
)
from gemma_surgery.build import GemmaTransformerLM, build_model
from gemma_surgery.config import GemmaConfig, preset, preset_names
from gemma_surgery.errors import (
  CheckpointError,
  ConfigError,
  DistributedError,
  GemmaSurgeryError,
  HubError,
  InputError,
  SAEError,
  ShardingError,
  SiteError,
  SurgeryError,
  TokenizerError,
)
from gemma_surgery.generate import GenerationResult, generate, greedy_generate
from gemma_surgery.layers.capture import DisplayIntermediate, SaveIntermediate
from gemma_surgery.layers.steer import SteerIntermediate
from gemma_surgery.loading.api import LoadedModel, load
from gemma_surgery.run import jit_forward
from gemma_surgery.sharding import make_mesh, shard_model
from gemma_surgery.sites import SITES
from gemma_surgery.surgery import Captures, capture, chain, steer, unpatch
from gemma_surgery.tokenizer import GemmaTokenizer

__version__ = "0.1.0"

__all__ = [
  "analysis",
  "assets",
  "distributed",
  "sae",
  "SITES",
  "Captures",
  "DisplayIntermediate",
  "SaveIntermediate",
  "SiteError",
  "SteerIntermediate",
  "SurgeryError",
  "capture",
  "chain",
  "heads",
  "interventions",
  "jit_forward",
  "memory",
  "sites",
  "steer",
  "unpatch",
  "CheckpointError",
  "ConfigError",
  "DistributedError",
  "GemmaConfig",
  "GemmaSurgeryError",
  "GemmaTokenizer",
  "GemmaTransformerLM",
  "HubError",
  "InputError",
  "LoadedModel",
  "SAEError",
  "ShardingError",
  "TokenizerError",
  "build_model",
  "errors",
  "generate",
  "GenerationResult",
  "greedy_generate",
  "load",
  "make_mesh",
  "preset",
  "preset_names",
  "shard_model",
  "sharding",
  "viz",
]
