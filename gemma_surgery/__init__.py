"""gemma_surgery: mechanistic interpretability on Gemma, natively in Penzai.

The curated public API. Everything here is documented in the README.
"""

from gemma_surgery import (
  analysis,
  assets,
  circuits,
  errors,
  generation,
  loading,
  model,
  parallel,
  sae,
  surgery,
  tokenizer,
  viz,
)
from gemma_surgery.config import GemmaConfig, preset, preset_names
from gemma_surgery.errors import (
  CheckpointError,
  ConfigError,
  DistributedError,
  GemmaSurgeryError,
  HubError,
  InputError,
  ReplicationWarning,
  SAEError,
  ShardingError,
  SiteError,
  SurgeryError,
  TokenizerError,
)
from gemma_surgery.generation import (
  GenerationResult,
  generate,
  greedy_generate,
  named_tokens,
)
from gemma_surgery.loading import LoadedModel, load
from gemma_surgery.model import GemmaTransformerLM, build_model
from gemma_surgery.parallel import distributed, make_mesh, memory, shard_model, sharding
from gemma_surgery.surgery import (
  SITES,
  Captures,
  DisplayIntermediate,
  SaveIntermediate,
  SteerIntermediate,
  capture,
  chain,
  heads,
  interventions,
  jit_forward,
  sites,
  steer,
  unpatch,
)
from gemma_surgery.tokenizer import GemmaTokenizer

__version__ = "0.1.0"

__all__ = [
  "analysis",
  "circuits",
  "generation",
  "loading",
  "model",
  "named_tokens",
  "parallel",
  "surgery",
  "tokenizer",
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
  "ReplicationWarning",
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
