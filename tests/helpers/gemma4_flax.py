"""Test helper: a Hugging Face Gemma 4 state dict as the ``gemma`` 4.x Flax tree.

Written from the code of the ``gemma`` 4.0.1 wheel (``pip download --no-deps
--python-version 3.12 --only-binary=:all: gemma==4.0.1``), independently of
the reader in `gemma_surgery.loading.kaggle_gemma4`: it starts from the
transformers tensor names, not from our canonical layout. Each name, shape
and einsum below cites the wheel file it comes from (``gm/nn/gemma4/...``).

`to_nested` gives ``model.init()["params"]`` of ``gm.nn.gemma4.Transformer``
(what ``gm.ckpts.save_params`` writes); `to_flat` the FLAT spelling that
``gm/ckpts/_checkpoint.py`` (``_nested_to_flat``) and
``gm/ckpts/_compat.py`` (``flatten_and_remap_params``) produce.

Arrays go through ``jax.numpy``, so ``jax.eval_shape`` gives shape-only trees
of full-size models from ``jax.ShapeDtypeStruct`` inputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

Tree = dict[str, Any]
STALE = 7.0  # fills the kv weights of KV-shared layers, which must be unused


def _kv_shared(hf_config: Mapping[str, Any], i: int) -> bool:
  return i >= hf_config["num_hidden_layers"] - hf_config.get("num_kv_shared_layers", 0)


def _dense_mlp(sd: Mapping[str, Any], pre: str, swap: bool) -> Tree:
  # _modules.FeedForward: Einsum(shape=(2, hidden_dim, features),
  # weight_name='gating_einsum') with eq '...F,NHF->...NH' (F = features) and
  # gelu(gate[..., 0, :]) * gate[..., 1, :]; 'linear' (hidden_dim, features)
  # with '...H,HF->...F'. nn.share_scope puts both straight under the module
  # (no 'w' level).
  gate, up = sd[f"{pre}mlp.gate_proj.weight"], sd[f"{pre}mlp.up_proj.weight"]
  pair = [up, gate] if swap else [gate, up]
  return {
    "gating_einsum": jnp.stack(pair),  # [2, F, D]: torch Linear is [out, in]
    "linear": sd[f"{pre}mlp.down_proj.weight"].T,  # [F, D]
  }


def _moe(sd: Mapping[str, Any], pre: str) -> Tree:
  # _moe.MoERagged.setup: router_logits = Einsum((features, num_experts))
  # ('gsd,de->gse'); gating_einsum = _Weight((E, 2, hidden, features)),
  # linear = _Weight((E, hidden, features)) (param 'w' each);
  # per_expert_scale (E,), router_scale (features,).
  gate_up = sd[f"{pre}experts.gate_up_proj"]  # [E, 2X, D], gate rows first
  e, two_x, d = gate_up.shape
  return {
    "router_logits": {"w": sd[f"{pre}router.proj.weight"].T},  # [D, E]
    "gating_einsum": {"w": gate_up.reshape(e, 2, two_x // 2, d)},
    "linear": {"w": sd[f"{pre}experts.down_proj"].transpose(0, 2, 1)},  # [E,X,D]
    "per_expert_scale": sd[f"{pre}router.per_expert_scale"],
    "router_scale": sd[f"{pre}router.scale"],
  }


def _attention(sd, pre: str, hf_config: Mapping[str, Any], i: int) -> Tree:
  # _modules.Attention.setup: q_einsum (N, D, H) 'BTD,NDH->BTNH'; kv_einsum
  # (2, K, D, H) 'BSD,CKDH->CBSKH', or k_einsum (K, D, H) 'BSD,KDH->BSKH'
  # when k_eq_v; attn_vec_einsum (N, H, D) 'BTNH,NHD->BTD'; query_norm,
  # key_norm RMSNorm (param 'scale'); value_norm has no scale.
  attn = f"{pre}self_attn."
  glob = hf_config["layer_types"][i] == "full_attention"
  h = (
    (hf_config.get("global_head_dim") or hf_config["head_dim"])
    if glob
    else hf_config["head_dim"]
  )
  d = hf_config["hidden_size"]

  def heads(w):  # torch [heads * H, D] -> [heads, D, H]
    return w.reshape(-1, h, d).transpose(0, 2, 1)

  q = sd[f"{attn}q_proj.weight"]
  out: Tree = {
    "q_einsum": {"w": heads(q)},
    "attn_vec_einsum": {"w": sd[f"{attn}o_proj.weight"].T.reshape(-1, h, d)},
    "query_norm": {"scale": sd[f"{attn}q_norm.weight"]},
  }
  k_eq_v = glob and hf_config.get("attention_k_eq_v")
  if _kv_shared(hf_config, i):
    # The wheel still creates these in KV-shared layers (TODO in
    # _modules.Attention: "after checkpoints remove the kv_einsum from the
    # shared layers"); transformers has no such weights.
    kv = hf_config["num_key_value_heads"]
    if glob and hf_config.get("num_global_key_value_heads"):
      kv = hf_config.get("num_global_key_value_heads")
    shape = (kv, d, h) if k_eq_v else (2, kv, d, h)
    out["k_einsum" if k_eq_v else "kv_einsum"] = {"w": jnp.full(shape, STALE)}
    out["key_norm"] = {"scale": jnp.full((h,), STALE)}
    return out
  k = heads(sd[f"{attn}k_proj.weight"])
  if k_eq_v:
    out["k_einsum"] = {"w": k}
  else:
    out["kv_einsum"] = {"w": jnp.stack([k, heads(sd[f"{attn}v_proj.weight"])])}
  out["key_norm"] = {"scale": sd[f"{attn}k_norm.weight"]}
  return out


def _block(sd, hf_config: Mapping[str, Any], i: int, swap_gate_up: bool) -> Tree:
  pre = f"layers.{i}."
  # _modules.Block.setup: skip_scale param of shape (1,); RMSNorm 'scale'.
  norm = lambda name: {"scale": sd[f"{pre}{name}.weight"]}  # noqa: E731
  block: Tree = {
    "skip_scale": sd[f"{pre}layer_scalar"],
    "pre_attention_norm": norm("input_layernorm"),
    "post_attention_norm": norm("post_attention_layernorm"),
    "attn": _attention(sd, pre, hf_config, i),
  }
  if hf_config.get("enable_moe_block"):
    # _modules.Block._setup_moe / _forward_moe: dense shared branch
    # pre_ffw2_norm -> mlp2 -> post_ffw2_norm; MoE branch pre_ffw_norm ->
    # mlp (MoERagged) -> post_ffw1_norm; post_ffw_norm after their sum.
    # transformers: pre_feedforward_layernorm -> mlp -> ..._1 (dense),
    # pre_feedforward_layernorm_2 -> experts -> post_feedforward_layernorm_2.
    block["pre_ffw2_norm"] = norm("pre_feedforward_layernorm")
    block["mlp2"] = _dense_mlp(sd, pre, swap_gate_up)
    block["post_ffw2_norm"] = norm("post_feedforward_layernorm_1")
    block["pre_ffw_norm"] = norm("pre_feedforward_layernorm_2")
    block["mlp"] = _moe(sd, pre)
    block["post_ffw1_norm"] = norm("post_feedforward_layernorm_2")
  else:
    # _modules.Block._setup_dense: pre_ffw_norm -> mlp -> post_ffw_norm.
    block["pre_ffw_norm"] = norm("pre_feedforward_layernorm")
    block["mlp"] = _dense_mlp(sd, pre, swap_gate_up)
  block["post_ffw_norm"] = norm("post_feedforward_layernorm")
  if hf_config.get("hidden_size_per_layer_input"):
    # _modules.Block.setup: per_layer_input_gate Einsum((embed_dim, P))
    # '...D,DP->...P'; per_layer_projection Einsum((P, embed_dim))
    # '...P,PD->...D'; post_per_layer_input_norm.
    block["per_layer_input_gate"] = {"w": sd[f"{pre}per_layer_input_gate.weight"].T}
    block["per_layer_projection"] = {"w": sd[f"{pre}per_layer_projection.weight"].T}
    block["post_per_layer_input_norm"] = norm("post_per_layer_input_norm")
  return block


def to_nested(
  state: Mapping[str, Any], hf_config: Mapping[str, Any], *, swap_gate_up: bool = False
) -> Tree:
  """The Flax ``model.init`` params of the text model.

  Args:
    state: transformers ``Gemma4ForCausalLM`` tensors (numpy or
      ``jax.ShapeDtypeStruct``), the ``model.`` prefix removed.
    hf_config: Its config (``Gemma4TextConfig`` arguments / ``config.json``
      fields).
    swap_gate_up: Negative control: store the dense MLP's gate and up
      projections in each other's place.
  """
  sd = {k: jnp.asarray(v) if hasattr(v, "__array__") else v for k, v in state.items()}
  d, n = hf_config["hidden_size"], hf_config["num_hidden_layers"]
  # _modules.Embedder.setup: 'input_embedding' (V, D).
  embedder: Tree = {"input_embedding": sd["embed_tokens.weight"]}
  if p := hf_config.get("hidden_size_per_layer_input"):
    # _modules.Embedder.setup: 'per_layer_embeddings' (V, num_layers, P);
    # per_layer_model_projection Einsum((D, num_layers, P), w_scale=D**-0.5)
    # '...td,dnp->...tnp'; per_layer_projection_norm RMSNorm.
    table = sd["embed_tokens_per_layer.weight"]  # [V, L*P], layer-major
    embedder["per_layer_embeddings"] = table.reshape(table.shape[0], n, p)
    projection = sd["per_layer_model_projection.weight"]  # [L*P, D]
    embedder["per_layer_model_projection"] = {"w": projection.T.reshape(d, n, p)}
    embedder["per_layer_projection_norm"] = {
      "scale": sd["per_layer_projection_norm.weight"]
    }
  # _transformer.Transformer.setup: embedder, blocks named f'layer_{i}',
  # final_norm.
  tree: Tree = {"embedder": embedder}
  for i in range(n):
    tree[f"layer_{i}"] = _block(sd, hf_config, i, swap_gate_up)
  tree["final_norm"] = {"scale": sd["norm.weight"]}
  return tree


def to_flat(nested: Tree) -> Tree:
  """FLAT spelling: ``{"transformer/<module>": {<param>: array}}``.

  ``_compat.flatten_and_remap_params``: flatten with '/', add '/w' to paths
  ending in '/mlp/linear' or '/mlp/gating_einsum' (the dense FeedForward of
  ``mlp``), then split off the last component; ``_checkpoint.
  _nested_to_flat_single`` prefixes 'transformer/'.
  """
  flat: dict[str, Any] = {}

  def walk(node: Tree, prefix: str) -> None:
    for key, value in node.items():
      path = f"{prefix}/{key}" if prefix else key
      if isinstance(value, Mapping):
        walk(value, path)
      else:
        flat[path] = value

  walk(nested, "")
  out: Tree = {}
  for path, value in flat.items():
    if path.endswith(("/mlp/linear", "/mlp/gating_einsum")):
      path += "/w"
    module, param = path.rsplit("/", 1)
    out.setdefault(f"transformer/{module}", {})[param] = value
  return out


def state_dict(model: Any) -> dict[str, Any]:
  """A transformers model's tensors as numpy, ``model.`` prefix removed."""
  return {
    k.removeprefix("model."): v.detach().numpy()
    for k, v in model.state_dict().items()
    if k.startswith("model.")
  }
