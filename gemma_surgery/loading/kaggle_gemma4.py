"""Gemma 4 Kaggle/Flax checkpoints: the ``gemma`` 4.x tree -> canonical params.

The ``gemma`` library (4.0.1, ``gm/nn/gemma4``) defines Gemma 4 as Flax linen
modules; its orbax checkpoints hold their ``model.init`` parameters in the
same flat, nested or stacked layouts as Gemma 1-3
(`gemma_surgery.loading.kaggle_layout` reduces them to module names). The
mapping below was read from that library's code (``_modules.py``,
``_moe.py``, ``_layers.py``, ``_transformer.py``, ``ckpts/_checkpoint.py``),
not from a released checkpoint file. N query heads, K kv heads, H head dim
(all per layer), D embedding, F MLP width, P per-layer width, L layers,
E experts, X expert width::

  embedder/input_embedding            [V, D]     -> embedder
  embedder/per_layer_embeddings       [V, L, P]  -> per_layer_embedder
  embedder/per_layer_model_projection [D, L, P]  -> per_layer_projection
  embedder/per_layer_projection_norm  [P]        -> per_layer_projection_norm
  final_norm                          [D]        -> final_norm
  layer_i/skip_scale                  [1]        -> layer_scalar []
  layer_i/attn/q_einsum               [N, D, H]  -> attn/q
  layer_i/attn/kv_einsum              [2, K, D, H] -> attn/k, attn/v
  layer_i/attn/k_einsum               [K, D, H]  -> attn/k (k = v layers)
  layer_i/attn/attn_vec_einsum        [N, H, D]  -> attn/o
  layer_i/attn/query_norm, key_norm   [H]        -> same names
  layer_i/per_layer_input_gate        [D, P]     -> per_layer_input/gate
  layer_i/per_layer_projection        [P, D]     -> per_layer_input/projection
  layer_i/post_per_layer_input_norm   [D]        -> per_layer_input/norm

A dense layer's MLP is ``mlp`` (``gating_einsum [2, F, D]`` -> ``mlp/gate =
w[0].T``, ``mlp/up = w[1].T``; ``linear [F, D]`` -> ``mlp/down``) between
``pre_ffw_norm`` and ``post_ffw_norm``. A mixture-of-experts layer names its
dense branch ``mlp2`` (``pre_ffw2_norm`` -> ``pre_ffw_norm``,
``post_ffw2_norm`` -> ``post_ffw_norm_1``) and its experts ``mlp``
(``pre_ffw_norm`` -> ``moe/pre_norm``, ``post_ffw1_norm`` ->
``moe/post_norm``); ``post_ffw_norm`` follows their sum::

  layer_i/mlp/router_logits    [D, E]        -> moe/router
  layer_i/mlp/router_scale     [D]           -> moe/router_norm
  layer_i/mlp/per_expert_scale [E]           -> moe/per_expert_scale
  layer_i/mlp/gating_einsum    [E, 2, X, D]  -> moe/gate = w[:, 0] as [E, D, X],
                                                moe/up = w[:, 1]
  layer_i/mlp/linear           [E, X, D]     -> moe/down

Norm weights are copied as stored (Gemma 4's RMSNorm multiplies by ``w``).
The library still creates ``kv_einsum``/``k_einsum`` and ``key_norm`` in
KV-shared layers (a TODO in its ``Attention``); they are never read. Vision
and audio weights (``vision_encoder``, ``audio_encoder``, ``embedder/mm_*``,
``embedder/audio_*``) are ignored.

A Flax checkpoint has no config file, and the sliding window, RoPE settings,
soft cap and how many layers share keys/values don't show in the shapes, so
the config is the published preset whose every shape matches (or the
``variant``/``config`` given, checked against the shapes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from gemma_surgery import errors
from gemma_surgery.config import GemmaConfig, preset, preset_names
from gemma_surgery.loading.kaggle_layout import Part, Ref, layer_indices
from gemma_surgery.model import parameters as canonical

Plan = dict[str, tuple[Ref, Part]]

_LAYER = re.compile(r"^layer_(\d+)/(.+)$")
# Names only the Gemma 4 tree has (layer scalar, per-layer embeddings, k = v
# projection, the MoE block's dense twin and router).
_MARKERS = ("skip_scale", "per_layer_embeddings", "k_einsum", "mlp2", "router_logits")
_NORMS = (
  "pre_attention_norm",
  "post_attention_norm",
  "pre_ffw_norm",
  "post_ffw_norm",
  "pre_ffw2_norm",
  "post_ffw1_norm",
  "post_ffw2_norm",
  "post_per_layer_input_norm",
)
LAYER_MODULES = frozenset(
  (
    *_NORMS,
    "skip_scale",
    "attn/q_einsum",
    "attn/kv_einsum",
    "attn/k_einsum",
    "attn/attn_vec_einsum",
    "attn/query_norm",
    "attn/key_norm",
    "mlp/gating_einsum",
    "mlp/linear",
    "mlp/router_logits",
    "mlp/router_scale",
    "mlp/per_expert_scale",
    "mlp2/gating_einsum",
    "mlp2/linear",
    "per_layer_input_gate",
    "per_layer_projection",
  )
)
_SAME = Part()


def is_gemma4(entries: Mapping[str, Ref]) -> bool:
  """Whether module names from `kaggle_layout.layout_entries` are Gemma 4's."""
  return any(set(_MARKERS).intersection(name.split("/")) for name in entries)


