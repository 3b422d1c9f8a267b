"""The Gemma 4 parts of a block and of the body, assembled from Penzai layers.

`gemma_surgery.model.build` calls these for ``family == "gemma4"``: the
mixture of experts beside the dense MLP (`build_moe`), the per-layer input and
layer scalar that end a block (`block_extras`) and the per-layer embeddings
the body computes once (`build_per_layer_inputs`).
"""

from __future__ import annotations

import jax
from penzai import pz

from gemma_surgery.config import GemmaConfig
from gemma_surgery.model import gemma4, moe, positional_layers, primitives


def block_extras(
  name: str, rng: jax.Array | None, config: GemmaConfig, layer: int
) -> list[pz.nn.Layer]:
  """The layers after a Gemma 4 block's two residuals (none before Gemma 4)."""
  if config.family != "gemma4":
    return []
  d = {"embedding": config.embedding_dim}
  out: list[pz.nn.Layer] = []
  if config.per_layer_input_dim:
    p = {"per_layer": config.per_layer_input_dim}
    out.append(
      gemma4.PerLayerInput(
        gate=pz.nn.Sequential(
          [
            primitives.linear(f"{name}/per_layer_input/gate", rng, d, p, config),
            positional_layers.PositionalElementwise(primitives.gelu_tanh),
          ]
        ),
        source=pz.nn.Sequential([gemma4.PerLayerInputSource(layer=layer)]),
        projection=primitives.linear(
          f"{name}/per_layer_input/projection", rng, p, d, config
        ),
        norm=primitives.rms_norm(f"{name}/per_layer_input/norm", rng, d, config),
      )
    )
  dtype = primitives.dtype(config.parameter_dtype)
  out.append(gemma4.LayerScalar.from_config(f"{name}/layer_scalar", rng, dtype))
  return out


def build_moe(
  name: str, rng: jax.Array | None, config: GemmaConfig
) -> moe.MixtureOfExperts:
  return moe.build_moe(
    f"{name}/moe",
    rng,
    embedding_dim=config.embedding_dim,
    num_experts=config.num_experts,
    top_k=config.top_k_experts,
    hidden_dim=config.expert_hidden_dim,
    rms_norm=lambda label, axes: primitives.rms_norm(label, rng, axes, config),
    dtype=primitives.dtype(config.parameter_dtype),
    activation=primitives.gelu_tanh,
    act_dtype=primitives.dtype(config.compute_dtype),
  )


def build_per_layer_inputs(
  name: str, rng: jax.Array | None, config: GemmaConfig, table: pz.nn.EmbeddingTable
) -> gemma4.PerLayerInputs:
  p = {"layers": config.num_layers, "per_layer": config.per_layer_input_dim}
  return gemma4.PerLayerInputs(
    table=table,
    per_layer_table=pz.nn.EmbeddingTable.from_config(
      name=f"{name}/per_layer_embedder",
      init_base_rng=rng,
      vocab_size=config.per_layer_vocab_size or config.vocab_size,
      embedding_axes=p,
      dtype=primitives.dtype(config.parameter_dtype),
    ),
    projection=primitives.linear(
      f"{name}/per_layer_projection",
      rng,
      {"embedding": config.embedding_dim},
      p,
      config,
    ),
    norm=primitives.rms_norm(
      f"{name}/per_layer_projection_norm",
      rng,
      {"per_layer": config.per_layer_input_dim},
      config,
    ),
    embedding_dim=config.embedding_dim,
    per_layer_dim=config.per_layer_input_dim,
    dtype=config.compute_dtype,
  )
