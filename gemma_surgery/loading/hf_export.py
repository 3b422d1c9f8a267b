"""Writing a model as a Hugging Face checkpoint (config.json + safetensors).

The inverse of `loading.hf`: the model's Penzai parameters (found by label)
go back to canonical arrays (`loading.params`) and then to the tensor names
and ``(out, in)`` layouts of ``transformers``' Gemma classes, next to a
``config.json`` in the transformers-5 schema. The embedded default model is
shipped this way, so it loads through the same path as real checkpoints.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any

import numpy as np
from penzai import pz
from safetensors.numpy import save_file

from gemma_surgery import errors
from gemma_surgery.config import GemmaConfig
from gemma_surgery.model import build

_MODEL_TYPE = {"gemma1": "gemma", "gemma2": "gemma2", "gemma3": "gemma3_text"}
_ARCH = {
  "gemma1": "GemmaForCausalLM",
  "gemma2": "Gemma2ForCausalLM",
  "gemma3": "Gemma3ForCausalLM",
}
_KIND = {"local": "sliding_attention", "global": "full_attention"}


def config_json(config: GemmaConfig) -> dict[str, Any]:
  """An HF ``config.json`` dict (transformers-5 schema) for ``config``."""
  out: dict[str, Any] = {
    "architectures": [_ARCH[config.family]],
    "model_type": _MODEL_TYPE[config.family],
    "vocab_size": config.vocab_size,
    "hidden_size": config.embedding_dim,
    "intermediate_size": config.mlp_hidden_dim,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": config.num_heads,
    "num_key_value_heads": config.num_kv_heads,
    "head_dim": config.head_dim,
    "hidden_activation": "gelu_pytorch_tanh",
    "rms_norm_eps": config.rms_norm_eps,
    "bos_token_id": config.bos_id,
    "eos_token_id": config.eos_id,
    "pad_token_id": config.pad_id,
    "tie_word_embeddings": True,
    "attention_bias": False,
    "max_position_embeddings": 8192,
    "dtype": str(config.parameter_dtype),
  }
  if config.family == "gemma1":
    out["rope_parameters"] = {
      "rope_type": "default",
      "rope_theta": config.rope_global_base,
    }
    return out
  out["layer_types"] = [_KIND[kind] for kind in config.attention_types]
  out["sliding_window"] = config.sliding_window
  scalar = config.query_pre_attn_scalar
  if scalar is not None and float(scalar).is_integer():
    scalar = int(scalar)  # transformers validates an int here
  out["query_pre_attn_scalar"] = scalar
  out["attn_logit_softcapping"] = config.attn_logits_soft_cap
  out["final_logit_softcapping"] = config.final_logit_softcap
  if config.family == "gemma2":
    out["rope_parameters"] = {
      "rope_type": "default",
      "rope_theta": config.rope_global_base,
    }
    return out

  def rope(base: float, scale: float) -> dict[str, Any]:
    if scale == 1.0:
      return {"rope_type": "default", "rope_theta": base}
    return {"rope_type": "linear", "rope_theta": base, "factor": scale}

  out["rope_parameters"] = {
    "full_attention": rope(config.rope_global_base, config.rope_global_scale),
    "sliding_attention": rope(config.rope_local_base, config.rope_local_scale),
  }
  out["use_bidirectional_attention"] = False
  return out


def _axis_order(label: str, heads: tuple[str, ...]) -> tuple[str, ...]:
  """Canonical axis order of the parameter ``label`` (heads first)."""
  leaf = label.rsplit("/", 1)[-1]
  if label == "embedder.embeddings":
    return ("vocabulary", "embedding")
  if leaf == "scale.weights":
    return (
      ("projection",)
      if "query_norm" in label or "key_norm" in label
      else ("embedding",)
    )
  if leaf in ("query.weights", "key.weights", "value.weights"):
    return (*heads, "embedding", "projection")
  if leaf == "output.weights":
    return (*heads, "projection", "embedding")
  if leaf == "out_linear.weights":
    return ("neurons", "embedding")
  return ("embedding", "neurons")


def _parameters(model: Any) -> dict[str, np.ndarray]:
  """Penzai parameter values by label (without the model-name prefix), with
  their axes in the canonical order whatever order the model holds them in."""
  common, q_only = build.head_axes(model.config)
  found = {}
  for p in pz.select(model).at_instances_of(pz.Parameter).get_sequence():
    label = p.label.split("/", 1)[1] if "/" in p.label else p.label
    present = p.value.named_axes
    heads = tuple(a for a in (*common, *q_only) if a in present)
    order = _axis_order(label, heads)
    found[label] = np.asarray(p.value.unwrap(*order), np.float32)
  return found


def hf_tensors(model: Any) -> dict[str, np.ndarray]:
  """The model's parameters as HF tensors (names and ``(out, in)`` layouts)."""
  config: GemmaConfig = model.config
  p = _parameters(model)
  n, k, d, h = (
    config.num_heads,
    config.num_kv_heads,
    config.embedding_dim,
    config.head_dim,
  )
  post_attn = "post_attention_layernorm"
  out = {
    "model.embed_tokens.weight": p["embedder.embeddings"],
    "model.norm.weight": p["final_norm/scale.weights"] - 1.0,
  }
  for i in range(config.num_layers):
    src, dst = f"block_{i}", f"model.layers.{i}."
    norms = {
      "pre_attention_norm": "input_layernorm",
      "post_attention_norm": post_attn,
      "pre_ffw_norm": post_attn
      if config.family == "gemma1"
      else "pre_feedforward_layernorm",
      "post_ffw_norm": "post_feedforward_layernorm",
    }
    for ours, theirs in norms.items():
      key = f"{src}/{ours}/scale.weights"
      if key in p:
        out[dst + theirs + ".weight"] = p[key] - 1.0
    q = p[f"{src}/attention/query.weights"].reshape(n, d, h)
    out[dst + "self_attn.q_proj.weight"] = q.transpose(0, 2, 1).reshape(n * h, d)
    for ours, theirs in (("key", "k_proj"), ("value", "v_proj")):
      arr = p[f"{src}/attention/{ours}.weights"].reshape(k, d, h)
      out[dst + f"self_attn.{theirs}.weight"] = arr.transpose(0, 2, 1).reshape(k * h, d)
    o = p[f"{src}/attention/output.weights"].reshape(n, h, d)
    out[dst + "self_attn.o_proj.weight"] = o.transpose(2, 0, 1).reshape(d, n * h)
    for ours, theirs in (("query_norm", "q_norm"), ("key_norm", "k_norm")):
      key = f"{src}/attention/{ours}/scale.weights"
      if key in p:
        out[dst + f"self_attn.{theirs}.weight"] = p[key] - 1.0
    for ours, theirs in (("gating", "gate"), ("value", "up"), ("out", "down")):
      out[dst + f"mlp.{theirs}_proj.weight"] = p[f"{src}/mlp/{ours}_linear.weights"].T
  return {name: np.ascontiguousarray(v) for name, v in out.items()}


