"""Pruning an attribution graph by influence on the logits (circuit-tracer's rule).

    kept = prune(graph, node_threshold=0.8, edge_threshold=0.98)
    kept.node_mask, kept.edge_mask            # [N], [N, N] booleans

Influence: normalize ``|A|`` so each target's incoming weights sum to 1
(``Â``), weight the logit nodes by their probabilities ``w``, and sum all
paths: ``influence = w Â + w Â² + …`` (the series ends: the graph is acyclic).
Nodes are kept, most influential first, until they hold ``node_threshold``
of the total influence (tokens and logits always stay); edges of the graph
restricted to kept nodes are scored ``Â[t, s] · (influence[t] + w[t])`` and
kept until ``edge_threshold`` of the total score; then feature/error nodes
without a kept outgoing edge and features without a kept incoming edge are
dropped, repeatedly, until nothing changes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from gemma_surgery import errors
from gemma_surgery.circuits.graph import Graph


@dataclasses.dataclass
class Pruned:
  """Result of `prune`.

  Attributes:
    node_mask: ``[N]`` kept nodes.
    edge_mask: ``[N, N]`` kept edges (``[target, source]``).
    influence: ``[N]`` each node's influence on the logits.
    cumulative: ``[N]`` the share of total influence of the nodes at least as
      influential (circuit-tracer's ``influence`` field in exports).
  """

  node_mask: np.ndarray
  edge_mask: np.ndarray
  influence: np.ndarray
  cumulative: np.ndarray


def normalized(adjacency: np.ndarray) -> np.ndarray:
  """``|A|`` with each row (target) summing to 1 (zero rows stay zero)."""
  a = np.abs(adjacency).astype(np.float64)
  return a / np.maximum(a.sum(1, keepdims=True), 1e-10)


def influence(
  norm: np.ndarray, weights: np.ndarray, max_iter: int = 10_000
) -> np.ndarray:
  """``w Â + w Â² + …`` (raises `InputError` if the graph has a cycle)."""
  current = weights @ norm
  total = current.copy()
  for _ in range(max_iter):
    if not current.any():
      return total
    current = current @ norm
    total += current
  raise errors.InputError("Influence did not converge: the graph has a cycle.")


def _threshold(scores: np.ndarray, fraction: float) -> float:
  ordered = np.sort(scores.ravel())[::-1]
  total = ordered.sum()
  if total <= 0:
    return np.inf
  cum = np.cumsum(ordered) / total
  index = min(int(np.searchsorted(cum, fraction)), len(ordered) - 1)
  return float(ordered[index])


def logit_weights(graph: Graph) -> np.ndarray:
  w = np.zeros(graph.size)
  w[graph.logit_start :] = graph.logit_probs
  return w


def prune(
  graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> Pruned:
  """Keeps the nodes and edges that carry most influence (see module doc).

  Raises:
    InputError: A threshold outside [0, 1].
  """
  for name, value in (
    ("node_threshold", node_threshold),
    ("edge_threshold", edge_threshold),
  ):
    if not 0.0 <= value <= 1.0:
      raise errors.InputError(f"{name}={value}; it must be in [0, 1].")
  w = logit_weights(graph)
  node_inf = influence(normalized(graph.adjacency), w)
  node_mask = node_inf >= _threshold(node_inf, node_threshold)
  node_mask[graph.token_start :] = True
  pruned = graph.adjacency.copy()
  pruned[~node_mask] = 0
  pruned[:, ~node_mask] = 0
  norm = normalized(pruned)
  edge_scores = norm * (influence(norm, w) + w)[:, None]
  edge_mask = edge_scores >= _threshold(edge_scores, edge_threshold)
  edge_mask &= pruned != 0
  inner = slice(0, graph.token_start)
  while True:
    old = node_mask.copy()
    node_mask[inner] &= edge_mask[:, inner].any(0)
    node_mask[: graph.n_features] &= edge_mask[: graph.n_features].any(1)
    edge_mask[~node_mask] = False
    edge_mask[:, ~node_mask] = False
    if (old == node_mask).all():
      break
  order = np.argsort(-node_inf, kind="stable")
  cumulative = np.zeros_like(node_inf)
  total = node_inf.sum()
  cumulative[order] = np.cumsum(node_inf[order]) / (total if total > 0 else 1.0)
  return Pruned(node_mask, edge_mask, node_inf, cumulative)