def canonical_plan(
  entries: Mapping[str, Ref], config: GemmaConfig, source: str
) -> Plan:
  """How to build each canonical parameter from the Gemma 4 modules.

  Args:
    entries: From `kaggle_layout.layout_entries`.
    config: The Gemma 4 architecture.
    source: Where the checkpoint came from, for error messages.

  Returns:
    Canonical name -> (module ref, `Part`), as `kaggle_layout.canonical_plan`.

  Raises:
    CheckpointError: A module the config needs is missing or has the wrong
      rank, or a layer holds a module Gemma 4 does not have.
  """

  used: set[str] = set()

  def need(name: str, rank: int) -> Ref:
    used.add(name)
    if name not in entries:
      raise errors.CheckpointError(
        f"{source}: missing weight 'transformer/{name}' that this Gemma 4"
        f" model ({config.num_layers} layers, {config.num_experts} experts,"
        f" per-layer width {config.per_layer_input_dim}) needs; the checkpoint"
        " may be truncated or of another variant."
      )
    ref = entries[name]
    if len(ref.shape) != rank:
      raise errors.CheckpointError(
        f"{source}: {ref.key!r} has shape {ref.shape}; a Gemma 4 checkpoint"
        f" stores it with {rank} dims."
      )
    return ref

  for name in entries:
    match = _LAYER.match(name)
    if match and match.group(2) not in LAYER_MODULES:
      raise errors.CheckpointError(
        f"{source}: unsupported weight 'transformer/{name}'; it is not part of"
        " a Gemma 4 text layer of the `gemma` 4.x library. Known layer"
        f" modules: {sorted(LAYER_MODULES)}."
      )
  plan: Plan = {
    "embedder": (need("embedder/input_embedding", 2), _SAME),
    "final_norm": (need("final_norm", 1), _SAME),
  }
  if config.per_layer_input_dim:
    for name, module, rank in (
      ("per_layer_embedder", "embedder/per_layer_embeddings", 3),
      ("per_layer_projection", "embedder/per_layer_model_projection", 3),
      ("per_layer_projection_norm", "embedder/per_layer_projection_norm", 1),
    ):
      plan[name] = (need(module, rank), _SAME)
  for i in range(config.num_layers):
    plan.update(_layer_plan(config, i, need))
  _check_all_used(entries, used, config, source)
  check_shapes(plan, config, source)
  return plan


