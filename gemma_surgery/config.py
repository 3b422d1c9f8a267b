"""`GemmaConfig`: every architecture knob of a Gemma 1, 2, 3 or 4 text model.

One frozen dataclass describes the whole architecture, layer by layer. It is
built from a named preset (the published hyperparameters), from a Hugging Face
``config.json`` (see `gemma_surgery.loading.hf_config`), or inferred from the
shapes of a checkpoint plus a named variant (see
`gemma_surgery.loading.kaggle`).

Conventions:
  * Layers are 0-based. ``attention_types[i]`` is ``"local"`` (causal sliding
    window of ``sliding_window`` tokens: a query at position ``q`` sees keys at
    ``q - window < k <= q``) or ``"global"`` (plain causal).
  * Query heads are ordered ``head = kv_group * (num_heads // num_kv_heads) + q``
    as in Hugging Face and the Flax checkpoints.
  * Attention logits are ``q . k * query_pre_attn_scalar ** -0.5``.
  * RMSNorm weights are stored as ``w`` and applied as ``x * (1 + w)`` on
    Gemma 1-3 and as ``x * w`` on Gemma 4 (`norm_offset`).
  * Gemma 4 layers differ from one another: `layer_head_dim`,
    `layer_kv_heads`, `layer_mlp_dim`, `kv_source` and friends give a layer's
    own values (see `gemma_surgery.config_gemma4` for its presets).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from gemma_surgery import config_gemma4, errors

AttentionKind = Literal["local", "global"]
Family = Literal["gemma1", "gemma2", "gemma3", "gemma4"]
_FAMILIES = ("gemma1", "gemma2", "gemma3", "gemma4")
_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclasses.dataclass(frozen=True, kw_only=True)
class GemmaConfig:
  """Architecture of a Gemma text model.

  Attributes:
    family: ``"gemma1"``, ``"gemma2"``, ``"gemma3"`` or ``"gemma4"``.
    num_layers: Number of transformer blocks.
    embedding_dim: Residual stream width ``d_model`` (axis ``embedding``).
    num_heads: Number of query heads.
    num_kv_heads: Number of key/value heads (1 = MQA, ``num_heads`` = MHA).
    head_dim: Per-head width (axis ``projection``).
    mlp_hidden_dim: GeGLU width (axis ``neurons``).
    vocab_size: Vocabulary size (axis ``vocabulary``).
    attention_types: Per-layer ``"local"``/``"global"``, one entry per layer.
    sliding_window: Window of the local layers (None if there are none).
    attn_logits_soft_cap: ``tanh`` soft cap of attention logits (Gemma 2).
    final_logit_softcap: ``tanh`` soft cap of output logits (Gemma 2).
    query_pre_attn_scalar: Queries are scaled by this ``** -0.5``.
    rope_global_base: RoPE max wavelength of global layers.
    rope_local_base: RoPE max wavelength of local layers.
    rope_global_scale: Linear RoPE scaling factor of global layers (positions
      are divided by it; 8 for Gemma 3 4B and larger).
    rope_local_scale: Linear RoPE scaling factor of local layers.
    use_qk_norm: RMSNorm over ``projection`` of queries and keys (Gemma 3).
    use_post_attn_norm: RMSNorm on the attention output before the residual.
    use_post_ffw_norm: RMSNorm on the MLP output before the residual.
    tie_embeddings: Unembedding is the transposed embedding table.
    rms_norm_eps: Epsilon of every RMSNorm.
    parameter_dtype: Dtype of the parameters (``float32``/``bfloat16``).
    activation_dtype: Dtype of activations (None = same as parameters).
    bos_id: Token id of beginning-of-sequence.
    eos_id: Token id of end-of-sequence.
    pad_id: Token id of padding.
    global_head_dim: Gemma 4: head width of global layers (None: `head_dim`).
    num_global_kv_heads: Gemma 4: kv heads of global layers (None:
      `num_kv_heads`).
    k_eq_v_global: Gemma 4: global layers use the key projection as values
      (values = RMS-standardized keys before key norm and RoPE).
    rope_global_proportion: Fraction of each head's dimensions rotated by
      RoPE on global layers (Hugging Face ``proportional`` RoPE with
      ``partial_rotary_factor``); the rest carry no position.
    rope_local_proportion: The same on local layers.
    num_kv_shared_layers: Gemma 4: the last this many layers compute no
      keys/values and reuse those of the last earlier layer of their
      attention kind (`kv_source`).
    per_layer_input_dim: Gemma 4 E models: width of the per-layer embeddings
      (0 = none).
    per_layer_vocab_size: Vocabulary of the per-layer embedding table (None:
      `vocab_size`).
    double_wide_shared_mlp: Gemma 4 E2B: KV-shared layers have an MLP twice
      as wide (Hugging Face ``use_double_wide_mlp``).
    num_experts: Gemma 4 mixture of experts: experts per layer (0 = dense).
    top_k_experts: Experts each token is routed to.
    expert_hidden_dim: GeGLU width of one expert.
  """

  family: Family
  num_layers: int
  embedding_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_hidden_dim: int
  vocab_size: int
  attention_types: tuple[AttentionKind, ...]
  sliding_window: int | None = None
  attn_logits_soft_cap: float | None = None
  final_logit_softcap: float | None = None
  query_pre_attn_scalar: float
  rope_global_base: float = 10_000.0
  rope_local_base: float = 10_000.0
  rope_global_scale: float = 1.0
  rope_local_scale: float = 1.0
  use_qk_norm: bool = False
  use_post_attn_norm: bool = False
  use_post_ffw_norm: bool = False
  tie_embeddings: bool = True
  rms_norm_eps: float = 1e-6
  parameter_dtype: str = "float32"
  activation_dtype: str | None = None
  bos_id: int = 2
  eos_id: int = 1
  pad_id: int = 0
  global_head_dim: int | None = None
  num_global_kv_heads: int | None = None
  k_eq_v_global: bool = False
  rope_global_proportion: float = 1.0
  rope_local_proportion: float = 1.0
  num_kv_shared_layers: int = 0
  per_layer_input_dim: int = 0
  per_layer_vocab_size: int | None = None
  double_wide_shared_mlp: bool = False
  num_experts: int = 0
  top_k_experts: int = 0
  expert_hidden_dim: int = 0

  def __post_init__(self):
    object.__setattr__(self, "attention_types", tuple(self.attention_types))
    self.validate()

  # -- validation -----------------------------------------------------------

  def validate(self) -> None:
    """Raises `ConfigError` naming the first inconsistent knob."""

    def fail(msg: str):
      raise errors.ConfigError(f"Invalid GemmaConfig: {msg}")

    if self.family not in _FAMILIES:
      fail(f"family={self.family!r}; valid: {', '.join(map(repr, _FAMILIES))}")
    for name in (
      "num_layers",
      "embedding_dim",
      "num_heads",
      "num_kv_heads",
      "head_dim",
      "mlp_hidden_dim",
      "vocab_size",
    ):
      value = getattr(self, name)
      if not isinstance(value, int) or value <= 0:
        fail(f"{name}={value!r} must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      fail(
        f"num_heads={self.num_heads} is not a multiple of"
        f" num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      fail(f"head_dim={self.head_dim} must be even for RoPE")
    if len(self.attention_types) != self.num_layers:
      fail(
        f"attention_types has {len(self.attention_types)} entries for"
        f" num_layers={self.num_layers}"
      )
    bad = [t for t in self.attention_types if t not in ("local", "global")]
    if bad:
      fail(f"attention_types contains {bad[0]!r}; valid: 'local', 'global'")
    if "local" in self.attention_types and not self.sliding_window:
      fail("local layers need a positive sliding_window")
    if self.sliding_window is not None and self.sliding_window <= 0:
      fail(f"sliding_window={self.sliding_window} must be positive")
    for dtype_name in ("parameter_dtype", "activation_dtype"):
      value = getattr(self, dtype_name)
      if value is not None and value not in _DTYPES:
        fail(f"{dtype_name}={value!r}; valid: {', '.join(_DTYPES)}")
    if self.query_pre_attn_scalar <= 0:
      fail(f"query_pre_attn_scalar={self.query_pre_attn_scalar} <= 0")
    config_gemma4.validate(self, fail)

  # -- derived quantities ---------------------------------------------------

  @property
  def queries_per_kv_head(self) -> int:
    return self.num_heads // self.num_kv_heads

  @property
  def query_scale(self) -> float:
    return self.query_pre_attn_scalar**-0.5

  @property
  def compute_dtype(self) -> str:
    return self.activation_dtype or self.parameter_dtype

  def is_local(self, layer: int) -> bool:
    return self.attention_types[layer] == "local"

  def rope_base(self, layer: int) -> float:
    return self.rope_local_base if self.is_local(layer) else self.rope_global_base

  def rope_scale(self, layer: int) -> float:
    return self.rope_local_scale if self.is_local(layer) else self.rope_global_scale

  # -- per-layer quantities (Gemma 4 layers differ) --------------------------

  @property
  def norm_offset(self) -> float:
    """RMSNorm scales by ``offset + w``: 1 on Gemma 1-3, 0 on Gemma 4."""
    return 0.0 if self.family == "gemma4" else 1.0

  @property
  def uses_moe(self) -> bool:
    return self.num_experts > 0

  def layer_head_dim(self, layer: int) -> int:
    if self.global_head_dim is not None and not self.is_local(layer):
      return self.global_head_dim
    return self.head_dim

  def layer_kv_heads(self, layer: int) -> int:
    if self.num_global_kv_heads is not None and not self.is_local(layer):
      return self.num_global_kv_heads
    return self.num_kv_heads

  def is_k_eq_v(self, layer: int) -> bool:
    return self.k_eq_v_global and not self.is_local(layer)

  def rope_proportion(self, layer: int) -> float:
    if self.is_local(layer):
      return self.rope_local_proportion
    return self.rope_global_proportion

  def kv_source(self, layer: int) -> int:
    """The layer whose keys/values ``layer`` attends over (itself if unshared)."""
    first = self.num_layers - self.num_kv_shared_layers
    if layer < first:
      return layer
    kind = self.attention_types[layer]
    return max(i for i in range(first) if self.attention_types[i] == kind)

  def is_kv_shared(self, layer: int) -> bool:
    return self.kv_source(layer) != layer

  def kv_consumers(self, layer: int) -> tuple[int, ...]:
    """The later layers that reuse ``layer``'s keys/values."""
    return tuple(
      i for i in range(self.num_layers) if i != layer and self.kv_source(i) == layer
    )

  def layer_mlp_dim(self, layer: int) -> int:
    wide = self.double_wide_shared_mlp and self.is_kv_shared(layer)
    return self.mlp_hidden_dim * (2 if wide else 1)

  def replace(self, **changes: Any) -> GemmaConfig:
    """Returns a copy with some fields changed (and re-validated)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["attention_types"] = list(self.attention_types)
    return out

  @classmethod
  def from_dict(cls, data: dict[str, Any]) -> GemmaConfig:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
      raise errors.ConfigError(
        f"Unknown GemmaConfig fields {unknown}; valid: {sorted(known)}"
      )
    return cls(**data)

  def num_parameters(self) -> int:
    """Number of scalar parameters (tied embeddings counted once).

    Gemma 4 KV-shared layers hold no key/value weights, as in Hugging Face.
    """
    return config_gemma4.num_parameters(self)


def alternating_pattern(num_layers: int, period: int) -> tuple[AttentionKind, ...]:
  """Local layers except every ``period``-th (1-based), as Gemma 2 and 3 do."""
  return tuple(
    "global" if (i + 1) % period == 0 else "local" for i in range(num_layers)
  )


def _gemma1(layers, d, heads, kv, mlp) -> dict[str, Any]:
  return dict(
    family="gemma1",
    num_layers=layers,
    embedding_dim=d,
    num_heads=heads,
    num_kv_heads=kv,
    head_dim=256,
    mlp_hidden_dim=mlp,
    vocab_size=256_128,
    attention_types=("global",) * layers,
    query_pre_attn_scalar=256,
  )


def _gemma2(layers, d, heads, kv, head_dim, mlp, qpas) -> dict[str, Any]:
  return dict(
    family="gemma2",
    num_layers=layers,
    embedding_dim=d,
    num_heads=heads,
    num_kv_heads=kv,
    head_dim=head_dim,
    mlp_hidden_dim=mlp,
    vocab_size=256_128,
    attention_types=alternating_pattern(layers, 2),
    sliding_window=4096,
    attn_logits_soft_cap=50.0,
    final_logit_softcap=30.0,
    query_pre_attn_scalar=qpas,
    use_post_attn_norm=True,
    use_post_ffw_norm=True,
  )


def _gemma3(layers, d, heads, kv, head_dim, mlp, window, scale, qpas):
  return dict(
    family="gemma3",
    num_layers=layers,
    embedding_dim=d,
    num_heads=heads,
    num_kv_heads=kv,
    head_dim=head_dim,
    mlp_hidden_dim=mlp,
    vocab_size=262_144,
    attention_types=alternating_pattern(layers, 6),
    sliding_window=window,
    query_pre_attn_scalar=qpas,
    rope_global_base=1_000_000.0,
    rope_local_base=10_000.0,
    rope_global_scale=scale,
    use_qk_norm=True,
    use_post_attn_norm=True,
    use_post_ffw_norm=True,
  )


# Published hyperparameters of the text models (Gemma 1/2/3 papers, the
# reference `gemma` library and the Hugging Face configs).
_PRESETS: dict[str, dict[str, Any]] = {
  "gemma_2b": _gemma1(18, 2048, 8, 1, 16_384),
  "gemma_7b": _gemma1(28, 3072, 16, 16, 24_576),
  "gemma2_2b": _gemma2(26, 2304, 8, 4, 256, 9216, 256),
  "gemma2_9b": _gemma2(42, 3584, 16, 8, 256, 14_336, 256),
  "gemma2_27b": _gemma2(46, 4608, 32, 16, 128, 36_864, 4608 // 32),
  "gemma3_270m": _gemma3(18, 640, 4, 1, 256, 2048, 512, 1.0, 256),
  "gemma3_1b": _gemma3(26, 1152, 4, 1, 256, 6912, 512, 1.0, 256),
  "gemma3_4b": _gemma3(34, 2560, 8, 4, 256, 10_240, 1024, 8.0, 256),
  "gemma3_12b": _gemma3(48, 3840, 16, 8, 256, 15_360, 1024, 8.0, 256),
  "gemma3_27b": _gemma3(62, 5376, 32, 16, 128, 21_504, 1024, 8.0, 5376 // 32),
}


_PRESETS.update(config_gemma4.PRESETS)


def preset_names() -> tuple[str, ...]:
  """Names accepted by `preset`."""
  return tuple(_PRESETS)


def normalize_variant_name(name: str) -> str:
  """Maps spellings like ``gemma-2-2b-it`` / ``gemma3-1b`` to a preset name."""
  key = name.strip().lower().replace("-", "_").replace(".", "_")
  for suffix in ("_it", "_pt"):
    key = key.removesuffix(suffix)
  for family in ("gemma_2_", "gemma_3_", "gemma_4_"):
    if key.startswith(family):
      key = "gemma" + family[6] + "_" + key[len(family) :]
  if key.startswith(("gemma2", "gemma3", "gemma4")) and not key.startswith(
    ("gemma2_", "gemma3_", "gemma4_")
  ):
    key = key[:6] + "_" + key[6:]
  return key


def preset(name: str, **overrides: Any) -> GemmaConfig:
  """Returns the published config of a named Gemma text model.

  Args:
    name: A preset name such as ``"gemma2_2b"`` (see `preset_names`); common
      spellings like ``"gemma-2-2b-it"`` are accepted.
    **overrides: Fields to change, e.g. ``parameter_dtype="bfloat16"``.

  Raises:
    ConfigError: If the name is unknown.
  """
  key = normalize_variant_name(name)
  if key not in _PRESETS:
    raise errors.ConfigError(
      f"Unknown Gemma variant {name!r}; valid: {', '.join(_PRESETS)}"
    )
  return GemmaConfig(**{**_PRESETS[key], **overrides})
