"""Canonical Gemma parameters and their binding into a Penzai model.

Every checkpoint format (Kaggle/Flax orbax in its flat, nested and stacked
layouts, Hugging Face safetensors) is first converted to one *canonical* flat
dict of numpy arrays, then bound by `bind_parameters`. This keeps the mapping
to Penzai in one place and lets every loader be checked against the same
shapes. Canonical names and shapes (N query heads, K kv heads, D embedding,
H head_dim, F MLP width, V vocabulary):

==================================  ===========  ==============================
name                                shape        meaning
==================================  ===========  ==============================
``embedder``                        [V, D]       token embeddings (tied)
``final_norm``                      [D]          RMSNorm weight (applied 1 + w)
``layer_{i}/pre_attention_norm``    [D]          RMSNorm weight
``layer_{i}/post_attention_norm``   [D]          (Gemma 2/3)
``layer_{i}/pre_ffw_norm``          [D]
``layer_{i}/post_ffw_norm``         [D]          (Gemma 2/3)
``layer_{i}/attn/q``                [N, D, H]
``layer_{i}/attn/k``                [K, D, H]
``layer_{i}/attn/v``                [K, D, H]
``layer_{i}/attn/o``                [N, H, D]
``layer_{i}/attn/query_norm``       [H]          QK-norm (Gemma 3)
``layer_{i}/attn/key_norm``         [H]
``layer_{i}/mlp/gate``              [D, F]       GeGLU gate (through gelu)
``layer_{i}/mlp/up``                [D, F]       GeGLU value
``layer_{i}/mlp/down``              [F, D]
==================================  ===========  ==============================
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import build, errors, sharding
from gemma_surgery.config import GemmaConfig


def expected_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
  """Canonical parameter names and shapes for ``config``."""
  n, k = config.num_heads, config.num_kv_heads
  d, h, f = config.embedding_dim, config.head_dim, config.mlp_hidden_dim
  shapes = {"embedder": (config.vocab_size, d), "final_norm": (d,)}
  for i in range(config.num_layers):
    p = f"layer_{i}"
    norms = ["pre_attention_norm", "pre_ffw_norm"]
    if config.use_post_attn_norm:
      norms.append("post_attention_norm")
    if config.use_post_ffw_norm:
      norms.append("post_ffw_norm")
    for norm in norms:
      shapes[f"{p}/{norm}"] = (d,)
    shapes[f"{p}/attn/q"] = (n, d, h)
    shapes[f"{p}/attn/k"] = (k, d, h)
    shapes[f"{p}/attn/v"] = (k, d, h)
    shapes[f"{p}/attn/o"] = (n, h, d)
    if config.use_qk_norm:
      shapes[f"{p}/attn/query_norm"] = (h,)
      shapes[f"{p}/attn/key_norm"] = (h,)
    shapes[f"{p}/mlp/gate"] = (d, f)
    shapes[f"{p}/mlp/up"] = (d, f)
    shapes[f"{p}/mlp/down"] = (f, d)
  return shapes


def check_canonical(
  config: GemmaConfig, params: Mapping[str, np.ndarray], source: str
) -> None:
  """Raises `CheckpointError` if names or shapes don't match the config."""
  expected = expected_shapes(config)
  missing = [name for name in expected if name not in params]
  if missing:
    raise errors.CheckpointError(
      f"{source}: missing {len(missing)} parameter(s) the config needs,"
      f" e.g. {missing[:3]} (the checkpoint may be truncated or of another"
      " variant)."
    )
  extra = sorted(set(params) - set(expected))
  if extra:
    raise errors.CheckpointError(
      f"{source}: unexpected parameter(s) {extra[:3]} for a"
      f" {config.family} config with {config.num_layers} layers."
    )
  for name, shape in expected.items():
    got = tuple(params[name].shape)
    if got != shape:
      raise errors.CheckpointError(
        f"{source}: parameter {name!r} has shape {got}, but the config"
        f" ({config.family}, d_model={config.embedding_dim},"
        f" heads={config.num_heads}/{config.num_kv_heads},"
        f" head_dim={config.head_dim}, mlp={config.mlp_hidden_dim},"
        f" vocab={config.vocab_size}) needs {shape}."
      )


def _one_plus(weight: np.ndarray) -> np.ndarray:
  """Gemma RMSNorm applies ``1 + w``; add in float32, before any cast."""
  return 1.0 + np.asarray(weight, dtype=np.float32)


