"""Analyses vs an independent float64 numpy forward of the fixtures.

`test_sites.reference_forward` recomputes every site from config.json and the
safetensors weights; the logit lens, neuron projections, top neurons and
head scores are checked against it (or against brute-force loops), and every
batched patching sweep against one `interventions.patch` per patch.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.paths import HF_FIXTURES
from helpers.reference import reference_forward, rms_norm
from safetensors.numpy import load_file

import gemma_surgery as gs
from gemma_surgery import analysis, errors
from gemma_surgery.analysis import attention as attn
from gemma_surgery.analysis import neurons, patching
from gemma_surgery.surgery import interventions as iv

FIXTURE = HF_FIXTURES / "gemma2"
CAP, EPS = 30.0, 1e-6


@pytest.fixture(scope="module")
def model():
  return gs.load(FIXTURE, dtype="float32", progress=False).model


@pytest.fixture(scope="module")
def weights():
  return load_file(FIXTURE / "model.safetensors")


def _tokens(seed=0, batch=2, seq=10):
  ids = np.random.default_rng(seed).integers(4, 512, (batch, seq)).astype(np.int32)
  ids[:, 0] = 2
  return ids


def _readout(x, weights):
  logits = rms_norm(x, weights["model.norm.weight"], EPS) @ weights[
    "model.embed_tokens.weight"
  ].T.astype(np.float64)
  return np.tanh(logits / CAP) * CAP


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


# --- Logit lens -------------------------------------------------------------------


def test_logit_lens_matches_numpy_readout_of_every_stage(model, weights):
  ids = _tokens()
  ref = reference_forward(FIXTURE, ids)
  lens = analysis.logit_lens(model, ids, k=5)
  assert lens.labels == ["embed"] + [
    f"{s} {i}" for i in range(4) for s in ("attn", "mlp")
  ]
  stages = [ref["embed"]]
  for layer in range(4):
    stages += [ref["resid_mid", layer], ref["resid_post", layer]]
  for s, resid in enumerate(stages):
    probs = _softmax(_readout(resid, weights))
    expected = np.sort(probs, axis=-1)[..., ::-1][..., :5]
    np.testing.assert_allclose(lens.top_probs[s], expected, atol=2e-4)
    got = np.take_along_axis(probs, lens.top_ids[s].astype(np.int64), axis=-1)
    np.testing.assert_allclose(got, expected, atol=2e-4)  # ids of those probs
    if s:
      prev = stages[s - 1]
      cos = (prev * resid).sum(-1) / (
        np.linalg.norm(prev, axis=-1) * np.linalg.norm(resid, axis=-1)
      )
      np.testing.assert_allclose(lens.change[s], 1 - cos, atol=1e-4)
  assert np.isnan(lens.change[0]).all()
  # The last stage is the model's own output; the embedding stage is not.
  np.testing.assert_array_equal(lens.top_ids[-1, ..., 0], ref["logits"].argmax(-1))
  assert lens.agreement()[-1] == 1.0 and lens.agreement()[0] < 1.0


# --- Neurons ----------------------------------------------------------------------


def test_top_neurons_match_numpy_argsort(model):
  ids = _tokens(1)
  ref = reference_forward(FIXTURE, ids)
  top = neurons.top_neurons(model, ids, layers=[0, -1], k=4)
  assert top.layers == [0, 3]
  for row, layer in enumerate(top.layers):
    hidden = ref["mlp.hidden", layer]
    expected = np.sort(hidden, axis=-1)[..., ::-1][..., :4]
    np.testing.assert_allclose(top.values[row], expected, atol=1e-4)
    got = np.take_along_axis(hidden, top.ids[row].astype(np.int64), axis=-1)
    np.testing.assert_allclose(got, expected, atol=1e-4)


@pytest.mark.parametrize(
  ("kind", "key", "column"),
  [("down", "down_proj", True), ("up", "up_proj", False), ("gate", "gate_proj", False)],
)
def test_neuron_tokens_project_weights_through_the_readout(
  model, weights, kind, key, column
):
  w = weights[f"model.layers.2.mlp.{key}.weight"].astype(np.float64)
  direction = w[:, 7] if column else w[7]
  logits = _readout(direction, weights)
  got = neurons.neuron_tokens(model, 2, 7, k=6)
  order = np.argsort(-logits)
  np.testing.assert_allclose(got.top[kind][1], logits[order[:6]], atol=1e-4)
  np.testing.assert_allclose(got.bottom[kind][1], logits[order[::-1][:6]], atol=1e-4)
  # Negative control: another neuron's tokens differ.
  assert set(neurons.neuron_tokens(model, 2, 8, k=6).top[kind][0]) != set(
    got.top[kind][0]
  )


def test_neuron_edits_change_generation_only_when_the_factor_differs(model):
  out = neurons.compare_neuron_edits(
    model,
    [[2, 40, 41, 42]],
    3,
    5,
    factors={"a": 1.0, "b": 1.0, "boost": 60.0},
    max_new_tokens=8,
  )
  np.testing.assert_array_equal(out["a"], out["b"])
  assert not np.array_equal(out["a"], out["boost"])


# --- Attention ----------------------------------------------------------------------


def _brute_force(pattern, tokens, target):
  """Mean mass on target keys over queries with at least one target."""
  layers, batch, heads = pattern.shape[:3]
  seq = tokens.shape[1]
  out = np.zeros((layers, heads))
  count = 0
  for b in range(batch):
    for q in range(seq):
      keys = [j for j in range(seq) if target(tokens[b], q, j)]
      if keys:
        count += 1
        out += sum(pattern[:, b, :, q, j] for j in keys)
  return out / count


def test_head_scores_match_brute_force_loops(model):
  ids = np.array([[2, 7, 8, 9, 7, 8, 9, 7, 10, 8], [2, 5, 5, 6, 5, 6, 11, 12, 6, 5]])
  pattern = attn.attention_patterns(model, ids)
  ref = reference_forward(FIXTURE, ids)
  np.testing.assert_allclose(
    pattern[1], ref["attn.pattern", 1].transpose(0, 2, 1, 3), atol=1e-5
  )
  cases = {
    attn.previous_token_scores: lambda t, q, j: j == q - 1,
    attn.duplicate_token_scores: lambda t, q, j: j < q and t[j] == t[q],
    attn.induction_token_scores: lambda t, q, j: 1 <= j <= q and t[j - 1] == t[q],
  }
  for score, target in cases.items():
    np.testing.assert_allclose(
      score(pattern, ids), _brute_force(pattern, ids, target), atol=1e-6
    )


def test_induction_scores_read_the_diagonal_of_the_repeat(model):
  result = attn.induction_scores(model, length=6, batch=2, seed=3)
  tokens = result.tokens
  assert tokens.shape == (2, 13) and (tokens[:, 1:7] == tokens[:, 7:]).all()
  pattern = attn.attention_patterns(model, tokens)
  expected = np.mean([pattern[:, :, :, q, q - 5] for q in range(7, 13)], axis=(0, 2))
  np.testing.assert_allclose(result.scores, expected, atol=1e-6)
  best = result.best_heads(1)[0]
  assert best[2] == result.scores.max()


def test_token_losses_and_knockout_losses(model):
  ids = attn.repeated_tokens(512, 5, batch=2, seed=1)
  logits = reference_forward(FIXTURE, ids)["logits"]
  logp = np.log(_softmax(logits))
  expected = -np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
  np.testing.assert_allclose(attn.token_losses(model, ids), expected, atol=1e-4)
  out = attn.knockout_losses(model, [(1, 0), (3, 2)], ids, 5)
  knocked = iv.knock_out_heads(iv.knock_out_heads(model, [1], [0]), [3], [2])
  second = attn.repeat_losses(attn.token_losses(knocked, ids), 5)[1]
  assert out["knocked_out"] == pytest.approx(second, abs=1e-6)
  assert out["increase"] == pytest.approx(out["knocked_out"] - out["clean"])
  assert out["increase"] != 0.0


# --- Activation patching ----------------------------------------------------------


CLEAN = np.array([[2, 30, 31, 32, 33, 34, 35, 36]], np.int32)
CORRUPT = CLEAN.copy()
CORRUPT[0, 3] = 200
METRIC = patching.logit_difference(40, 41)


def _one_patch(model, site, layer, clean_value, at=-1, **where):
  patched = iv.patch(model, site, layer, clean_value, **where)
  logits = np.asarray(
    patched(gs.named_tokens(CORRUPT)).unwrap("batch", "seq", "vocabulary")
  )
  return logits[0, at, 40] - logits[0, at, 41]


@pytest.mark.parametrize(
  ("site", "by", "at"),
  [
    ("resid_post", "position", -1),
    ("resid_post", "position", 5),  # the metric reads a middle position
    ("attn.out", "position", -1),
    ("attn.z", "head", -1),
  ],
)
def test_batched_sweep_equals_one_patch_at_a_time(model, site, by, at):
  metric = patching.logit_difference(40, 41, position=at)
  result = patching.patching_sweep(
    model, CLEAN, CORRUPT, metric, site=site, by=by, chunk_size=5, progress=False
  )
  width = CLEAN.shape[1] if by == "position" else 4
  assert result.scores.shape == (4, width)
  captured, acts = gs.capture(model, site)
  captured(gs.named_tokens(CLEAN))
  for layer in (0, 2):
    for col in (0, 3, width - 1):
      where = {"positions": [col]} if by == "position" else {"heads": [col]}
      expected = _one_patch(model, site, layer, acts[site, layer], at, **where)
      assert result.scores[layer, col] == pytest.approx(expected, abs=1e-4)
  assert result.corrupted != pytest.approx(result.clean)


def test_sweep_controls_causality_and_full_restoration(model):
  result = patching.patching_sweep(
    model, CLEAN, CORRUPT, METRIC, chunk_size=64, progress=False
  )
  # Positions before the corrupted token carry identical activations.
  np.testing.assert_allclose(result.scores[:, :3], result.corrupted, atol=1e-5)
  # Patching the whole last residual at the last position restores the clean run.
  assert result.scores[-1, -1] == pytest.approx(result.clean, abs=1e-4)
  assert result.normalized[-1, -1] == pytest.approx(1.0, abs=1e-4)


# --- Bad inputs -----------------------------------------------------------------------


BAD = {
  "unequal prompt lengths": (
    lambda m: analysis.logit_lens(m, [[2, 5, 6], [2, 5]]),
    errors.InputError,
    "equal length",
  ),
  "k too large": (
    lambda m: analysis.logit_lens(m, [[2, 5]], k=513),
    errors.InputError,
    "1..512",
  ),
  "neuron out of range": (
    lambda m: neurons.neuron_tokens(m, 0, 128),
    errors.InputError,
    "0..127",
  ),
  "layer out of range": (
    lambda m: neurons.top_neurons(m, [[2, 5]], layers=[4]),
    errors.SiteError,
    "4",
  ),
  "head sweep at a residual site": (
    lambda m: patching.patching_sweep(m, CLEAN, CORRUPT, METRIC, by="head"),
    errors.SiteError,
    "head site",
  ),
  "prompts of different lengths": (
    lambda m: patching.patching_sweep(m, CLEAN, CLEAN[:, :5], METRIC),
    errors.InputError,
    "same length",
  ),
  "global site sweep": (
    lambda m: patching.patching_sweep(m, CLEAN, CORRUPT, METRIC, site="logits"),
    errors.SiteError,
    "per-layer",
  ),
  "metric position outside the prompt": (
    lambda m: patching.patching_sweep(
      m, CLEAN, CORRUPT, patching.logit_difference(40, 41, position=8)
    ),
    errors.InputError,
    "reads position 8",
  ),
  "token id outside vocabulary": (
    lambda m: attn.token_losses(m, [[2, 512]]),
    errors.InputError,
    "512",
  ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_raise_clear_errors(model, case):
  fn, error, text = BAD[case]
  with pytest.raises(error, match=text):
    fn(model)
