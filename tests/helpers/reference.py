"""An independent float64 numpy forward pass of Gemma 1/2/3 for tests.

Written from the published architecture directly on Hugging Face safetensors
weights (HF names); no gemma_surgery code. Returns every site's activation,
keyed like `gemma_surgery.Captures`.
"""

from __future__ import annotations

import json
import math

import numpy as np
from safetensors.numpy import load_file


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
  """Gemma RMSNorm over the last axis: x / sqrt(mean(x²) + eps) * (1 + w)."""
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * (1.0 + weight)


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
  return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _rope(x: np.ndarray, base: float, factor: float) -> np.ndarray:
  """Half-split RoPE (HF ``rotate_half``) of ``x[b, t, head, h]``.

  Linear scaling divides the positions by ``factor``.
  """
  h = x.shape[-1]
  inv_freq = base ** (-np.arange(0, h, 2, dtype=np.float64) / h)
  positions = np.arange(x.shape[1], dtype=np.float64) / factor
  angles = positions[:, None] * inv_freq[None, :]  # [t, h/2]
  angles = np.concatenate([angles, angles], axis=-1)  # [t, h]
  cos, sin = np.cos(angles)[None, :, None, :], np.sin(angles)[None, :, None, :]
  x1, x2 = x[..., : h // 2], x[..., h // 2 :]
  rotated = np.concatenate([-x2, x1], axis=-1)
  return x * cos + rotated * sin


def _layer_rope(config: dict, layer_type: str) -> tuple[float, float]:
  """(base, linear factor) of a layer from config.json's rope_parameters."""
  rope = config["rope_parameters"]
  if layer_type in rope:  # Gemma 3: one entry per layer type.
    rope = rope[layer_type]
  factor = rope.get("factor", 1.0) if rope.get("rope_type") == "linear" else 1.0
  return rope["rope_theta"], factor


def layer_types(config: dict) -> list[str]:
  return config.get("layer_types") or ["full_attention"] * config["num_hidden_layers"]


def reference_forward(
  directory,
  tokens: np.ndarray,
  *,
  kv_head_of=None,
  config_changes: dict | None = None,
) -> dict:
  """Gemma 1/2/3 forward in float64 numpy, straight from config + safetensors.

  Args:
    directory: An HF checkpoint folder (config.json, model.safetensors).
    tokens: ``[batch, seq]`` token ids.
    kv_head_of: Override of the query head → kv head map (negative controls).
    config_changes: Overrides of config.json entries (negative controls).

  Returns:
    ``{(site, layer): array}`` for per-layer sites and ``{site: array}`` for
    global ones, arrays laid out as ``[batch, seq, *SITES[site].axes]``.
  """
  config = json.loads((directory / "config.json").read_text())
  config.update(config_changes or {})
  w = {
    k: v.astype(np.float64)
    for k, v in load_file(directory / "model.safetensors").items()
  }
  family = config["model_type"]  # gemma, gemma2, gemma3_text
  gemma1 = family == "gemma"
  d = config["hidden_size"]
  n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
  h = config["head_dim"]
  eps = config["rms_norm_eps"]
  window = config.get("sliding_window")
  # Gemma 1 scales queries by head_dim**-0.5; Gemma 2/3 by query_pre_attn_scalar.
  query_scale = config.get("query_pre_attn_scalar", h) ** -0.5
  attn_cap = config.get("attn_logit_softcapping")
  final_cap = config.get("final_logit_softcapping")
  if kv_head_of is None:
    kv_head_of = lambda head: head // (n_heads // n_kv)  # noqa: E731
  kv_index = np.array([kv_head_of(i) for i in range(n_heads)])

  out: dict = {}
  b, t = tokens.shape
  embedding = w["model.embed_tokens.weight"]
  # embed: token embeddings times sqrt(d_model).
  x = embedding[tokens] * np.sqrt(d)
  out["embed"] = x
  q_pos = np.arange(t)[:, None]
  k_pos = np.arange(t)[None, :]
  for layer, layer_type in enumerate(layer_types(config)):
    p = f"model.layers.{layer}."
    out["resid_pre", layer] = x  # resid_pre: input of block L.
    normed = rms_norm(x, w[p + "input_layernorm.weight"], eps)
    q = (normed @ w[p + "self_attn.q_proj.weight"].T).reshape(b, t, n_heads, h)
    k = (normed @ w[p + "self_attn.k_proj.weight"].T).reshape(b, t, n_kv, h)
    v = (normed @ w[p + "self_attn.v_proj.weight"].T).reshape(b, t, n_kv, h)
    if p + "self_attn.q_norm.weight" in w:  # Gemma 3 QK-norm over head_dim.
      q = rms_norm(q, w[p + "self_attn.q_norm.weight"], eps)
      k = rms_norm(k, w[p + "self_attn.k_norm.weight"], eps)
    base, factor = _layer_rope(config, layer_type)
    q, k = _rope(q, base, factor), _rope(k, base, factor)
    out["attn.q", layer] = q  # attn.q: after QK-norm and RoPE, before scaling.
    out["attn.k", layer] = k  # attn.k: after QK-norm and RoPE, kv heads.
    out["attn.v", layer] = v  # attn.v: value projection, kv heads.
    k_per_q, v_per_q = k[:, :, kv_index], v[:, :, kv_index]  # GQA grouping.
    scores = np.einsum("bqnh,bknh->bqnk", q * query_scale, k_per_q)
    if attn_cap is not None:  # Gemma 2 attention soft cap.
      scores = np.tanh(scores / attn_cap) * attn_cap
    visible = k_pos <= q_pos
    if layer_type == "sliding_attention":
      visible = visible & (k_pos > q_pos - window)
    visible = np.broadcast_to(visible[None, :, None, :], scores.shape)
    # attn.scores: scaled, soft-capped logits; masked entries (not compared
    # here) hold a large negative constant.
    out["attn.scores", layer] = np.where(visible, scores, np.nan)
    shifted = np.where(visible, scores - scores.max(-1, keepdims=True), -np.inf)
    pattern = np.exp(shifted)
    pattern /= pattern.sum(-1, keepdims=True)
    out["attn.pattern", layer] = pattern  # attn.pattern: softmax weights.
    z = np.einsum("bqnk,bknh->bqnh", pattern, v_per_q)
    out["attn.z", layer] = z  # attn.z: per-head mixed values before o_proj.
    attn = z.reshape(b, t, n_heads * h) @ w[p + "self_attn.o_proj.weight"].T
    if not gemma1:  # Gemma 2/3 post-attention norm.
      attn = rms_norm(attn, w[p + "post_attention_layernorm.weight"], eps)
    out["attn.out", layer] = attn  # attn.out: sublayer output after post-norm.
    x = x + attn
    out["resid_mid", layer] = x  # resid_mid: residual after attention.
    # In Gemma 1, HF's post_attention_layernorm *is* the pre-MLP norm.
    pre_ffw = "post_attention_layernorm" if gemma1 else "pre_feedforward_layernorm"
    mlp_in = rms_norm(x, w[p + pre_ffw + ".weight"], eps)
    # mlp.in_unscaled: the same norm without its gain, x / rms(x).
    out["mlp.in_unscaled", layer] = rms_norm(x, np.zeros(d), eps)
    out["mlp.in", layer] = mlp_in  # mlp.in: pre-FFW norm output.
    gate = mlp_in @ w[p + "mlp.gate_proj.weight"].T
    up = mlp_in @ w[p + "mlp.up_proj.weight"].T
    hidden = _gelu_tanh(gate) * up
    out["mlp.hidden", layer] = hidden  # mlp.hidden: gelu_tanh(gate) * up.
    mlp = hidden @ w[p + "mlp.down_proj.weight"].T
    if not gemma1:  # Gemma 2/3 post-FFW norm.
      mlp = rms_norm(mlp, w[p + "post_feedforward_layernorm.weight"], eps)
    out["mlp.out", layer] = mlp  # mlp.out: sublayer output after post-norm.
    x = x + mlp
    out["resid_post", layer] = x  # resid_post: output of block L.
  final = rms_norm(x, w["model.norm.weight"], eps)
  out["final_norm"] = final  # final_norm: final RMSNorm output.
  logits = final @ embedding.T  # Tied unembedding.
  if final_cap is not None:  # Gemma 2 final soft cap.
    logits = np.tanh(logits / final_cap) * final_cap
  out["logits"] = logits  # logits: model output.
  return out
