"""Attribution graphs on the replacement model (circuit-tracer's definition).

    graph = attribute(model, tcs, tokens)       # tcs: TranscoderSet or CLT
    graph.adjacency[t, s]                       # direct effect of s on t

Nodes, in circuit-tracer's order: the active features (layer, position,
latent) with nonzero activation (BOS excluded), one error node per (layer,
position) (index ``layer * n_pos + pos``), one token-embedding node per
position, and the top output logits of the last position (most probable
first, until their probability sums to ``desired_logit_prob`` or
``max_n_logits`` are taken).

Edge weight = the direct linear effect of the source on the target in the
replacement model (frozen attention patterns and norm scales, `replacement`):
for a target feature the effect on its encoder pre-activation ``mlp.in ·
W_enc[:, i]``, for a logit on ``logit − mean(logits)``. A feature source
contributes ``a_s · W_dec[l→k, s]`` at every layer ``k`` it writes, an
error node its error vector, a token its scaled embedding, so::

  A[t, s] = Σ_k ⟨source_s at mlp.out[k] (or embed), ∂target_t/∂(that site)⟩

computed with one vmapped ``jax.vjp`` per batch of targets, on the device
(`rows`: compiled once per prompt length; feature targets skip the
unembedding and stop at their batch's deepest layer; only the ``[T, N]``
rows come back). Each target's pre-activation equals the sum of its row
plus the bias terms (decoder biases, its encoder bias): the graph is
complete.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz
from tqdm.auto import tqdm

from gemma_surgery import errors
from gemma_surgery.circuits.linear import frozen_reads
from gemma_surgery.circuits.replacement import Replacement, replacement_model
from gemma_surgery.circuits.rows import (
  edge_rows,
  feature_grads,
  graph_sources,
  logit_grads,
)
from gemma_surgery.host import to_numpy
from gemma_surgery.sae.clt import Dictionary

_GRAD_BYTES = 1 << 29
"""Batches of targets are cut so their ``[T, L, seq, d]`` gradients stay under this."""


@dataclasses.dataclass
class Graph:
  """An attribution graph (numpy arrays; see the module doc for the order).

  Attributes:
    tokens: ``[n_pos]`` prompt ids.
    features: ``[n_features, 3]`` (layer, position, latent) of feature nodes.
    activations: ``[n_features]`` their activations.
    logit_ids: ``[n_logits]`` vocabulary ids of the logit nodes.
    logit_probs: ``[n_logits]`` their probabilities.
    adjacency: ``[N, N]`` float32, ``adjacency[target, source]``.
    num_layers: Model layers.
    scan: Names the transcoders (``dictionary.info.source``).
    prompt: The prompt text, if known.
  """

  tokens: np.ndarray
  features: np.ndarray
  activations: np.ndarray
  logit_ids: np.ndarray
  logit_probs: np.ndarray
  adjacency: np.ndarray
  num_layers: int
  scan: str = ""
  prompt: str | None = None

  @property
  def n_pos(self) -> int:
    return len(self.tokens)

  @property
  def n_features(self) -> int:
    return len(self.features)

  @property
  def error_start(self) -> int:
    return self.n_features

  @property
  def token_start(self) -> int:
    return self.n_features + self.num_layers * self.n_pos

  @property
  def logit_start(self) -> int:
    return self.token_start + self.n_pos

  @property
  def size(self) -> int:
    return self.logit_start + len(self.logit_ids)

  def kind(self, node: int) -> str:
    """``"feature"``, ``"error"``, ``"token"`` or ``"logit"``."""
    if not 0 <= node < self.size:
      raise errors.InputError(f"Node {node} is not in 0..{self.size - 1}.")
    if node < self.error_start:
      return "feature"
    if node < self.token_start:
      return "error"
    return "token" if node < self.logit_start else "logit"

  def feature_node(self, layer: int, pos: int, latent: int) -> int:
    """Index of a feature node.

    Raises:
      InputError: That feature is not a node (inactive, or out of range).
    """
    hit = np.flatnonzero(
      (self.features[:, 0] == layer)
      & (self.features[:, 1] == pos)
      & (self.features[:, 2] == latent)
    )
    if len(hit) != 1:
      raise errors.InputError(
        f"Feature (layer {layer}, pos {pos}, latent {latent}) is not an active"
        " feature node of this graph."
      )
    return int(hit[0])

  def error_node(self, layer: int, pos: int) -> int:
    return self.error_start + layer * self.n_pos + pos

  def token_node(self, pos: int) -> int:
    return self.token_start + pos

  def logit_node(self, vocab_id: int) -> int:
    hit = np.flatnonzero(self.logit_ids == vocab_id)
    if len(hit) != 1:
      raise errors.InputError(
        f"Token {vocab_id} is not a logit node; logit nodes: {self.logit_ids.tolist()}."
      )
    return self.logit_start + int(hit[0])

  def describe(self, node: int) -> tuple:
    """``(kind, layer, pos, index)`` of a node (layer None for tokens/logits)."""
    kind = self.kind(node)
    if kind == "feature":
      layer, pos, latent = (int(v) for v in self.features[node])
      return kind, layer, pos, latent
    if kind == "error":
      layer, pos = divmod(node - self.error_start, self.n_pos)
      return kind, layer, pos, -1
    if kind == "token":
      pos = node - self.token_start
      return kind, None, pos, int(self.tokens[pos])
    i = node - self.logit_start
    return kind, None, self.n_pos - 1, int(self.logit_ids[i])


def _logit_targets(logits: np.ndarray, max_n: int, desired: float) -> tuple:
  z = logits.astype(np.float64)
  probs = np.exp(z - z.max())
  probs /= probs.sum()
  order = np.argsort(-probs, kind="stable")[:max_n]
  cum = np.cumsum(probs[order])
  keep = int(np.searchsorted(cum, desired)) + 1
  order = order[: min(keep, max_n)]
  return order.astype(np.int64), probs[order].astype(np.float32)


def _encoder_columns(dictionary: Dictionary, features: np.ndarray) -> np.ndarray:
  cols = np.zeros((len(features), dictionary.info.d_model), np.float32)
  for layer in np.unique(features[:, 0]):
    rows = np.flatnonzero(features[:, 0] == layer)
    enc = to_numpy(
      dictionary.encoder(int(layer)).unwrap("embedding", "latents"), np.float32
    )
    cols[rows] = enc[:, features[rows, 2]].T
  return cols


def _active(rep: Replacement, max_feature_nodes: int | None) -> tuple:
  found = []
  for layer, feats in enumerate(rep.features):
    pos, latent = np.nonzero(feats)
    found.append(np.stack([np.full_like(pos, layer), pos, latent], 1))
  features = np.concatenate(found).astype(np.int64)
  acts = np.array([rep.features[k][p, i] for k, p, i in features], np.float32)
  if max_feature_nodes is not None and len(features) > max_feature_nodes:
    keep = np.sort(np.argsort(-np.abs(acts), kind="stable")[:max_feature_nodes])
    features, acts = features[keep], acts[keep]
  return features, acts


def _check_settings(
  max_n_logits: int,
  desired_logit_prob: float,
  max_feature_nodes: int | None,
  batch_size: int,
) -> None:
  """Raises InputError naming every setting and its valid range if one is off."""
  nodes_ok = max_feature_nodes is None or max_feature_nodes >= 1
  if (
    not 1 <= max_n_logits
    or not 0.0 < desired_logit_prob <= 1.0
    or batch_size < 1
    or not nodes_ok
  ):
    raise errors.InputError(
      f"max_n_logits={max_n_logits} (>= 1), desired_logit_prob="
      f"{desired_logit_prob} (in (0, 1]), batch_size={batch_size} (>= 1),"
      f" max_feature_nodes={max_feature_nodes} (None or >= 1)."
    )


def attribute(
  model: Any,
  dictionary: Dictionary,
  tokens: pz.nx.NamedArray,
  *,
  max_n_logits: int = 10,
  desired_logit_prob: float = 0.95,
  max_feature_nodes: int | None = None,
  batch_size: int = 128,
  prompt: str | None = None,
  progress: bool = True,
) -> Graph:
  """Builds the attribution graph of one prompt (see module doc).

  Args:
    model: A Penzai Gemma LM (unpatched; not modified).
    dictionary: `TranscoderSet` or `CrossLayerTranscoder` (mlp.in -> mlp.out).
    tokens: ``{batch: 1, seq}`` ids.
    max_n_logits: At most this many logit nodes.
    desired_logit_prob: Take logits until their probability sums to this.
    max_feature_nodes: Keep only this many features (largest activations).
    batch_size: Targets per vmapped backward pass (lowered so that a batch's
      ``[T, L, seq, d]`` gradients stay under 512 MiB).
    prompt: Stored in the graph (for export).
    progress: tqdm bar over target batches.

  Raises:
    SAEError / InputError: As `replacement_model`; bad settings.
  """
  _check_settings(max_n_logits, desired_logit_prob, max_feature_nodes, batch_size)
  rep = replacement_model(model, dictionary, tokens)
  return attribute_replacement(
    rep,
    max_n_logits=max_n_logits,
    desired_logit_prob=desired_logit_prob,
    max_feature_nodes=max_feature_nodes,
    batch_size=batch_size,
    prompt=prompt,
    progress=progress,
  )


def attribute_replacement(
  rep: Replacement,
  *,
  max_n_logits: int = 10,
  desired_logit_prob: float = 0.95,
  max_feature_nodes: int | None = None,
  batch_size: int = 128,
  prompt: str | None = None,
  progress: bool = True,
  dtype: Any = jnp.float32,
) -> Graph:
  """`attribute` on an already built `Replacement`.

  ``dtype=jnp.float64`` (inside ``jax.enable_x64()``) computes
  the edges in double precision (tests compare them with autodiff).
  """
  _check_settings(max_n_logits, desired_logit_prob, max_feature_nodes, batch_size)
  np_dtype = np.dtype(jnp.dtype(dtype).name)
  n, n_pos, d = rep.errors.shape
  features, acts = _active(rep, max_feature_nodes)
  logit_ids, logit_probs = _logit_targets(
    rep.logits[-1], max_n_logits, desired_logit_prob
  )
  enc_cols = _encoder_columns(rep.dictionary, features).astype(np_dtype)
  spec, arrays = frozen_reads(rep, [("mlp.in", i) for i in range(n)], dtype)
  written = jnp.asarray(rep.written, dtype)
  sources = graph_sources(rep, features, acts, dtype)
  n_f = len(features)
  size = n_f + n * n_pos + n_pos + len(logit_ids)
  adjacency = np.zeros((size, size), np_dtype)
  per_target = n * n_pos * d * np_dtype.itemsize  # Its [L, seq, d] gradient.
  batch = max(1, min(batch_size, _GRAD_BYTES // per_target))

  def store(targets: np.ndarray, grads: tuple, depth: int, last: int) -> None:
    got = edge_rows(*grads, sources, np.int32(depth), np.int32(last))
    got = np.asarray(got)[: len(targets)]
    adjacency[targets, :n_f] = got[:, :n_f]
    adjacency[targets, n_f : n_f + (n + 1) * n_pos] = got[:, -(n + 1) * n_pos :]

  starts = range(0, n_f, batch)
  for start in tqdm(starts, desc="attribution", disable=not progress):
    which = np.arange(start, min(start + batch, n_f))
    pad = batch - len(which)  # Fixed batch shape: one compile per depth.
    layer, pos = (np.pad(features[which, j], (0, pad)).astype(np.int32) for j in (0, 1))
    enc = np.pad(enc_cols[which], ((0, pad), (0, 0)))
    depth = int(features[which, 0].max()) + 1
    grads = feature_grads(spec, arrays, written, depth, layer, pos, enc)
    store(which, grads, depth, features[which, 1].max())
  n_logit = min(batch, max_n_logits)
  for start in range(0, len(logit_ids), n_logit):
    ids = logit_ids[start : start + n_logit]
    live = np.arange(n_logit) < len(ids)
    ids = np.pad(ids, (0, n_logit - len(ids))).astype(np.int32)
    grads = logit_grads(spec, arrays, written, ids, live)
    store(n_f + n * n_pos + n_pos + start + np.arange(live.sum()), grads, n, n_pos - 1)
  return Graph(
    tokens=np.asarray(rep.tokens.unwrap("batch", "seq")[0]).astype(np.int64),
    features=features,
    activations=acts,
    logit_ids=logit_ids,
    logit_probs=logit_probs,
    adjacency=adjacency,
    num_layers=n,
    scan=rep.dictionary.info.source,
    prompt=prompt,
  )
