"""Published hyperparameters of the Gemma 4 text decoders (pure data).

Read from Google's reference implementation (the ``gemma`` library's
``gm.nn.gemma4`` model definitions: ``Gemma4_E2B``, ``Gemma4_E4B``,
``Gemma4_31B``, ``Gemma4_26B_A4B``) and cross-checked against Hugging Face
``transformers``' ``Gemma4TextConfig`` (whose ``global_head_dim`` defaults to
512 and whose full-attention layers use ``proportional`` RoPE with
``partial_rotary_factor`` 0.25, theta 1e6; sliding layers theta 1e4).

Shared by all four: vocabulary 262 144, head_dim 256 on sliding layers and
512 on global ones, QK-norm, post-attention/post-FFW norms, no attention
soft cap, final logit soft cap 30, queries unscaled (``scaling = 1``),
RMSNorm applied as ``x * w`` (no ``1 +``). `gemma_surgery.config.preset`
serves them; this module imports nothing of ours, so the ground floor stays
acyclic: it also holds the Gemma 4 parts of `GemmaConfig`'s validation and
parameter count, as functions of the config, and `describe_layers`, the
per-layer summary of any config that the tour and ``gemma-surgery info``
print (Gemma 4 layers differ in head width, kv heads and MLP width).
"""

from __future__ import annotations

from typing import Any


def validate(config: Any, fail: Any) -> None:
  """Checks of a `GemmaConfig`'s Gemma 4 knobs (all off on Gemma 1-3)."""
  gemma4 = (
    config.global_head_dim,
    config.num_global_kv_heads,
    config.k_eq_v_global or None,
    config.num_kv_shared_layers or None,
    config.per_layer_input_dim or None,
    config.double_wide_shared_mlp or None,
    config.num_experts or None,
  )
  if config.family != "gemma4" and any(v is not None for v in gemma4):
    fail(f"Gemma 4 knobs are set on a {config.family} config")
  for name in ("global_head_dim", "num_global_kv_heads"):
    value = getattr(config, name)
    if value is not None and (not isinstance(value, int) or value <= 0):
      fail(f"{name}={value!r} must be a positive integer or None")
  if config.num_global_kv_heads and config.num_heads % config.num_global_kv_heads:
    fail(
      f"num_heads={config.num_heads} is not a multiple of"
      f" num_global_kv_heads={config.num_global_kv_heads}"
    )
  if config.global_head_dim is not None and config.global_head_dim % 2:
    fail(f"global_head_dim={config.global_head_dim} must be even for RoPE")
  for name in ("rope_global_proportion", "rope_local_proportion"):
    value = getattr(config, name)
    if not 0.0 <= value <= 1.0:
      fail(f"{name}={value} must be in [0, 1]")
  if not 0 <= config.num_kv_shared_layers < config.num_layers:
    fail(
      f"num_kv_shared_layers={config.num_kv_shared_layers}; valid:"
      f" 0..{config.num_layers - 1}"
    )
  first = config.num_layers - config.num_kv_shared_layers
  for kind in set(config.attention_types[first:]):
    if kind not in config.attention_types[:first]:
      fail(
        f"KV-shared {kind} layers have no earlier {kind} layer to take"
        f" keys/values from (num_kv_shared_layers={config.num_kv_shared_layers})"
      )
  if config.per_layer_input_dim < 0:
    fail(f"per_layer_input_dim={config.per_layer_input_dim} must be >= 0")
  if config.per_layer_vocab_size is not None and config.per_layer_vocab_size <= 0:
    fail(f"per_layer_vocab_size={config.per_layer_vocab_size} must be positive")
  if config.num_experts:
    if not 0 < config.top_k_experts <= config.num_experts:
      fail(
        f"top_k_experts={config.top_k_experts}; valid: 1..num_experts"
        f"={config.num_experts}"
      )
    if config.expert_hidden_dim <= 0:
      fail(f"expert_hidden_dim={config.expert_hidden_dim} must be positive")
  elif config.top_k_experts or config.expert_hidden_dim:
    fail("top_k_experts/expert_hidden_dim are set but num_experts is 0")


def num_parameters(config: Any) -> int:
  """`GemmaConfig.num_parameters` (tied embeddings counted once).

  Gemma 4 KV-shared layers hold no key/value weights, as in Hugging Face.
  """
  d = config.embedding_dim
  total = config.vocab_size * d * (1 if config.tie_embeddings else 2) + d
  p = config.per_layer_input_dim
  if p:
    vocab = config.per_layer_vocab_size or config.vocab_size
    total += (vocab + d) * config.num_layers * p + p
  for i in range(config.num_layers):
    h, k = config.layer_head_dim(i), config.layer_kv_heads(i)
    total += 2 * config.num_heads * d * h
    if not config.is_kv_shared(i):
      total += (1 if config.is_k_eq_v(i) else 2) * k * d * h
    norms = 2 + config.use_post_attn_norm + config.use_post_ffw_norm
    qk = (1 if config.is_kv_shared(i) else 2) * h * config.use_qk_norm
    total += d * norms + qk + 3 * d * config.layer_mlp_dim(i)
    if config.family == "gemma4":
      total += 1  # layer scalar
    if p:
      total += 2 * d * p + d
    if config.num_experts:
      e = config.num_experts
      total += 3 * e * d * config.expert_hidden_dim + d * e + d + e + 3 * d
  return total


