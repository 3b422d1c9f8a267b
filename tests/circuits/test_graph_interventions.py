"""Graph interventions: the edit mechanics are exact where they must be."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.circuits import traced

from gemma_surgery.circuits.interventions import (
  edit_features,
  intervene,
  predict,
  top_feature_nodes,
)
from gemma_surgery.errors import InputError


def _last(logits, v):
  row = np.asarray(logits.unwrap("batch", "seq", "vocabulary"), np.float64)[0, -1]
  return row[v] - row.mean()


@pytest.mark.parametrize("kind", ["transcoders", "clt"])
def test_edit_in_frozen_replacement_is_the_direct_prediction(kind):
  """In the frozen replacement, editing features of one layer changes the
  logit by exactly the graph's direct prediction (downstream is constant)."""
  _, _, dictionary, tokens, rep, graph = traced(kind)
  v = int(graph.logit_ids[0])
  layer = int(graph.features[top_feature_nodes(graph, v, 1)[0], 0])
  nodes = [i for i in top_feature_nodes(graph, v, 40) if graph.features[i, 0] == layer][
    :4
  ]
  seq = tokens.named_shape["seq"]
  for scale in (0.0, 2.5):
    edited = edit_features(rep.model, dictionary, graph.features[nodes], scale, seq)
    real = _last(edited(tokens), v) - _last(rep.model(tokens), v)
    _, direct = predict(graph, nodes, v, scale)
    assert abs(direct) > 1e-3
    np.testing.assert_allclose(real, direct, rtol=2e-3, atol=1e-4)


def test_real_model_intervention_runs_and_scale_one_is_a_no_op():
  model, _, dictionary, tokens, rep, graph = traced("transcoders")
  v = int(graph.logit_ids[0])
  nodes = top_feature_nodes(graph, v, 3)
  same = intervene(model, dictionary, tokens, graph, nodes, v, scale=1.0)
  assert same.real == pytest.approx(0.0, abs=1e-4) and same.predicted == 0.0
  moved = intervene(model, dictionary, tokens, graph, nodes, v, scale=0.0)
  assert abs(moved.real) > 1e-3  # Negative control for the no-op above.
  with pytest.raises(InputError, match="out of range"):
    edit_features(model, dictionary, np.array([[0, 99, 0]]), 0.0, 5)
  with pytest.raises(InputError, match="feature nodes"):
    predict(graph, [graph.size - 1], v, 0.0)
