"""Direct logit attribution through the frozen final norm.

Every block adds its attention and MLP outputs to the residual stream, so the
final residual is ``x = embed + Σ_l attn.out_l + Σ_l mlp.out_l``. With the
final RMSNorm's scale frozen at its value on this run, the pre-soft-cap logit
difference ``LD(x) = (u_correct − u_wrong) · norm(x)`` is linear in ``x`` with
no offset (Gemma's unembedding has no bias), so

    LD = Σ_c out_c · d,    d = dLD_frozen / dx

splits exactly into per-component terms. The same holds one level down: with
the post-attention (post-FFW) norm's scale also frozen, ``attn.out_l`` is a
linear function of the per-head ``attn.z`` (``mlp.out_l`` of the neurons'
``mlp.hidden``), so each head's (neuron's) term is ``activation · gradient``
of that frozen linear map, computed with ``jax.vjp`` of the model's own output
projection and post-norm. Heads sum to their layer's attention term and
neurons to their layer's MLP term.

``remainder`` is ``LD − (embed + Σ attn + Σ mlp)``: zero up to round-off on
Gemma 1-3 (nothing else writes to the residual stream); it is reported rather
than hidden so the identity always closes.

Gemma 2's final soft cap ``c · tanh(logit / c)`` is not linear: attributions
are of the *pre-cap* logit difference (``total``); ``logit_difference`` is the
model's actual, capped value. Both are means over the batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from gemma_surgery import errors
from gemma_surgery.analysis.named import LAYER, NamedResult
from gemma_surgery.analysis.patching import LogitDifference
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import heads, rewrites
from gemma_surgery.surgery.run import jit_forward

_CAPTURED = ("embed", "attn.z", "attn.out", "mlp.hidden", "mlp.out", "resid_post")


@pz.pytree_dataclass
class FrozenStandardize(pz.nn.Layer):
  """`pz.nn.RMSStandardize` whose scale carries no gradient.

  The forward value is the RMSNorm's own; the gradient treats
  ``rsqrt(mean(x²) + eps)`` as a constant, so the layer is linear in ``x``
  at the run's scale.

  Attributes:
    across: The standardized axes (static).
    epsilon: The RMSNorm's epsilon.
  """

  across: tuple[str, ...] = dataclasses.field(metadata={"pytree_node": False})
  epsilon: Any = 1e-6

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    @pz.nx.nmap
    def frozen(x):
      scale = jax.lax.rsqrt(jnp.mean(jnp.square(x)) + self.epsilon)
      return x * jax.lax.stop_gradient(scale)

    return frozen(value.untag(*self.across)).tag(*self.across)


def freeze_norms(layer: Any) -> Any:
  """``layer`` with every `pz.nn.RMSStandardize` replaced by `FrozenStandardize`."""

  def make(norm: pz.nn.RMSStandardize) -> FrozenStandardize:
    across = (norm.across,) if isinstance(norm.across, str) else tuple(norm.across)
    return FrozenStandardize(across=across, epsilon=norm.epsilon)

  return pz.select(layer).at_instances_of(pz.nn.RMSStandardize).apply(make)


def _pieces(model: Any) -> tuple[list, list, list]:
  """``(attention maps, MLP maps, tail)``: per block the frozen-norm maps from
  ``attn.z`` (native heads) to ``attn.out`` and from ``mlp.hidden`` to
  ``mlp.out``; the final norm and unembedding (soft cap dropped)."""
  body = model.body
  blocks = [
    i
    for i, x in enumerate(body.sublayers)
    if isinstance(x, model_parts.TransformerBlock)
  ]
  if not blocks:
    raise errors.SiteError("Direct logit attribution needs transformer blocks.")
  attn_maps, mlp_maps = [], []
  for i in blocks:
    block = body.sublayers[i]
    subs = [getattr(r, "delta", None) for r in block.sublayers]
    if len(subs) != 2 or any(not hasattr(s, "sublayers") for s in subs):
      raise errors.SiteError(
        f"Block {len(attn_maps)} is not the attention + MLP residual pair direct"
        " logit attribution supports (Gemma 1-3)."
      )
    attn_maps.append(_after(subs[0].sublayers, (pz.nn.Attention,), "attention"))
    mlp_maps.append(
      _after(subs[1].sublayers, (model_parts.TransformerFeedForward,), "MLP")
    )
  tail = [
    x for x in body.sublayers[blocks[-1] + 1 :] if not isinstance(x, pz.nn.TanhSoftCap)
  ]
  return attn_maps, mlp_maps, freeze_norms(pz.nn.Sequential(tail))


def _after(layers: list, kinds: tuple, what: str) -> Any:
  """The output projection of the ``kinds`` layer and what follows it."""
  at = [i for i, x in enumerate(layers) if isinstance(x, kinds)]
  if len(at) != 1:
    raise errors.SiteError(f"Expected one {what} layer in a residual branch.")
  core = layers[at[0]]
  projection = (
    core.attn_value_to_output.sublayers[-1]
    if what == "attention"
    else core.sublayers[-1]
  )
  if not isinstance(projection, pz.nn.Linear):
    raise errors.SiteError(f"The {what} output projection is not a Linear layer.")
  return freeze_norms(pz.nn.Sequential([projection, *layers[at[0] + 1 :]]))


def _dot(x: pz.nx.NamedArray, g: pz.nx.NamedArray, keep: tuple[str, ...]) -> jax.Array:
  """``Σ x · g`` over all axes but ``keep``, mean over ``batch``."""
  prod = x * g
  drop = [a for a in prod.named_shape if a not in keep]
  total = pz.nx.nmap(jnp.sum)(prod.untag(*drop)) / x.named_shape["batch"]
  return total.unwrap(*keep) if keep else total.unwrap()


def _ld(logits: pz.nx.NamedArray, metric: LogitDifference) -> jax.Array:
  at = logits[{"seq": metric.position}].unwrap("batch", "vocabulary")
  return at[:, metric.correct] - at[:, metric.wrong]


@functools.partial(jax.jit, static_argnums=0)
def _attribute(metric: LogitDifference, attn_maps, mlp_maps, tail, acts) -> dict:
  final = acts["resid_post"][-1]
  # Each row's difference depends only on its row: grad of the sum is per row.
  ld, grad = jax.value_and_grad(lambda x: _ld(tail(x), metric).sum())(final)
  out = {"total": ld / final.named_shape["batch"]}
  out["embed"] = _dot(acts["embed"], grad, ())
  out["attn"] = jnp.stack([_dot(a, grad, ()) for a in acts["attn.out"]])
  out["mlp"] = jnp.stack([_dot(a, grad, ()) for a in acts["mlp.out"]])
  per_head, per_neuron = [], []
  for fn, z in zip(attn_maps, acts["attn.z"], strict=True):
    native = heads.to_native_heads(z, _native_heads(fn))
    _, pull = jax.vjp(fn, native)
    per_head.append(_dot(z, heads.to_user_heads(pull(grad)[0]), ("heads",)))
  for fn, h in zip(mlp_maps, acts["mlp.hidden"], strict=True):
    _, pull = jax.vjp(fn, h)
    per_neuron.append(_dot(h, pull(grad)[0], ("neurons",)))
  out["heads"], out["neurons"] = jnp.stack(per_head), jnp.stack(per_neuron)
  return out


def _native_heads(fn: Any) -> dict[str, int]:
  shape = fn.sublayers[0].weights.value.named_shape
  return {a: n for a, n in shape.items() if a != "embedding"}


@dataclasses.dataclass(frozen=True)
class DirectLogitAttribution(NamedResult):
  """Each component's direct contribution to a logit difference.

  All values are means over the batch, at the metric's position, of the
  pre-soft-cap logit difference with the final norm's scale frozen:
  ``embed + attn.sum() + mlp.sum() + remainder == total`` exactly, and
  ``heads.sum(1) == attn``, ``neurons.sum(1) == mlp`` (post-norms frozen too).

  Attributes:
    layers: Row labels: every layer.
    embed: The token embeddings' term.
    attn: ``[layer]`` attention sublayer terms.
    heads: ``[layer, heads]`` per-head terms.
    mlp: ``[layer]`` MLP sublayer terms.
    neurons: ``[layer, neurons]`` per-neuron terms.
    remainder: ``total`` minus the component terms (round-off on Gemma 1-3).
    total: The pre-soft-cap logit difference (what the terms sum to).
    logit_difference: The model's logit difference (after any soft cap).
  """

  layers: list[int]
  embed: float
  attn: np.ndarray
  heads: np.ndarray
  mlp: np.ndarray
  neurons: np.ndarray
  remainder: float
  total: float
  logit_difference: float

  AXES = {
    "attn": (LAYER,),
    "heads": (LAYER, "heads"),
    "mlp": (LAYER,),
    "neurons": (LAYER, "neurons"),
  }

  def top(self, k: int = 10) -> list[tuple[str, tuple[int, ...], float]]:
    """The ``k`` largest terms by magnitude among embed, heads and MLPs:
    ``(kind, index, value)`` with kind ``"embed"``, ``"head"`` (index
    ``(layer, head)``) or ``"mlp"`` (index ``(layer,)``)."""
    items = [("embed", (), self.embed)]
    items += [
      ("head", (int(i), int(h)), float(v)) for (i, h), v in np.ndenumerate(self.heads)
    ]
    items += [("mlp", (int(i),), float(v)) for (i,), v in np.ndenumerate(self.mlp)]
    return sorted(items, key=lambda t: -abs(t[2]))[:k]


def direct_logit_attribution(
  model: Any, prompts: Any, metric: LogitDifference, *, tokenizer: Any = None
) -> DirectLogitAttribution:
  """Direct logit attribution of heads, MLPs and neurons (see module doc).

  Args:
    model: A Penzai Gemma 1-3 LM (not modified).
    prompts: ``[batch, seq]`` ids, one prompt, or strings with a tokenizer.
    metric: A `logit_difference` (correct, wrong, position).
    tokenizer: Needed for string prompts.

  Returns:
    A `DirectLogitAttribution`.

  Raises:
    InputError: A metric that is not a `logit_difference`, or that reads
      outside the vocabulary/prompt.
    SiteError: A model whose blocks are not attention + MLP residual pairs.
  """
  if not isinstance(metric, LogitDifference):
    raise errors.InputError(
      f"Direct logit attribution needs a logit_difference metric; got {metric!r}."
    )
  ids = token_batch(model, prompts, tokenizer)
  metric.check(model.metadata.vocab_size, ids.shape[1])
  attn_maps, mlp_maps, tail = _pieces(pz.freeze_params(model))
  captured, acts = rewrites.capture(model, [*_CAPTURED, "logits"])
  logits = jit_forward(captured)(named_tokens(ids))
  n = len(attn_maps)
  got = {s: [acts[s, i] for i in range(n)] for s in _CAPTURED if s != "embed"}
  got["embed"] = acts["embed"]
  out = {
    k: to_numpy(v)
    for k, v in _attribute(metric, attn_maps, mlp_maps, tail, got).items()
  }
  parts = float(out["embed"]) + float(out["attn"].sum()) + float(out["mlp"].sum())
  return DirectLogitAttribution(
    layers=list(range(n)),
    embed=float(out["embed"]),
    attn=out["attn"],
    heads=out["heads"],
    mlp=out["mlp"],
    neurons=out["neurons"],
    remainder=float(out["total"]) - parts,
    total=float(out["total"]),
    logit_difference=float(np.asarray(_ld(logits, metric)).mean()),
  )