def save_hf(
  model: Any,
  directory: str | os.PathLike[str],
  *,
  tokenizer_model: str | os.PathLike[str] | None = None,
  dtype: str = "float32",
) -> pathlib.Path:
  """Writes ``model`` as ``config.json`` + ``model.safetensors`` (+ tokenizer).

  Files are written into a temporary folder and moved into place at the end,
  so a failure leaves nothing half-written.

  Args:
    model: A model built by gemma_surgery (it carries its ``config``; surgery
      layers are ignored — only parameters are saved).
    directory: The checkpoint folder (created; must not exist or be empty).
    tokenizer_model: Optional ``tokenizer.model`` to copy next to it.
    dtype: ``"float32"`` or ``"bfloat16"`` (stored as float32 values rounded
      to bfloat16 precision is not supported: choose float32 for exactness).

  Returns:
    The folder.
  """
  config = getattr(model, "config", None)
  if not isinstance(config, GemmaConfig):
    raise errors.ConfigError(
      "save_hf needs a model built by gemma_surgery (with .config)."
    )
  if dtype not in ("float32", "bfloat16"):
    raise errors.InputError(f"dtype={dtype!r}; valid: 'float32', 'bfloat16'.")
  directory = pathlib.Path(directory)
  if directory.exists() and any(directory.iterdir()):
    raise errors.InputError(f"{directory} exists and is not empty.")
  tensors = hf_tensors(model)
  if dtype == "bfloat16":
    import ml_dtypes

    tensors = {name: v.astype(ml_dtypes.bfloat16) for name, v in tensors.items()}
  cfg = config_json(config) | {"dtype": dtype}
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=".partial-", dir=directory.parent))
  try:
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    if tokenizer_model is not None:
      shutil.copyfile(tokenizer_model, tmp / "tokenizer.model")
    tmp.chmod(0o755)  # mkdtemp makes it private
    for file in tmp.iterdir():
      file.chmod(0o644)
    if directory.exists():
      directory.rmdir()
    tmp.rename(directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory
