"""`GemmaConfig` from a Hugging Face ``config.json`` (no ``transformers``).

Two schemas are in circulation and both are read:

* the older Hub schema: ``rope_theta``, ``rope_local_base_freq``,
  ``rope_scaling`` (e.g. ``{"rope_type": "linear", "factor": 8.0}`` on Gemma 3
  4B+, applied to global layers) and ``sliding_window_pattern``;
* the transformers-5 schema: ``layer_types`` (``"sliding_attention"`` /
  ``"full_attention"``) and ``rope_parameters``, flat for Gemma 1/2 or keyed
  by layer type for Gemma 3.

Multimodal Gemma 3 and Gemma 4 configs (``model_type`` ``"gemma3"`` /
``"gemma4"``) carry the text model under ``text_config``; fields they omit
take transformers' defaults.

Gemma 4 (``gemma4_text``): the global layers' head width and kv heads come
from ``per_layer_config`` (what transformers 5 writes: layer index ->
overrides) or else from ``global_head_dim`` (default 512) and, when
``attention_k_eq_v``, ``num_global_key_value_heads`` (the published configs);
``rope_parameters`` per layer type may be ``proportional`` with a
``partial_rotary_factor``; queries are not scaled.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from gemma_surgery import errors
from gemma_surgery.config import GemmaConfig, alternating_pattern

# transformers' defaults for fields that published configs sometimes omit.
_DEFAULTS: dict[str, dict[str, Any]] = {
  "gemma": dict(
    vocab_size=256_000,
    hidden_size=3072,
    intermediate_size=24_576,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=16,
    head_dim=256,
    rope_theta=10_000.0,
  ),
  "gemma2": dict(
    vocab_size=256_000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    rope_theta=10_000.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
    final_logit_softcapping=30.0,
    attn_logit_softcapping=50.0,
  ),
  "gemma3_text": dict(
    vocab_size=262_208,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    query_pre_attn_scalar=256,
    sliding_window=4096,
  ),
  "gemma4_text": dict(
    vocab_size=262_144,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=30,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    sliding_window=512,
    vocab_size_per_layer_input=262_144,
    hidden_size_per_layer_input=256,
  ),
}
_FAMILY = {
  "gemma": "gemma1",
  "gemma2": "gemma2",
  "gemma3_text": "gemma3",
  "gemma4_text": "gemma4",
}
_MULTIMODAL = {"gemma3": "gemma3_text", "gemma4": "gemma4_text"}
_LAYER_KIND = {"sliding_attention": "local", "full_attention": "global"}


def read_config_json(path: str | pathlib.Path) -> dict[str, Any]:
  """Reads a ``config.json`` into a dict, with clear errors."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / "config.json"
  if not path.exists():
    raise errors.CheckpointError(
      f"No Hugging Face config at {path}; a Hugging Face checkpoint directory"
      " needs config.json next to its *.safetensors files."
    )
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise errors.CheckpointError(f"{path} is not valid JSON: {e}") from e


def text_config_dict(raw: dict[str, Any]) -> dict[str, Any]:
  """The text-model part of a (possibly multimodal) config, defaults filled."""
  if raw.get("model_type") in _MULTIMODAL and "text_config" in raw:
    expected = _MULTIMODAL[raw["model_type"]]
    inner = raw["text_config"].get("model_type", expected)
    if inner != expected:
      raise errors.ConfigError(
        f"config.json has model_type={raw['model_type']!r} but its text_config"
        f" has model_type={inner!r}; a {raw['model_type']} checkpoint's text"
        f" model is {expected!r}."
      )
    raw = {**raw["text_config"], "model_type": expected}
  model_type = raw.get("model_type")
  if model_type not in _DEFAULTS:
    raise errors.ConfigError(
      f"config.json has model_type={model_type!r}; supported Gemma text"
      f" models: {', '.join(sorted(_DEFAULTS))} (and 'gemma3' / 'gemma4'"
      " with a text_config)."
    )
  return {**_DEFAULTS[model_type], **{k: v for k, v in raw.items() if v is not None}}


def _rope(cfg: dict[str, Any], family: str) -> dict[str, float]:
  """Per-layer-type RoPE bases and linear scale factors."""

  def parse(params: dict[str, Any] | None, default_base: float, where: str):
    params = dict(params or {})
    kind = params.get("rope_type", params.get("type", "default"))
    base = float(params.get("rope_theta", default_base))
    if kind == "default":
      return base, 1.0, 1.0
    if kind == "linear":
      return base, float(params["factor"]), 1.0
    if kind == "proportional" and family == "gemma4":
      factor = float(params.get("factor", 1.0))
      return base, factor, float(params.get("partial_rotary_factor", 1.0))
    raise errors.ConfigError(
      f"Unsupported RoPE type {kind!r} in {where}; Gemma uses 'default' or"
      " 'linear' (and Gemma 4 'proportional')."
    )

  global_base = float(cfg.get("rope_theta", 10_000.0))
  local_base = float(cfg.get("rope_local_base_freq", global_base))
  if family == "gemma4" and not cfg.get("rope_parameters"):
    cfg = {
      **cfg,
      "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {
          "rope_type": "proportional",
          "partial_rotary_factor": 0.25,
          "rope_theta": 1_000_000.0,
        },
      },
    }
  if family not in ("gemma3", "gemma4"):
    local_base = global_base
  rp = cfg.get("rope_parameters")
  if isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
    g = parse(rp.get("full_attention"), global_base, "rope_parameters")
    loc = parse(rp.get("sliding_attention"), local_base, "rope_parameters")
  elif isinstance(rp, dict):
    g = loc = parse(rp, global_base, "rope_parameters")
  else:
    g = parse(cfg.get("rope_scaling"), global_base, "rope_scaling")
    loc = (local_base, 1.0, 1.0) if family == "gemma3" else g
  out = dict(
    rope_global_base=g[0],
    rope_global_scale=g[1],
    rope_local_base=loc[0],
    rope_local_scale=loc[1],
  )
  if family == "gemma4":
    out.update(rope_global_proportion=g[2], rope_local_proportion=loc[2])
  return out


def _attention_types(cfg: dict[str, Any], family: str) -> tuple[str, ...]:
  n = cfg["num_hidden_layers"]
  if cfg.get("layer_types"):
    kinds = cfg["layer_types"]
    unknown = sorted({k for k in kinds if k not in _LAYER_KIND})
    if unknown or len(kinds) != n:
      raise errors.ConfigError(
        f"layer_types must list {n} entries from {sorted(_LAYER_KIND)};"
        f" got {len(kinds)} entries, unknown {unknown}."
      )
    return tuple(_LAYER_KIND[k] for k in kinds)
  if family == "gemma1":
    return ("global",) * n
  if family == "gemma2":
    return alternating_pattern(n, 2)
  kinds = alternating_pattern(n, int(cfg.get("sliding_window_pattern", 6)))
  if family == "gemma4":  # transformers forces the last layer global
    kinds = (*kinds[:-1], "global")
  return kinds


