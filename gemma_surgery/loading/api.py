"""`load`: the front door from a name or a path to a Penzai Gemma model.

``gemma_surgery.load(source)`` accepts:

* a local Hugging Face directory (``config.json`` + ``*.safetensors``, with
  ``tokenizer.model`` or, as Gemma 4 repositories ship, only
  ``tokenizer.json``);
* a local Kaggle/Flax orbax checkpoint directory, or the root of a Kaggle
  download that holds one (with ``tokenizer.model`` beside it);
* ``"hf:org/name"`` or a bare ``"org/name"`` Hugging Face repo id, downloaded
  with ``huggingface_hub`` into its cache;
* ``"kaggle:owner/model/framework/variation[/version]"``, downloaded with
  ``kagglehub`` into its cache;
* a published variant name such as ``"gemma2_2b"`` or ``"gemma-3-1b-it"``,
  which resolves to its Hugging Face repo;
* ``"tiny"``: the embedded "gemma-surgery tiny" model shipped inside the
  package (`gemma_surgery.assets`), trained by this project; never
  downloaded. The string ``"tiny"`` always means it; pass ``"./tiny"`` or a
  ``pathlib.Path`` for a local folder of that name.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax

from gemma_surgery import assets, errors, jit_cache
from gemma_surgery import config as config_lib
from gemma_surgery.loading import hf, hf_config, hub, kaggle, kaggle_sharded, params
from gemma_surgery.model import build
from gemma_surgery.parallel import distributed, sharding
from gemma_surgery.tokenizer import (
  GemmaTokenizer,
  JsonTokenizer,
  TokenizerBase,
  as_tokenizer,
)

# Hugging Face repos of the published variants (pretrained; "-it" asks for the
# instruction-tuned one).
_HF_REPOS = {
  "gemma_2b": "google/gemma-2b",
  "gemma_7b": "google/gemma-7b",
  "gemma2_2b": "google/gemma-2-2b",
  "gemma2_9b": "google/gemma-2-9b",
  "gemma2_27b": "google/gemma-2-27b",
  "gemma3_270m": "google/gemma-3-270m",
  "gemma3_1b": "google/gemma-3-1b-pt",
  "gemma3_4b": "google/gemma-3-4b-pt",
  "gemma3_12b": "google/gemma-3-12b-pt",
  "gemma3_27b": "google/gemma-3-27b-pt",
  # Gemma 4: multimodal repos; only the text decoder's weights are read.
  "gemma4_e2b": "google/gemma-4-E2B",
  "gemma4_e4b": "google/gemma-4-E4B",
  "gemma4_26b_a4b": "google/gemma-4-26B-A4B",
  "gemma4_31b": "google/gemma-4-31B",
}
_HF_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model"]


@dataclasses.dataclass(frozen=True)
class LoadedModel:
  """What `load` returns.

  Attributes:
    model: The Penzai ``TransformerLM`` (a `GemmaTransformerLM`): call it on a
      ``{batch, seq}`` NamedArray of token ids to get ``{batch, seq,
      vocabulary}`` logits.
    config: Its `GemmaConfig`.
    tokenizer: A `GemmaTokenizer` from the checkpoint's ``tokenizer.model``,
      else a `JsonTokenizer` from its ``tokenizer.json``; None if it has
      neither and none was given.
    path: The local directory the weights were read from.
  """

  model: build.GemmaTransformerLM
  config: config_lib.GemmaConfig
  tokenizer: TokenizerBase | None
  path: pathlib.Path | None


def _is_hf_dir(path: pathlib.Path) -> bool:
  return (path / "config.json").exists()


# Looked for in the checkpoint folder, then in the two folders above it (a
# Kaggle download keeps tokenizer.model beside the checkpoint folder); in each,
# SentencePiece's file first.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


def _find_tokenizer(path: pathlib.Path) -> pathlib.Path | None:
  for candidate in (path, *path.parents[:2]):
    for name in TOKENIZER_FILES:
      if (candidate / name).is_file():
        return candidate / name
  return None


def _variant_repo(name: str) -> str | None:
  key = config_lib.normalize_variant_name(name)
  if key not in _HF_REPOS:
    return None
  repo = _HF_REPOS[key]
  if name.lower().endswith("-it") or name.lower().endswith("_it"):
    repo = repo.removesuffix("-pt") + "-it"
  return repo


def resolve(
  source: str | pathlib.Path, *, cache_dir: str | None = None
) -> pathlib.Path:
  """Turns a path, hub reference or variant name into a local directory.

  Raises:
    CheckpointError: If ``source`` is neither an existing path nor a hub
      reference or a known variant.
    HubError: If a download is needed and fails.
  """
  if isinstance(source, str) and source == assets.TINY_NAME:
    return assets.tiny_dir()
  text = str(source)
  path = pathlib.Path(text).expanduser()
  if path.exists():
    return path
  if text.startswith("kaggle:"):
    return hub.download_kaggle(text.removeprefix("kaggle:"), cache_dir=cache_dir)
  if text.startswith("hf:"):
    repo = text.removeprefix("hf:")
    return hub.download_hf(repo, allow_patterns=_HF_PATTERNS, cache_dir=cache_dir)
  repo = _variant_repo(text)
  if repo is not None:
    return hub.download_hf(repo, allow_patterns=_HF_PATTERNS, cache_dir=cache_dir)
  if text.count("/") == 1 and not text.startswith((".", "/", "~")):
    return hub.download_hf(text, allow_patterns=_HF_PATTERNS, cache_dir=cache_dir)
  raise errors.CheckpointError(
    f"{text!r} is not an existing path, a hub reference ('hf:org/name',"
    " 'kaggle:owner/model/framework/variation') or a known variant"
    f" ({', '.join(config_lib.preset_names())})."
  )


def load(
  source: str | pathlib.Path,
  *,
  dtype: str | None = None,
  activation_dtype: str | None = None,
  variant: str | None = None,
  config: config_lib.GemmaConfig | None = None,
  mesh: jax.sharding.Mesh | None = None,
  sharding_rules: sharding.Rules | None = None,
  strict_sharding: bool = False,
  tokenizer: Any = None,
  cache_dir: str | None = None,
  progress: bool = True,
) -> LoadedModel:
  """Loads a Gemma 1, 2, 3 or 4 text model into Penzai.

  Args:
    source: A local path, ``"hf:org/name"``, ``"kaggle:handle"`` or a variant
      name (see the module docstring).
    dtype: Parameter dtype: ``"bfloat16"`` or ``"float32"``. Default:
      ``"bfloat16"``, except ``"float32"`` for the embedded ``"tiny"`` model
      (stored in bfloat16, measured in float32).
    activation_dtype: Activation dtype; e.g. ``"float32"`` to run bf16 weights
      with float32 activations. Default: same as ``dtype``.
    variant: Variant name for Kaggle checkpoints whose non-shape knobs
      (windows, soft caps, RoPE) can't be read from the weights; inferred from
      shapes when omitted.
    config: An explicit architecture, e.g. for a Kaggle-format checkpoint of
      a size that matches no published variant. Overrides ``variant`` and a
      Hugging Face ``config.json``; its dtypes are replaced by ``dtype`` /
      ``activation_dtype``. Shapes are still checked against it.
    mesh: Shard parameters over this mesh by axis name while loading. The
      mesh may span several processes (`gemma_surgery.parallel.distributed`): each
      process then reads only the slices its own devices hold (safetensors
      slices, or an orbax restore with the target shardings), so no process
      holds the whole model.
    sharding_rules: Axis-name rules (default `sharding.DEFAULT_RULES`).
    strict_sharding: With ``mesh``: raise `ShardingError` before reading any
      weight if some parameter that a rule would shard over a mesh axis
      cannot be split over it (its axis sizes don't divide) and would be
      replicated instead (`gemma_surgery.parallel.distributed.check_mesh`).
      Without it such parameters are replicated and one
      `errors.ReplicationWarning` names them and their share of memory.
    tokenizer: A tokenizer path (``tokenizer.model``, or a ``.json`` file
      read as a Hugging Face ``tokenizer.json``) or object to use instead of
      the checkpoint's own (any object with ``encode``/``decode``, including
      the ``gemma`` package's tokenizers).
    cache_dir: Download cache for hub sources.
    progress: Show progress bars.

  The first call also turns on JAX's persistent compilation cache
  (`gemma_surgery.jit_cache`; opt out with
  ``GEMMA_SURGERY_COMPILATION_CACHE=0``).

  Returns:
    A `LoadedModel` with ``.model``, ``.config``, ``.tokenizer``, ``.path``.

  Raises:
    CheckpointError, ConfigError, HubError, TokenizerError: see their docs.
  """
  jit_cache.enable()
  path = resolve(source, cache_dir=cache_dir)
  if dtype is None:
    dtype = "float32" if path == assets.TINY_DIR else "bfloat16"
  if _is_hf_dir(path):
    if config is None:
      config = hf_config.config_from_hf(hf_config.read_config_json(path))
    config = config.replace(parameter_dtype=dtype, activation_dtype=activation_dtype)
    if mesh is None:
      canonical = hf.read_hf_params(path, config, progress=progress)
      model = params.bind_parameters(config, canonical, source=str(path))
    else:
      if strict_sharding:
        distributed.check_mesh(config, mesh, sharding_rules)
      with hf.open_hf_params(path, config) as lazy:
        model = params.bind_parameters(
          config,
          lazy,
          source=str(path),
          mesh=mesh,
          sharding_rules=sharding_rules,
          progress=progress,
        )
  else:
    kwargs = dict(
      variant=variant,
      config=config,
      parameter_dtype=dtype,
      activation_dtype=activation_dtype,
    )
    if mesh is None:
      config, canonical = kaggle.read_kaggle_checkpoint(path, **kwargs)
      model = params.bind_parameters(config, canonical, source=str(path))
    else:
      check = distributed.check_mesh if strict_sharding else None
      config, arrays = kaggle_sharded.restore_sharded(
        path, mesh=mesh, rules=sharding_rules, check=check, progress=progress, **kwargs
      )
      model = params.bind_named(config, arrays)
  if mesh is not None and not strict_sharding:
    distributed.warn_replicated(config, mesh, sharding_rules)
  found = _load_tokenizer(tokenizer, path)
  if found is not None and found.vocab_size > config.vocab_size:
    raise errors.TokenizerError(
      f"The tokenizer has {found.vocab_size} tokens but the model's vocabulary"
      f" has {config.vocab_size}: they don't belong together. Pass the"
      " checkpoint's own tokenizer.model or tokenizer.json."
    )
  return LoadedModel(model=model, config=config, tokenizer=found, path=path)


def _load_tokenizer(tokenizer: Any, path: pathlib.Path) -> TokenizerBase | None:
  if tokenizer is None:
    found = _find_tokenizer(path if path.is_dir() else path.parent)
    if found is None:
      return None
    if found.suffix == ".json":
      return JsonTokenizer.from_file(found)
    return GemmaTokenizer.from_file(found)
  return as_tokenizer(tokenizer)
