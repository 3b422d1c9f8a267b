"""`stack_rows`: per-row SAE clamps, head and neuron ablations, and its refusals.

Row i of a stacked model must equal the model with edit i applied to the
whole batch (same shapes: to 1e-5); the edits must differ between rows (a
negative control), and every misuse raises `SurgeryError` naming it.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemma_surgery as gs


@pytest.fixture(scope="module")
def lm():
  return gs.load("tiny", progress=False)


@pytest.fixture(scope="module")
def sae():
  return gs.sae.load_sae("tiny")


@pytest.fixture(scope="module")
def tokens(lm):
  ids = lm.tokenizer.encode(["The cat sat on the mat", "Once upon a time ther"])
  width = min(len(r) for r in ids)
  return pz.nx.wrap(jnp.asarray([r[:width] for r in ids])).tag("batch", "seq")


def _logits(model, tokens) -> np.ndarray:
  return np.asarray(gs.jit_forward(model)(tokens).unwrap("batch", "seq", "vocabulary"))


def _edit(model, sae, clamp, head, neuron):
  edits = gs.sae.feature_edits(sae, clamp={212: clamp})
  model = gs.sae.splice_sae(model, sae, use_error_term=True, edits=edits)
  model = gs.interventions.ablate(model, "attn.z", 1, heads=[head])
  return gs.interventions.deactivate_neurons(model, 3, [neuron])


def test_mixed_per_row_edits_equal_uniform_runs(lm, sae, tokens):
  points = [(0.0, 0, 5), (3.0, 2, 17), (8.0, 3, 700)]
  rows = [_edit(lm.model, sae, *p) for p in points]
  # One prompt per row: rows 0..2 all see the first prompt.
  batch = pz.nx.wrap(jnp.repeat(tokens.unwrap("batch", "seq")[:1], 3, 0)).tag(
    "batch", "seq"
  )
  stacked = gs.stack_rows(rows)
  out = _logits(stacked, batch)
  for i, model in enumerate(rows):
    ref = _logits(model, batch)
    np.testing.assert_allclose(out[i], ref[i], atol=1e-5, rtol=0)
  assert np.abs(out[0] - out[2]).max() > 0.1  # the rows' edits differ
  # The shared SAE weights and model parameters are not copied per row.
  splice = pz.select(stacked).at_instances_of(gs.sae.SpliceSAE).get_sequence()[0]
  first = pz.select(rows[0]).at_instances_of(gs.sae.SpliceSAE).get_sequence()[0]
  assert splice.sae.w_dec is first.sae.w_dec
  assert splice.edits.clamp_value.named_shape == {"batch": 3, "latents": 1024}


def test_per_row_scale_argument(lm, tokens):
  vector = pz.nx.wrap(jnp.ones(256)).tag("embedding")
  scales = pz.nx.wrap(jnp.asarray([0.0, 5.0])).tag("batch")
  per_row = gs.steer(lm.model, "resid_post", 2, vector, scales)
  out = _logits(per_row, tokens)
  for i, s in enumerate((0.0, 5.0)):
    ref = _logits(gs.steer(lm.model, "resid_post", 2, vector, s), tokens)
    np.testing.assert_allclose(out[i], ref[i], atol=1e-5, rtol=0)
  with pytest.raises(gs.SurgeryError, match="batch=2.*batch=1"):
    per_row(tokens[{"batch": pz.slice[0:1]}])
  with pytest.raises(gs.SurgeryError, match="Steering scale"):
    gs.steer(lm.model, "resid_post", 2, vector, pz.nx.wrap(jnp.ones(2)).tag("seq"))


def test_stack_rows_refusals(lm, tokens):
  vector = pz.nx.wrap(jnp.ones(256)).tag("embedding")
  a = gs.steer(lm.model, "resid_post", 2, vector, 1.0)
  with pytest.raises(gs.SurgeryError, match="another structure"):
    gs.stack_rows([a, gs.steer(lm.model, "resid_post", 3, vector, 1.0)])
  with pytest.raises(gs.SurgeryError, match="captures"):
    gs.stack_rows([gs.capture(a, "resid_post", 1)[0] for _ in range(2)])
  mean = [gs.interventions.ablate(lm.model, "resid_post", 1, mode="mean")] * 2
  with pytest.raises(gs.SurgeryError, match="averages over batch"):
    gs.stack_rows(mean)
  with pytest.raises(gs.SurgeryError, match="at least one"):
    gs.stack_rows([])
  stacked = gs.stack_rows([a, gs.steer(lm.model, "resid_post", 2, vector, 2.0)] * 2)
  with pytest.raises(gs.SurgeryError, match="batch=4"):
    stacked(tokens)  # 4 per-row edits, 2 rows
