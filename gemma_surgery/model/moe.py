"""The Gemma 4 mixture of experts (26B-A4B), as Penzai layers on an ``experts`` axis.

A MoE layer's MLP sublayer is a dense GeGLU MLP and a mixture of experts side
by side, both reading the residual stream after attention::

  out = post_ffw_norm(post_norm_1(mlp(pre_ffw_norm(x))) + moe(x))
  moe(x) = post_norm_2(sum_e weights_e(x) * expert_e(pre_norm_2(x)))

Routing (Hugging Face ``Gemma4TextRouter``; the reference ``gemma`` library's
``MoE``): logits = ``W_router · (rms_standardize(x) * scale / sqrt(D))``;
probabilities = softmax over experts (float32); the ``top_k`` largest are kept
and renormalized to sum to 1, then multiplied by ``per_expert_scale``. Every
other expert gets weight 0.

Experts are computed densely over the ``experts`` axis (one batched GeGLU per
expert, ``{..., experts, neurons}``) and combined with the dense
``{..., experts}`` weights: exact, simple, and split across devices when the
``experts`` axis is sharded. Sites (`gemma_surgery.surgery.sites`) anchor after
the last item of `MixtureOfExperts.router` (``moe.router_logits``),
``.routing`` (``moe.weights``) and ``.experts`` (``moe.expert_out``,
``{experts, embedding}``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery.model import positional, positional_layers


@pz.pytree_dataclass
class TopKRouting(pz.nn.Layer):
  """Router logits ``{..., experts}`` -> dense routing weights ``{..., experts}``.

  Attributes:
    per_expert_scale: ``{experts}`` parameter multiplying the kept weights.
    top_k: Experts kept per token (static).
  """

  per_expert_scale: pz.ParameterLike[pz.nx.NamedArray]
  top_k: int = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, logits: pz.nx.NamedArray, **_side_inputs) -> pz.nx.NamedArray:
    def route(row: jax.Array) -> jax.Array:
      probs = jax.nn.softmax(row.astype(jnp.float32))
      _, chosen = jax.lax.top_k(probs, self.top_k)
      keep = jnp.zeros_like(probs).at[chosen].set(1.0)
      kept = probs * keep
      return kept / jnp.sum(kept)

    weights = pz.nx.nmap(route)(logits.untag("experts")).tag("experts")
    scale = self.per_expert_scale.value.astype(jnp.float32)
    return (weights * scale).astype(logits.dtype)


@pz.pytree_dataclass
class ExpertGeGLU(pz.nn.Layer):
  """Every expert's GeGLU MLP: ``{..., embedding}`` -> ``{..., experts, embedding}``.

  Attributes:
    gate: ``{embedding}`` -> ``{experts, neurons}`` (broadcast over experts).
    value: Same shape as ``gate``.
    out: ``{experts, neurons}`` -> ``{experts, embedding}`` (per expert).
    activation: Applied to the gate (static).
  """

  gate: pz.nn.Layer
  value: pz.nn.Layer
  out: pz.nn.Layer
  activation: Any = dataclasses.field(metadata={"pytree_node": False})

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    hidden = pz.nx.nmap(self.activation)(self.gate(x, **side_inputs))
    hidden = hidden * self.value(x, **side_inputs)
    return self.out(hidden, **side_inputs)


@pz.pytree_dataclass
class MixtureOfExperts(pz.nn.Layer):
  """``x`` -> ``post_norm(sum_e routing(router(x))_e * experts(x)_e)``.

  Attributes:
    router: ``{..., embedding}`` -> logits ``{..., experts}`` (a Sequential:
      scale-free RMSNorm with the router's scale, ``1/sqrt(D)``, projection).
    routing: Logits -> dense weights ``{..., experts}`` (a Sequential holding
      a `TopKRouting`).
    experts: ``{..., embedding}`` -> ``{..., experts, embedding}`` (a
      Sequential: pre-norm, then `ExpertGeGLU`).
    post_norm: RMSNorm of the combined output.
  """

  router: pz.nn.Layer
  routing: pz.nn.Layer
  experts: pz.nn.Layer
  post_norm: pz.nn.Layer

  def __call__(self, x: pz.nx.NamedArray, **side_inputs) -> pz.nx.NamedArray:
    weights = self.routing(self.router(x, **side_inputs), **side_inputs)
    outputs = self.experts(x, **side_inputs)
    combined = pz.nx.nmap(jnp.dot)(
      weights.astype(outputs.dtype).untag("experts"),
      outputs.untag("experts", "embedding"),
    ).tag("embedding")
    return self.post_norm(combined, **side_inputs)


def build_moe(
  name: str,
  rng: jax.Array | None,
  *,
  embedding_dim: int,
  num_experts: int,
  top_k: int,
  hidden_dim: int,
  rms_norm: Any,
  dtype: Any,
  activation: Any,
  act_dtype: Any,
) -> MixtureOfExperts:
  """Builds a `MixtureOfExperts` with labels under ``name``.

  Args:
    name: Label prefix (``.../moe``).
    rng: Initialization key, or None for parameter slots.
    embedding_dim: ``D``.
    num_experts: ``E`` (axis ``experts``).
    top_k: Experts per token.
    hidden_dim: Each expert's GeGLU width (axis ``neurons``).
    rms_norm: ``rms_norm(label, axes)`` -> a Gemma RMSNorm layer.
    dtype: Parameter dtype.
    activation: The gate nonlinearity.
    act_dtype: Activation dtype.
  """
  d = {"embedding": embedding_dim}
  e = {"experts": num_experts}
  f = {"neurons": hidden_dim}

  def linear(label, inputs, outputs, **kw):
    return positional.positional_linear(
      pz.nn.Linear.from_config(
        name=f"{name}/{label}",
        init_base_rng=rng,
        input_axes=inputs,
        output_axes=outputs,
        dtype=dtype,
        **kw,
      )
    )

  router = pz.nn.Sequential(
    [
      rms_norm(f"{name}/router_norm", d),  # scale = the router's ``scale``
      positional_layers.PositionalConstantRescale(
        by=jnp.asarray(embedding_dim**-0.5, act_dtype)
      ),
      linear("router", d, e),
    ]
  )
  routing = pz.nn.Sequential(
    [
      TopKRouting(
        per_expert_scale=pz.nn.make_parameter(
          f"{name}/per_expert_scale.weights",
          rng,
          lambda _key: pz.nx.ones(e, dtype=dtype),
        ),
        top_k=top_k,
      )
    ]
  )
  experts = pz.nn.Sequential(
    [
      rms_norm(f"{name}/pre_norm", d),
      ExpertGeGLU(
        gate=linear("gating", d, f, parallel_broadcast_axes=e),
        value=linear("value", d, f, parallel_broadcast_axes=e),
        out=linear("out", f, d, parallel_axes=e),
        activation=activation,
      ),
    ]
  )
  return MixtureOfExperts(
    router=router,
    routing=routing,
    experts=experts,
    post_norm=rms_norm(f"{name}/post_norm", d),
  )
