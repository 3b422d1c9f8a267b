"""Interventions from a graph: edit graph features in the real model.

    nodes = top_feature_nodes(graph, logit_id, k=5)
    report = intervene(model, tcs, tokens, graph, nodes, logit_id, scale=0.0)
    report.predicted, report.predicted_direct, report.real

``scale`` multiplies the chosen features' activations at their positions
(0 ablates, 2 doubles). In the real model the transcoders are spliced with
their error term, so the model is exact except for the edit: at each edited
layer the features are re-encoded from the *current* ``mlp.in`` and
``(scale − 1) · f`` of the chosen (position, latent) pairs is decoded into
``mlp.out`` of every layer the dictionary writes (one layer for transcoders,
every later one for a CLT); everything downstream (attention, MLPs) responds
freely. The graph predicts the change of the demeaned logit two ways:
``predicted_direct`` keeps every other feature fixed (the sum of the chosen
nodes' direct edges to the logit times ``scale − 1``) and ``predicted`` also
lets the other active features respond linearly through the graph's
feature-to-feature edges (JumpReLU slope 1 while active).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.circuits.graph import Graph
from gemma_surgery.circuits.replacement import check_fits
from gemma_surgery.sae.autoencoders import contract
from gemma_surgery.sae.clt import Dictionary
from gemma_surgery.surgery import sites
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.run import jit_forward

_LABELS = itertools.count()


@pz.pytree_dataclass
class FeatureTap(base.SurgeryLayer):
  """At ``mlp.in[layer]``: stores the dictionary's features of the activation.

  Attributes:
    dictionary: The `TranscoderSet` / `CrossLayerTranscoder`.
    channel: Receives ``{batch, seq, latents}`` features.
    layer: Layer index (static).
  """

  dictionary: Any
  channel: pz.StateVariable
  layer: int = base.static_field(0)

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    self.channel.value = self.dictionary.encode_layer(self.layer, value)
    return value


@pz.pytree_dataclass
class FeatureEditOut(base.SurgeryLayer):
  """At ``mlp.out[layer]``: adds ``Σ_l (mask_l ⊙ f_l) · W_dec[l→layer]``.

  Attributes:
    dictionary: The dictionary (decoders).
    channels: Per source layer, the `FeatureTap` variable.
    masks: Per source layer, ``{seq, latents}`` factors ``scale − 1`` at the
      edited (position, latent) pairs, 0 elsewhere.
    sources: Source layers, matching ``channels`` and ``masks`` (static).
    layer: Layer index (static).
  """

  dictionary: Any
  channels: tuple[pz.StateVariable, ...]
  masks: tuple[pz.nx.NamedArray, ...]
  sources: tuple[int, ...] = base.static_field(())
  layer: int = base.static_field(0)

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    out = value.astype(jnp.float32)
    for source, channel, mask in zip(
      self.sources, self.channels, self.masks, strict=True
    ):
      dec = self.dictionary.decoder(source, self.layer)
      out = out + contract("latents", channel.value * mask, dec)
    return out.astype(value.dtype)


def edit_features(
  model: Any, dictionary: Dictionary, features: np.ndarray, scale: float, seq: int
) -> Any:
  """The real model with ``features`` (``[n, 3]`` layer, pos, latent) scaled.

  A pure rewrite (see module doc); ``seq`` is the prompt length.
  """
  check_fits(model, dictionary)
  n = dictionary.info.num_layers
  width = dictionary.info.width
  features = np.asarray(features, np.int64).reshape(-1, 3)
  bad = [
    tuple(f)
    for f in features.tolist()
    if not (0 <= f[0] < n and 0 <= f[1] < seq and 0 <= f[2] < width)
  ]
  if bad:
    raise errors.InputError(
      f"Features {bad[:5]} are out of range: layer 0..{n - 1}, position"
      f" 0..{seq - 1}, latent 0..{width - 1}."
    )
  sources = sorted({int(f[0]) for f in features})
  channels = {
    s: pz.StateVariable(value=None, label=f"circuits/tap_{next(_LABELS)}")
    for s in sources
  }
  masks = {}
  for s in sources:
    m = np.zeros((seq, width), np.float32)
    rows = features[features[:, 0] == s]
    m[rows[:, 1], rows[:, 2]] = scale - 1.0
    masks[s] = pz.nx.wrap(jnp.asarray(m)).tag("seq", "latents")
  model = sites.insert(
    model,
    "mlp.in",
    sources,
    lambda i: FeatureTap(dictionary=dictionary, channel=channels[i], layer=i),
  )

  def writers(k: int) -> list[int]:
    return [s for s in sources if dictionary.decoder(s, k) is not None]

  targets = [k for k in range(n) if writers(k)]
  return sites.insert(
    model,
    "mlp.out",
    targets,
    lambda k: FeatureEditOut(
      dictionary=dictionary,
      channels=tuple(channels[s] for s in writers(k)),
      masks=tuple(masks[s] for s in writers(k)),
      sources=tuple(writers(k)),
      layer=k,
    ),
  )


@dataclasses.dataclass(frozen=True)
class InterventionResult:
  """Predicted vs real change of a demeaned logit.

  Attributes:
    logit_id: The vocabulary id.
    predicted: Graph prediction, other features responding linearly.
    predicted_direct: Graph prediction, other features fixed.
    real: The real model's change.
    nodes: The edited feature nodes (graph indices).
    scale: The activation factor.
  """

  logit_id: int
  predicted: float
  predicted_direct: float
  real: float
  nodes: tuple[int, ...]
  scale: float


def top_feature_nodes(
  graph: Graph, logit_id: int, k: int = 5, sign: str = "positive"
) -> list[int]:
  """The ``k`` feature nodes with the largest direct edges to the logit.

  Args:
    sign: ``"positive"`` (the features that promote it, largest first),
      ``"negative"`` (those that suppress it) or ``"abs"`` (either).
  """
  row = graph.adjacency[graph.logit_node(logit_id), : graph.n_features]
  keys = {"positive": -row, "negative": row, "abs": -np.abs(row)}
  if sign not in keys:
    raise errors.InputError(f"sign={sign!r}; valid: {sorted(keys)}.")
  order = np.argsort(keys[sign], kind="stable")[:k]
  keep = {"positive": row > 0, "negative": row < 0, "abs": row != 0}[sign]
  return [int(i) for i in order if keep[i]]


def predict(graph: Graph, nodes: list[int], logit_id: int, scale: float) -> tuple:
  """``(predicted, predicted_direct)`` change of the demeaned logit."""
  n_f = graph.n_features
  nodes = list(nodes)
  if any(not 0 <= i < n_f for i in nodes):
    raise errors.InputError(f"Nodes {nodes} must be feature nodes (0..{n_f - 1}).")
  acts = graph.activations.astype(np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    slope = np.where(acts[None, :] != 0, graph.adjacency[:, :n_f] / acts[None, :], 0.0)
  row = graph.logit_node(logit_id)
  chosen = np.zeros(n_f, bool)
  chosen[nodes] = True
  delta = np.zeros(n_f)
  for layer in range(graph.num_layers):  # Features are ordered by layer.
    here = np.flatnonzero(graph.features[:, 0] == layer)
    delta[here] = slope[here] @ delta
    fixed = here[chosen[here]]
    delta[fixed] = (scale - 1.0) * acts[fixed]
  direct = float(slope[row, chosen] @ ((scale - 1.0) * acts[chosen]))
  return float(slope[row] @ delta), direct


def _demeaned(logits: Any, logit_id: int) -> float:
  last = np.asarray(logits.unwrap("batch", "seq", "vocabulary"), np.float64)[0, -1]
  return float(last[logit_id] - last.mean())


def intervene(
  model: Any,
  dictionary: Dictionary,
  tokens: pz.nx.NamedArray,
  graph: Graph,
  nodes: list[int],
  logit_id: int,
  scale: float = 0.0,
) -> InterventionResult:
  """Scales graph feature ``nodes`` in the real model; compares with the graph.

  Raises:
    InputError: ``nodes`` are not feature nodes, or ``logit_id`` is not a
      logit node of ``graph``.
  """
  predicted, direct = predict(graph, nodes, logit_id, scale)
  seq = tokens.named_shape["seq"]
  edited = edit_features(model, dictionary, graph.features[list(nodes)], scale, seq)
  before = _demeaned(jit_forward(model)(tokens), logit_id)
  real = _demeaned(jit_forward(edited)(tokens), logit_id) - before
  return InterventionResult(
    logit_id=int(logit_id),
    predicted=predicted,
    predicted_direct=direct,
    real=real,
    nodes=tuple(int(i) for i in nodes),
    scale=float(scale),
  )