def _check_all_used(
  entries: Mapping[str, Ref], used: set[str], config: GemmaConfig, source: str
) -> None:
  """Text weights the config would leave unread mean it doesn't fit."""
  for name in entries:
    match = _LAYER.match(name)
    text = match is not None or name.startswith("embedder/per_layer")
    if not text or name in used:
      continue
    if match and config.num_layers > int(match.group(1)):
      stale = match.group(2) in ("attn/kv_einsum", "attn/k_einsum", "attn/key_norm")
      if stale and config.is_kv_shared(int(match.group(1))):
        continue  # The library keeps them in KV-shared layers; unused.
    raise errors.CheckpointError(
      f"{source}: the checkpoint has weight 'transformer/{name}', which this"
      f" Gemma 4 config ({config.num_layers} layers, {config.num_experts}"
      f" experts, per-layer width {config.per_layer_input_dim}, k = v"
      f" {config.k_eq_v_global}, {config.num_kv_shared_layers} KV-shared"
      " layers) does not use: the config disagrees with the weights."
    )


def check_shapes(plan: Plan, config: GemmaConfig, source: str) -> None:
  """Raises `CheckpointError` naming the stored weight whose shape is wrong."""
  expected = canonical.expected_shapes(config)
  for name, (ref, part) in plan.items():
    got = tuple(part(ref.proxy()).shape)
    if got != expected[name]:
      raise errors.CheckpointError(
        f"{source}: {ref.key!r} has shape {ref.shape}, which gives {name!r} of"
        f" shape {got}, but the config (d_model={config.embedding_dim}, heads"
        f" {config.num_heads}/{config.layer_kv_heads(0)}, head_dim"
        f" {config.layer_head_dim(0)}, mlp {config.mlp_hidden_dim}, experts"
        f" {config.num_experts}) needs {expected[name]}."
      )


def _layer_plan(config: GemmaConfig, i: int, need) -> Plan:
  src = f"layer_{i}"
  plan: Plan = {f"{src}/layer_scalar": (need(f"{src}/skip_scale", 1), Part(0))}
  norms = {"pre_attention_norm": "pre_attention_norm"}
  if config.use_post_attn_norm:
    norms["post_attention_norm"] = "post_attention_norm"
  dense = "mlp2" if config.uses_moe else "mlp"
  norms["pre_ffw_norm"] = "pre_ffw2_norm" if config.uses_moe else "pre_ffw_norm"
  if config.use_post_ffw_norm:
    norms["post_ffw_norm"] = "post_ffw_norm"
  if config.uses_moe:
    norms.update(
      {
        "post_ffw_norm_1": "post_ffw2_norm",
        "moe/pre_norm": "pre_ffw_norm",
        "moe/post_norm": "post_ffw1_norm",
      }
    )
  if config.per_layer_input_dim:
    norms["per_layer_input/norm"] = "post_per_layer_input_norm"
  for name, module in norms.items():
    plan[f"{src}/{name}"] = (need(f"{src}/{module}", 1), _SAME)

  attn = f"{src}/attn"
  plan[f"{src}/attn/q"] = (need(f"{attn}/q_einsum", 3), _SAME)
  plan[f"{src}/attn/o"] = (need(f"{attn}/attn_vec_einsum", 3), _SAME)
  if config.use_qk_norm:
    plan[f"{src}/attn/query_norm"] = (need(f"{attn}/query_norm", 1), _SAME)
  if not config.is_kv_shared(i):
    if config.is_k_eq_v(i):
      plan[f"{src}/attn/k"] = (need(f"{attn}/k_einsum", 3), _SAME)
    else:
      kv = need(f"{attn}/kv_einsum", 4)
      plan[f"{src}/attn/k"] = (kv, Part(0))
      plan[f"{src}/attn/v"] = (kv, Part(1))
    if config.use_qk_norm:
      plan[f"{src}/attn/key_norm"] = (need(f"{attn}/key_norm", 1), _SAME)

  gating = need(f"{src}/{dense}/gating_einsum", 3)
  plan[f"{src}/mlp/gate"] = (gating, Part(0, transpose=True))
  plan[f"{src}/mlp/up"] = (gating, Part(1, transpose=True))
  plan[f"{src}/mlp/down"] = (need(f"{src}/{dense}/linear", 2), _SAME)
  if config.uses_moe:
    plan[f"{src}/moe/router"] = (need(f"{src}/mlp/router_logits", 2), _SAME)
    plan[f"{src}/moe/router_norm"] = (need(f"{src}/mlp/router_scale", 1), _SAME)
    scale = need(f"{src}/mlp/per_expert_scale", 1)
    plan[f"{src}/moe/per_expert_scale"] = (scale, _SAME)
    experts = need(f"{src}/mlp/gating_einsum", 4)
    for j, name in enumerate(("gate", "up")):
      plan[f"{src}/moe/{name}"] = (experts, Part(j, axis=1, swap_last=True))
    plan[f"{src}/moe/down"] = (need(f"{src}/mlp/linear", 3), _SAME)
  if config.per_layer_input_dim:
    plan[f"{src}/per_layer_input/gate"] = (
      need(f"{src}/per_layer_input_gate", 2),
      _SAME,
    )
    plan[f"{src}/per_layer_input/projection"] = (
      need(f"{src}/per_layer_projection", 2),
      _SAME,
    )
  return plan


