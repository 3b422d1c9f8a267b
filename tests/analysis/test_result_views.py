"""Analysis results render in treescope and as heatmaps, naming their axes."""

from __future__ import annotations

import numpy as np
import pytest
import treescope

from gemma_surgery import errors, viz
from gemma_surgery.analysis import attribution, direct_logit, edges


def _atp():
  effects = np.arange(6, dtype=np.float32).reshape(2, 3)
  return attribution.AttributionResult(
    site="resid_pre",
    by="position",
    method="atp",
    layers=[4, 5],
    effects=effects,
    clean=1.0,
    corrupted=0.0,
  )


def _dla():
  return direct_logit.DirectLogitAttribution(
    layers=[0, 1],
    embed=0.5,
    attn=np.ones(2),
    heads=np.full((2, 4), 0.25),
    mlp=np.zeros(2),
    neurons=np.zeros((2, 8)),
    remainder=0.0,
    total=2.5,
    logit_difference=2.5,
  )


def test_treescope_shows_named_axes():
  text = treescope.render_to_text(_atp())
  assert "AttributionResult" in text and "layer:2" in text and "seq:3" in text
  text = treescope.render_to_text(_dla())
  assert "heads:4" in text and "neurons:8" in text
  html = treescope.render_to_html(_atp(), compressed=False)
  assert "layer" in html and "seq" in html
  assert "treescope" in viz.show(_atp()).body  # the report view embeds it
  # Control: the bare numpy field carries no axis names.
  assert "seq" not in treescope.render_to_text(_atp().effects)


def test_heatmaps_are_titled_with_axis_names():
  hm = _atp().heatmap()
  assert (hm.row_title, hm.col_title) == ("layer", "seq")
  assert hm.row_labels == [4, 5]
  np.testing.assert_array_equal(hm.values, _atp().effects)
  assert "layer" in hm.body and "seq" in hm.body
  hm = _dla().heatmap("neurons", title="t")
  assert (hm.col_title, hm.values.shape) == ("neurons", (2, 8))
  assert _dla().heatmap().col_title == "heads"  # first 2-D field
  with pytest.raises(errors.InputError, match="2-D"):
    _dla().heatmap("mlp")
  # A NamedArray handed to viz.heatmap titles itself; numpy keeps the defaults.
  named = _atp().named()["effects"]
  assert viz.heatmap(named).col_title == "seq"
  assert viz.heatmap(_atp().effects).col_title == "position"


def test_edge_views():
  result = edges.EdgeAttribution(
    edges=[
      edges.Edge("L0.H1", "L1.MLP", -2.0),
      edges.Edge("embed", "logits", 1.0),
    ],
    clean=1.0,
    corrupted=0.0,
  )
  senders, receivers, scores = result.matrix()
  assert dict(scores.named_shape) == {"sender": 2, "receiver": 2}
  assert scores.unwrap("sender", "receiver")[0, 0] == -2.0
  assert scores.unwrap("sender", "receiver")[0, 1] == 0.0
  hm = result.heatmap()
  assert (hm.row_title, hm.col_title) == ("sender", "receiver")
  assert hm.row_labels == senders and hm.col_labels == receivers
  text = treescope.render_to_text(result)
  assert "sender:2" in text and "L0.H1" in text