def config_from_hf(
  raw: dict[str, Any],
  *,
  parameter_dtype: str = "float32",
  activation_dtype: str | None = None,
) -> GemmaConfig:
  """Builds a `GemmaConfig` from a parsed Hugging Face ``config.json``.

  Args:
    raw: The parsed JSON (either schema; multimodal configs allowed).
    parameter_dtype: Dtype to hold parameters in.
    activation_dtype: Dtype of activations (None = ``parameter_dtype``).

  Raises:
    ConfigError: For non-Gemma configs or unsupported features.
  """
  cfg = text_config_dict(raw)
  family = _FAMILY[cfg["model_type"]]
  act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in ("gelu_pytorch_tanh", "gelu"):
    # Gemma 1 configs say "gelu" but the models use the tanh approximation,
    # as transformers itself enforces.
    raise errors.ConfigError(f"Unsupported hidden activation {act!r}.")
  bidirectional = cfg.get("use_bidirectional_attention")
  if bidirectional and not (family == "gemma4" and bidirectional == "vision"):
    # Gemma 4 26B/31B attend bidirectionally among image tokens only; text
    # (all we read) is causal.
    raise errors.ConfigError("Bidirectional Gemma (embedding models) is unsupported.")
  if not cfg.get("tie_word_embeddings", True):
    raise errors.ConfigError(
      "Gemma checkpoints tie embeddings; got tie_word_embeddings=false."
    )
  types = _attention_types(cfg, family)
  eos = cfg.get("eos_token_id", 1)
  heads = cfg["num_attention_heads"]
  head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
  return GemmaConfig(
    family=family,
    num_layers=cfg["num_hidden_layers"],
    embedding_dim=cfg["hidden_size"],
    num_heads=heads,
    num_kv_heads=cfg["num_key_value_heads"],
    head_dim=head_dim,
    mlp_hidden_dim=cfg["intermediate_size"],
    vocab_size=cfg["vocab_size"],
    attention_types=types,
    sliding_window=cfg.get("sliding_window") if "local" in types else None,
    attn_logits_soft_cap=cfg.get("attn_logit_softcapping"),
    final_logit_softcap=cfg.get("final_logit_softcapping"),
    query_pre_attn_scalar=(
      1.0 if family == "gemma4" else float(cfg.get("query_pre_attn_scalar", head_dim))
    ),
    use_qk_norm=family in ("gemma3", "gemma4"),
    use_post_attn_norm=family != "gemma1",
    use_post_ffw_norm=family != "gemma1",
    rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
    parameter_dtype=parameter_dtype,
    activation_dtype=activation_dtype,
    bos_id=int(cfg.get("bos_token_id", 2)),
    eos_id=int(eos[0] if isinstance(eos, list) else eos),
    pad_id=int(cfg.get("pad_token_id", 0)),
    **_rope(cfg, family),
    **(_gemma4_fields(cfg, types) if family == "gemma4" else {}),
  )


def _gemma4_fields(cfg: dict[str, Any], types: tuple[str, ...]) -> dict[str, Any]:
  """The Gemma 4 knobs of a ``gemma4_text`` config."""
  overrides = {int(k): v for k, v in (cfg.get("per_layer_config") or {}).items()}
  k_eq_v = bool(cfg.get("attention_k_eq_v", False))
  if overrides:
    globals_ = [i for i, t in enumerate(types) if t == "global"]
    odd = [i for i in overrides if types[i] != "global"]
    uniform = {tuple(sorted(overrides.get(i, {}).items())) for i in globals_}
    if odd or len(uniform) > 1:
      raise errors.ConfigError(
        "per_layer_config must give every full-attention layer the same"
        f" overrides and no sliding layer any; got {cfg['per_layer_config']}."
      )
    same = dict(next(iter(uniform))) if uniform else {}
    unknown = sorted(set(same) - {"head_dim", "num_key_value_heads"})
    if unknown:
      raise errors.ConfigError(f"Unsupported per_layer_config entries {unknown}.")
    global_head_dim = same.get("head_dim")
    global_kv = same.get("num_key_value_heads")
  else:
    global_head_dim = cfg.get("global_head_dim", 512)
    global_kv = cfg.get("num_global_key_value_heads") if k_eq_v else None
  moe = bool(cfg.get("enable_moe_block", False))
  head_dim = cfg.get("head_dim")
  return dict(
    global_head_dim=None if global_head_dim == head_dim else global_head_dim,
    num_global_kv_heads=global_kv,
    k_eq_v_global=k_eq_v,
    num_kv_shared_layers=int(cfg.get("num_kv_shared_layers", 0)),
    per_layer_input_dim=int(cfg.get("hidden_size_per_layer_input") or 0),
    per_layer_vocab_size=(
      None
      if cfg.get("vocab_size_per_layer_input") in (None, cfg["vocab_size"])
      or not cfg.get("hidden_size_per_layer_input")
      else int(cfg["vocab_size_per_layer_input"])
    ),
    double_wide_shared_mlp=bool(cfg.get("use_double_wide_mlp", False)),
    num_experts=int(cfg.get("num_experts") or 0) if moe else 0,
    top_k_experts=int(cfg.get("top_k_experts") or 0) if moe else 0,
    expert_hidden_dim=int(cfg.get("moe_intermediate_size") or 0) if moe else 0,
  )