def mismatch(
  entries: Mapping[str, Ref], config: GemmaConfig, source: str
) -> str | None:
  """Why ``config`` does not fit the checkpoint's modules (None: it fits)."""
  layers = layer_indices(entries)
  if len(layers) != config.num_layers:
    return f"the checkpoint has {len(layers)} layers, the config {config.num_layers}"
  try:
    canonical_plan(entries, config, source)
  except errors.CheckpointError as e:
    return str(e).removeprefix(f"{source}: ")
  return None


def _gemma4_presets() -> list[str]:
  return [name for name in preset_names() if preset(name).family == "gemma4"]


def resolve_config(
  entries: Mapping[str, Ref],
  variant: str | None,
  config: GemmaConfig | None,
  source: str,
) -> GemmaConfig:
  """The config of a Gemma 4 checkpoint (see the module docstring).

  Raises:
    CheckpointError: ``config`` or ``variant`` is not Gemma 4, or the
      variant's shapes differ from the checkpoint's.
    ConfigError: Unknown variant, or none given and no preset matches.
  """
  if config is not None:
    if config.family != "gemma4":
      raise errors.CheckpointError(
        f"{source} is a Gemma 4 Kaggle/Flax checkpoint, but the config given"
        f" is a {config.family} one; pass a Gemma 4 config."
      )
    return config
  if variant is not None:
    base = preset(variant)  # ConfigError for unknown names.
    if base.family != "gemma4":
      raise errors.CheckpointError(
        f"{source} is a Gemma 4 Kaggle/Flax checkpoint (it has Gemma 4 weights"
        f" such as 'skip_scale'), but variant {variant!r} is a {base.family}"
        f" model. Gemma 4 variants: {', '.join(_gemma4_presets())}."
      )
    why = mismatch(entries, base, source)
    if why is not None:
      raise errors.CheckpointError(
        f"{source}: the checkpoint does not fit variant {variant!r}: {why}."
        " For a Gemma 4 checkpoint of another size pass config=GemmaConfig(...)"
        " (its window, RoPE and KV sharing can't be read from the weights)."
      )
    return base
  why = {name: mismatch(entries, preset(name), source) for name in _gemma4_presets()}
  matches = [name for name, reason in why.items() if reason is None]
  if len(matches) == 1:
    return preset(matches[0])
  details = "; ".join(f"{name}: {reason}" for name, reason in why.items())
  raise errors.ConfigError(
    f"{source}: this Gemma 4 Kaggle/Flax checkpoint matches no published Gemma 4"
    f" variant ({details}). Pass variant= or, for another size,"
    " config=GemmaConfig(...): the sliding window, RoPE, soft cap and KV"
    " sharing can't be read from the weights."
  )
