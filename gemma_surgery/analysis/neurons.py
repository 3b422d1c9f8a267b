"""MLP neurons: the top neurons per token, a neuron's tokens, neuron edits.

Neurons are the ``neurons`` axis of ``mlp.hidden`` (``gelu(gate) * up``).
Weights come from the model's parameters by label
(``…/block_{L}/mlp/{gating,value,out}_linear.weights``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.analysis.named import (
  KIND,
  LAYER,
  TOKEN_AXES,
  TOP_K,
  NamedResult,
  wrap,
)
from gemma_surgery.generation import generate
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import interventions, sites
from gemma_surgery.surgery.readout import readout_head, top_tokens
from gemma_surgery.surgery.run import jit_forward

_WEIGHTS = {"gate": "gating_linear", "up": "value_linear", "down": "out_linear"}
KINDS = tuple(_WEIGHTS)


@dataclasses.dataclass(frozen=True)
class TopNeurons(NamedResult):
  """The most active MLP neurons per token.

  ``named()`` gives ``tokens`` ``{batch, seq}`` and ``ids``/``values``
  ``{layer, batch, seq, top_k}`` as NamedArrays.

  Attributes:
    layers: The layers analysed.
    tokens: ``[batch, seq]`` input ids.
    ids: ``[layer, batch, seq, k]`` neuron indices, most active first.
    values: ``[layer, batch, seq, k]`` their ``mlp.hidden`` activations.
  """

  AXES = {
    "tokens": TOKEN_AXES,
    "ids": (LAYER, "batch", "seq", TOP_K),
    "values": (LAYER, "batch", "seq", TOP_K),
  }

  layers: list[int]
  tokens: np.ndarray
  ids: np.ndarray
  values: np.ndarray


def top_neurons(
  model: Any, tokens: Any, *, layers: Any = None, k: int = 10, tokenizer: Any = None
) -> TopNeurons:
  """Top-k ``mlp.hidden`` neurons per token and layer (one jitted forward).

  Uses top-k captures, so memory is O(k) per token rather than O(neurons).

  Args:
    model: A Penzai ``TransformerLM``.
    tokens: Prompts of equal length (see `inputs.token_batch`).
    layers: Layer(s) (negative allowed) or None for all.
    k: Neurons kept per token.
    tokenizer: Needed when ``tokens`` are strings.
  """
  ids = token_batch(model, tokens, tokenizer)
  chosen = sites.layer_indices(model, layers)
  patched, top = interventions.capture_topk(model, "mlp.hidden", chosen, k)
  jit_forward(patched)(named_tokens(ids))
  values, indices = zip(*(top["mlp.hidden", layer] for layer in chosen), strict=True)
  axes = ("batch", "seq", TOP_K)
  return TopNeurons(
    layers=chosen,
    tokens=ids,
    ids=np.stack([to_numpy(i.unwrap(*axes)) for i in indices]),
    values=np.stack([to_numpy(v.unwrap(*axes)) for v in values]),
  )


def neuron_weights(model: Any, layer: int, kind: str) -> pz.nx.NamedArray:
  """The ``{embedding, neurons}`` weights of one MLP projection.

  Args:
    model: A model built by gemma_surgery (parameter labels as in `build`).
    layer: Layer index (negative allowed).
    kind: ``"gate"``, ``"up"`` (inputs read from the residual stream) or
      ``"down"`` (outputs written to it).
  """
  if kind not in _WEIGHTS:
    raise errors.InputError(f"kind={kind!r}; valid: {sorted(_WEIGHTS)}.")
  (layer,) = sites.layer_indices(model, layer)
  suffix = f"/block_{layer}/mlp/{_WEIGHTS[kind]}.weights"
  found = [
    p
    for p in pz.select(model).at_instances_of(pz.Parameter).get_sequence()
    if p.label.endswith(suffix)
  ]
  if len(found) != 1:
    raise errors.SiteError(
      f"Expected one parameter labelled '*{suffix}', found {len(found)}; is this a"
      " model built by gemma_surgery?"
    )
  return found[0].value


@dataclasses.dataclass(frozen=True)
class NeuronTokens(NamedResult):
  """Tokens a neuron's weight directions map to through the read-out head.

  ``named()`` gives ``top_ids``, ``top_logits``, ``bottom_ids`` and
  ``bottom_logits`` as NamedArrays ``{kind, top_k}``, kinds in the order
  of `KINDS` (gate, up, down).

  Attributes:
    layer: Layer index.
    neuron: Neuron index.
    top: ``{kind: (ids, logits, pieces)}`` for kinds gate/up/down: the
      tokens with the largest logits when the direction is decoded.
    bottom: The same for the most negative logits.
  """

  AXES = {
    f"{end}_{what}": (KIND, TOP_K)
    for end in ("top", "bottom")
    for what in ("ids", "logits")
  }

  layer: int
  neuron: int
  top: dict[str, tuple[np.ndarray, np.ndarray, list[str] | None]]
  bottom: dict[str, tuple[np.ndarray, np.ndarray, list[str] | None]]

  def named(self) -> dict[str, pz.nx.NamedArray]:
    """``{top,bottom}_{ids,logits}`` as NamedArrays ``{kind, top_k}``."""
    out = {}
    for end in ("top", "bottom"):
      found = getattr(self, end)
      for i, what in enumerate(("ids", "logits")):
        stacked = np.stack([found[kind][i] for kind in KINDS])
        out[f"{end}_{what}"] = wrap(stacked, (KIND, TOP_K))
    return out


def neuron_tokens(
  model: Any, layer: int, neuron: int, *, k: int = 10, tokenizer: Any = None
) -> NeuronTokens:
  """Projects a neuron's gate/up/down weights through the read-out head.

  Each ``{embedding}`` direction goes through the model's final RMSNorm
  (normalisation and gain), the unembedding and any final soft cap, as if it
  were the last residual vector. ``down`` is what the neuron writes (before
  the post-FFW norm of Gemma 2/3, which rescales the whole MLP output);
  ``gate``/``up`` are what it reads.

  Raises:
    InputError: Neuron index out of range, bad ``k``.
  """
  config = getattr(model, "config", None)  # Gemma 4: widths differ by layer
  width = model.metadata.mlp_hidden_dim
  if config is not None and isinstance(layer, int | np.integer):
    width = config.layer_mlp_dim(int(layer))
  if not isinstance(neuron, int | np.integer) or not 0 <= neuron < width:
    raise errors.InputError(f"neuron={neuron!r} is outside 0..{width - 1}.")
  head = readout_head(model)
  top, bottom = {}, {}
  for kind in KINDS:
    direction = neuron_weights(model, layer, kind)[{"neurons": int(neuron)}]
    logits = head(direction.astype(jnp.float32)).unwrap("vocabulary")
    logits = to_numpy(logits, np.float64)
    top[kind] = top_tokens(logits, k, tokenizer)
    ids, values, pieces = top_tokens(-logits, k, tokenizer)
    bottom[kind] = (ids, -values, pieces)
  (layer,) = sites.layer_indices(model, layer)
  return NeuronTokens(layer=layer, neuron=int(neuron), top=top, bottom=bottom)


def compare_neuron_edits(
  model: Any,
  prompts: Any,
  layer: int,
  neuron: int,
  *,
  factors: dict[str, float] | None = None,
  max_new_tokens: int = 24,
  tokenizer: Any = None,
  eos_id: int | None = None,
) -> dict[str, list[str] | np.ndarray]:
  """Greedy generations with one neuron scaled by each factor.

  Args:
    model: The model.
    prompts: Prompts for `gemma_surgery.generate`.
    layer: The neuron's layer.
    neuron: The neuron index.
    factors: ``{label: factor}``; default ``{"original": 1, "deactivated":
      0, "boosted": 10}``.
    max_new_tokens: Tokens per generation.
    tokenizer: Decodes the text (and encodes string prompts).
    eos_id: Stop token.

  Returns:
    ``{label: texts}`` (token arrays without a tokenizer).
  """
  factors = factors or {"original": 1.0, "deactivated": 0.0, "boosted": 10.0}
  out = {}
  for label, factor in factors.items():
    edited = interventions.scale_neurons(model, layer, [neuron], factor)
    result = generate(
      edited,
      prompts,
      max_new_tokens=max_new_tokens,
      tokenizer=tokenizer,
      eos_id=eos_id,
    )
    out[label] = result.text if result.text is not None else result.tokens
  return out
