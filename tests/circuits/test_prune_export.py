"""Influence pruning and circuit-tracer JSON export on hand-made graphs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gemma_surgery.circuits.export import save_graph
from gemma_surgery.circuits.graph import Graph
from gemma_surgery.circuits.prune import influence, normalized, prune
from gemma_surgery.errors import InputError


def _graph() -> Graph:
  """1 layer, 2 positions; features: f0 (pos 1, strong path), f1 (pos 1, weak).

  Node order: f0, f1, err(0,0), err(0,1), tok0, tok1, logit."""
  n = 7
  a = np.zeros((n, n), np.float32)
  a[0, 5] = 2.0  # tok1 -> f0
  a[1, 4] = 0.01  # tok0 -> f1
  a[6, 0] = 3.0  # f0 -> logit
  a[6, 1] = 0.02  # f1 -> logit
  a[6, 3] = 0.5  # err(0,1) -> logit
  a[6, 5] = 1.0  # tok1 -> logit
  return Graph(
    tokens=np.array([2, 7]),
    features=np.array([[0, 1, 11], [0, 1, 12]]),
    activations=np.array([1.5, 0.1], np.float32),
    logit_ids=np.array([9]),
    logit_probs=np.array([0.9], np.float32),
    adjacency=a,
    num_layers=1,
    scan="hand",
    prompt="x y",
  )


def test_influence_is_path_sum():
  g = _graph()
  norm = normalized(g.adjacency)
  w = np.zeros(7)
  w[6] = 0.9
  got = influence(norm, w)
  # Independent: w (I - Â)^-1 - w.
  want = w @ np.linalg.inv(np.eye(7) - norm) - w
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
  assert got[0] > got[1] > 0


def test_prune_keeps_strong_path_drops_weak_feature():
  g = _graph()
  kept = prune(g, node_threshold=0.8, edge_threshold=0.98)
  assert kept.node_mask[0] and not kept.node_mask[1]
  assert kept.node_mask[4:].all()  # Tokens and logits always stay.
  assert kept.edge_mask[6, 0] and kept.edge_mask[0, 5]
  assert not kept.edge_mask[6, 1]
  everything = prune(g, node_threshold=1.0, edge_threshold=1.0)
  assert everything.node_mask[1]  # Negative control: no pruning keeps f1.
  with pytest.raises(InputError, match="node_threshold"):
    prune(g, node_threshold=1.5)


def test_export_circuit_tracer_layout(tmp_path):
  g = _graph()
  data = save_graph(g, tmp_path / "g.json")
  assert json.loads((tmp_path / "g.json").read_text()) == data
  assert set(data) == {"metadata", "qParams", "nodes", "links"}
  assert data["metadata"]["slug"] == "g" and data["metadata"]["schema_version"] == 1
  ids = {n["node_id"]: n for n in data["nodes"]}
  assert ids["0_11_1"]["feature"] == (0 + 11) * (0 + 11 + 1) // 2 + 11
  assert ids["0_11_1"]["feature_type"] == "cross layer transcoder"
  assert ids["0_11_1"]["activation"] == pytest.approx(1.5)
  assert ids["E_7_1"]["layer"] == "E" and ids["E_2_0"]["ctx_idx"] == 0
  assert ids["2_9_1"]["is_target_logit"] and ids["2_9_1"]["feature_type"] == "logit"
  assert "0_12_1" not in ids  # Pruned.
  links = {(e["source"], e["target"]): e["weight"] for e in data["links"]}
  assert links[("0_11_1", "2_9_1")] == pytest.approx(3.0)
  assert links[("E_7_1", "0_11_1")] == pytest.approx(2.0)