def layer_spec(config: Any, layer: int) -> str:
  """One layer's attention and MLP shape, e.g. ``'local (window 512): 8 heads
  x 256, kv 1; mlp 6144'`` (a KV-shared layer says whose keys it reads)."""
  kind = "global"
  if config.is_local(layer):
    kind = f"local (window {config.sliding_window})"
  parts = [f"{kind}: {config.num_heads} heads x {config.layer_head_dim(layer)}"]
  if config.is_kv_shared(layer):  # the source layer's kv heads and k = v
    parts.append(f"kv of layer {config.kv_source(layer)}")
  else:
    parts.append(f"kv {config.layer_kv_heads(layer)}")
    if config.is_k_eq_v(layer):
      parts.append("k = v")
  if config.rope_proportion(layer) < 1:
    parts.append(f"RoPE on {config.rope_proportion(layer):.0%} of dims")
  if config.rope_scale(layer) != 1:
    parts.append(f"RoPE positions / {config.rope_scale(layer):g}")
  mlp = f"mlp {config.layer_mlp_dim(layer)}"
  if config.num_experts:
    mlp += (
      f" + {config.num_experts} experts x {config.expert_hidden_dim}"
      f" (top {config.top_k_experts})"
    )
  return ", ".join(parts) + "; " + mlp


def layer_ranges(layers: list[int], most: int = 6) -> str:
  """``[0, 1, 2, 5]`` -> ``'0-2, 5'``; past ``most`` runs, the middle is elided."""
  runs: list[list[int]] = []
  for i in layers:
    if runs and i == runs[-1][-1] + 1:
      runs[-1].append(i)
    else:
      runs.append([i])
  text = [f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs]
  if len(text) > most:
    text = [*text[: most - 2], "...", text[-1]]
  return ", ".join(text)


def describe_layers(config: Any) -> list[tuple[str, str]]:
  """``(layers, spec)`` for each distinct `layer_spec`, in order of first use.

  Gemma 1-3 give one or two rows (local and global layers); Gemma 4 more,
  since head width, kv heads, KV sharing and MLP width vary by layer.
  """
  groups: dict[str, list[int]] = {}
  for i in range(config.num_layers):
    groups.setdefault(layer_spec(config, i), []).append(i)
  return [
    (
      f"layer {ls[0]}" if len(ls) == 1 else f"layers {layer_ranges(ls)} ({len(ls)})",
      spec,
    )
    for spec, ls in groups.items()
  ]


def _pattern(num_layers: int, period: int) -> tuple[str, ...]:
  """Local layers with every ``period``-th (1-based) global."""
  return tuple(
    "global" if (i + 1) % period == 0 else "local" for i in range(num_layers)
  )


def _gemma4(
  layers: int,
  d: int,
  heads: int,
  kv: int,
  global_kv: int | None,
  mlp: int,
  period: int,
  window: int,
  **extra: Any,
) -> dict[str, Any]:
  return dict(
    family="gemma4",
    num_layers=layers,
    embedding_dim=d,
    num_heads=heads,
    num_kv_heads=kv,
    head_dim=256,
    global_head_dim=512,
    num_global_kv_heads=global_kv,
    mlp_hidden_dim=mlp,
    vocab_size=262_144,
    attention_types=_pattern(layers, period),
    sliding_window=window,
    final_logit_softcap=30.0,
    query_pre_attn_scalar=1.0,
    rope_global_base=1_000_000.0,
    rope_local_base=10_000.0,
    rope_global_proportion=0.25,
    use_qk_norm=True,
    use_post_attn_norm=True,
    use_post_ffw_norm=True,
    **extra,
  )


PRESETS: dict[str, dict[str, Any]] = {
  # 35 layers (4 local : 1 global), the last 20 reuse keys/values, their MLPs
  # twice as wide (12 288), per-layer embeddings of width 256.
  "gemma4_e2b": _gemma4(
    35,
    1536,
    8,
    1,
    None,
    6144,
    5,
    512,
    num_kv_shared_layers=20,
    double_wide_shared_mlp=True,
    per_layer_input_dim=256,
  ),
  # 42 layers (5 : 1), the last 18 reuse keys/values, per-layer embeddings.
  "gemma4_e4b": _gemma4(
    42,
    2560,
    8,
    2,
    None,
    10_240,
    6,
    512,
    num_kv_shared_layers=18,
    per_layer_input_dim=256,
  ),
  # 30 layers, 128 experts of width 704 (top 8) beside a dense MLP of 2112;
  # global layers: 2 kv heads, keys = values.
  "gemma4_26b_a4b": _gemma4(
    30,
    2816,
    16,
    8,
    2,
    2112,
    6,
    1024,
    k_eq_v_global=True,
    num_experts=128,
    top_k_experts=8,
    expert_hidden_dim=704,
  ),
  # 60 layers, dense; global layers: 4 kv heads, keys = values.
  "gemma4_31b": _gemma4(60, 5376, 32, 16, 4, 21_504, 6, 1024, k_eq_v_global=True),
}