def _split_heads(arr: np.ndarray, config: GemmaConfig, axis: int) -> tuple:
  """Reshapes a flat query-head axis into Penzai's head axes."""
  common, q_only = build.head_axes(config)
  sizes = (*common.values(), *q_only.values())
  shape = arr.shape[:axis] + sizes + arr.shape[axis + 1 :]
  return arr.reshape(shape), (*common, *q_only)


def _kv_heads(arr: np.ndarray, config: GemmaConfig) -> tuple:
  common, _ = build.head_axes(config)
  if not common:  # MQA: the single kv head has no axis.
    return arr[0], ()
  return arr, tuple(common)


def to_penzai(
  config: GemmaConfig, params: Mapping[str, np.ndarray]
) -> dict[str, tuple[np.ndarray, tuple[str, ...]]]:
  """Maps canonical arrays to Penzai labels with their axis names."""
  out = {
    "embedder.embeddings": (params["embedder"], ("vocabulary", "embedding")),
    "final_norm/scale.weights": (_one_plus(params["final_norm"]), ("embedding",)),
  }
  for i in range(config.num_layers):
    src, dst = f"layer_{i}", f"block_{i}"
    for norm in (
      "pre_attention_norm",
      "post_attention_norm",
      "pre_ffw_norm",
      "post_ffw_norm",
    ):
      if f"{src}/{norm}" in params:
        value = _one_plus(params[f"{src}/{norm}"])
        out[f"{dst}/{norm}/scale.weights"] = (value, ("embedding",))
    q, q_axes = _split_heads(params[f"{src}/attn/q"], config, 0)
    out[f"{dst}/attention/query.weights"] = (
      q,
      (*q_axes, "embedding", "projection"),
    )
    for name, label in (("k", "key"), ("v", "value")):
      arr, axes = _kv_heads(params[f"{src}/attn/{name}"], config)
      out[f"{dst}/attention/{label}.weights"] = (
        arr,
        (*axes, "embedding", "projection"),
      )
    o, o_axes = _split_heads(params[f"{src}/attn/o"], config, 0)
    out[f"{dst}/attention/output.weights"] = (
      o,
      (*o_axes, "projection", "embedding"),
    )
    for name in ("query_norm", "key_norm"):
      if f"{src}/attn/{name}" in params:
        value = _one_plus(params[f"{src}/attn/{name}"])
        out[f"{dst}/attention/{name}/scale.weights"] = (value, ("projection",))
    out[f"{dst}/mlp/gating_linear.weights"] = (
      params[f"{src}/mlp/gate"],
      ("embedding", "neurons"),
    )
    out[f"{dst}/mlp/value_linear.weights"] = (
      params[f"{src}/mlp/up"],
      ("embedding", "neurons"),
    )
    out[f"{dst}/mlp/out_linear.weights"] = (
      params[f"{src}/mlp/down"],
      ("neurons", "embedding"),
    )
  return out


def bind_parameters(
  config: GemmaConfig,
  params: Mapping[str, np.ndarray],
  *,
  source: str = "checkpoint",
  mesh: jax.sharding.Mesh | None = None,
  sharding_rules: sharding.Rules | None = None,
) -> build.GemmaTransformerLM:
  """Builds the model for ``config`` and binds canonical parameters to it.

  Each array is converted to ``config.parameter_dtype`` on the host and placed
  on the devices once: replicated on the default device, or, given a
  ``mesh``, directly with a ``NamedSharding`` chosen from its axis names (see
  `gemma_surgery.sharding`).

  Args:
    config: The architecture.
    params: Canonical parameters (see the module docstring).
    source: Where the parameters came from, for error messages.
    mesh: Optional device mesh to shard the parameters over.
    sharding_rules: Axis-name rules for ``mesh`` (default:
      `sharding.DEFAULT_RULES`).

  Returns:
    The bound model.

  Raises:
    CheckpointError: If names or shapes don't match the config.
  """
  check_canonical(config, params, source)
  dtype = jnp.dtype(config.parameter_dtype)
  variables = []
  for label, (value, axes) in to_penzai(config, params).items():
    named = pz.nx.wrap(np.asarray(value).astype(dtype, copy=False)).tag(*axes)
    if mesh is None:
      named = jax.device_put(named)
    else:
      named = sharding.device_put_named(named, mesh, sharding_rules)
    variables.append(pz.Parameter(value=named, label=f"transformer/{label}"))
  model = pz.bind_variables(build.build_model(config, None), variables)
  pz.nn.assert_no_parameter_slots(model)
  return model
