"""Analyses refuse inputs that would give silently wrong answers; named results.

* token ids of a `logit_difference` outside the vocabulary (JAX would clamp);
* a pattern scored with tokens it wasn't computed on (scores above 1, numpy
  broadcast errors);
* random-token draws that include control and byte pieces;
* every result's arrays carry their axis names (``named()`` / ``named=True``).
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from helpers.paths import HF_FIXTURES, TOKENIZER_FIXTURE
from penzai import pz

import gemma_surgery as gs
from gemma_surgery import analysis, errors
from gemma_surgery.analysis import attention as attn
from gemma_surgery.analysis import patching

FIXTURE = HF_FIXTURES / "gemma2"  # vocabulary 512, 4 layers, 4 heads
VOCAB = 512
CLEAN = np.array([[2, 30, 31, 32, 33, 34, 35, 36]], np.int32)
CORRUPT = CLEAN.copy()
CORRUPT[0, 3] = 200


@pytest.fixture(scope="module")
def model():
  return gs.load(FIXTURE, dtype="float32", progress=False).model


@pytest.fixture(scope="module")
def logits(model):
  return model(gs.named_tokens(CLEAN))


@pytest.fixture(scope="module")
def tok():
  return gs.GemmaTokenizer.from_file(TOKENIZER_FIXTURE)


# --- 1. logit_difference ids ------------------------------------------------------


@pytest.mark.parametrize("bad", [VOCAB, VOCAB + 7])
def test_logit_difference_ids_beyond_the_vocabulary_are_refused(model, logits, bad):
  metric = analysis.logit_difference(bad, 41)
  # Clamped, id 512 read exactly the logit of 511: that answer can't come back.
  with pytest.raises(errors.InputError, match=rf"correct={bad}.*0\.\.{VOCAB - 1}"):
    metric(logits)
  with pytest.raises(errors.InputError, match=rf"correct={bad}.*0\.\.{VOCAB - 1}"):
    jax.jit(metric)(logits)
  with pytest.raises(errors.InputError, match=rf"correct={bad}.*0\.\.{VOCAB - 1}"):
    patching.patching_sweep(model, CLEAN, CORRUPT, metric, progress=False)
  raw = np.asarray(logits.unwrap("batch", "seq", "vocabulary"))
  good = analysis.logit_difference(VOCAB - 1, 41)(logits)
  np.testing.assert_allclose(good, raw[:, -1, VOCAB - 1] - raw[:, -1, 41], rtol=1e-6)


@pytest.mark.parametrize(
  ("args", "text"),
  [
    ((-1, 41), "correct=-1 is a negative token id"),
    ((40, -3), "wrong=-3 is a negative token id"),
    ((40.7, 41), "correct=40.7 must be an int"),
    ((40, 41, 1.5), "position=1.5 must be an int"),
    ((True, 41), "correct=True must be an int"),
  ],
)
def test_logit_difference_refuses_negative_or_non_integer_ids(args, text):
  with pytest.raises(errors.InputError, match=text):
    analysis.logit_difference(*args)
  with pytest.raises(errors.InputError, match=text):
    patching.LogitDifference(*args)


def test_metrics_must_return_one_value_per_row(model):
  def mean_metric(logits):
    return logits[{"seq": -1}].unwrap("batch", "vocabulary")[:, 40].mean()

  with pytest.raises(errors.InputError, match=r"one value per batch row.*shape \(\)"):
    patching.patching_sweep(model, CLEAN, CORRUPT, mean_metric, progress=False)


# --- 5, 13. pattern and tokens belong together ----------------------------------

SCORES = [
  attn.previous_token_scores,
  attn.duplicate_token_scores,
  attn.induction_token_scores,
]
IDS = np.array([[2, 7, 8, 9, 7, 8, 9, 7], [2, 5, 5, 6, 5, 6, 11, 6]], np.int32)


@pytest.fixture(scope="module")
def pattern(model):
  return attn.attention_patterns(model, IDS)


@pytest.mark.parametrize("score", SCORES, ids=lambda f: f.__name__)
def test_scores_refuse_tokens_of_another_batch_or_length(pattern, score):
  # One row of tokens against a two-row pattern used to average over the
  # wrong count: scores up to 2, an impossible mean attention.
  with pytest.raises(errors.InputError, match=r"batch 2.*batch 1"):
    score(pattern, IDS[:1])
  with pytest.raises(errors.InputError, match=r"8 queries and 8 keys.*seq 5"):
    score(pattern, IDS[:, :5])
  with pytest.raises(errors.InputError, match="attention weights"):
    score(pattern * 2, IDS)
  with pytest.raises(errors.InputError, match=r"\[batch, seq\] integer ids"):
    score(pattern, IDS.astype(np.float32))
  values = score(pattern, IDS)
  assert values.shape == (4, 4) and 0 <= values.min() and values.max() <= 1


@pytest.mark.parametrize("score", SCORES, ids=lambda f: f.__name__)
def test_scores_take_and_give_named_arrays(model, pattern, score):
  named_pattern = attn.attention_patterns(model, IDS, named=True)
  assert named_pattern.named_shape == {
    "layer": 4,
    "batch": 2,
    "heads": 4,
    "seq": 8,
    "kv_seq": 8,
  }
  np.testing.assert_array_equal(named_pattern.unwrap(*attn.PATTERN_AXES), pattern)
  # Axis order doesn't matter for named input: names are matched.
  reordered = named_pattern.untag(*named_pattern.named_shape).tag(
    *named_pattern.named_shape
  )
  got = score(reordered, gs.named_tokens(IDS), named=True)
  assert got.named_shape == {"layer": 4, "heads": 4}
  np.testing.assert_allclose(got.unwrap("layer", "heads"), score(pattern, IDS))
  wrong = pz.nx.wrap(np.asarray(pattern)).tag("a", "b", "c", "d", "e")
  with pytest.raises(errors.InputError, match="expected a NamedArray with axes"):
    score(wrong, IDS)


def test_repeat_lengths_must_fit_the_tokens(model):
  ids = attn.repeated_tokens(VOCAB, 5, batch=2)
  with pytest.raises(errors.InputError, match="length=6 but the tokens repeat 5"):
    attn.knockout_losses(model, [(0, 0)], ids, 6)
  with pytest.raises(errors.InputError, match=r"length=9 doesn't fit losses"):
    attn.repeat_losses(np.zeros((2, 10)), 9)
  with pytest.raises(errors.InputError, match=r"not \[BOS, r, r\]"):
    attn.induction_scores(model, tokens=CLEAN)


# --- 21. random tokens from ordinary pieces -----------------------------------------


def test_token_pool_skips_special_control_and_byte_pieces(tok):
  pool = analysis.token_pool(VOCAB, tokenizer=tok)
  sp = tok.sp
  kinds = (sp.is_control, sp.is_unknown, sp.is_unused, sp.is_byte)
  assert not [i for i in pool.tolist() if any(kind(i) for kind in kinds)]
  assert {tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id}.isdisjoint(pool.tolist())
  tags = [i for i in range(VOCAB) if re.fullmatch(r"<[^<>]+>", sp.id_to_piece(i))]
  assert tags and set(tags).isdisjoint(pool.tolist())  # <start_of_turn>...
  text = [i for i in range(VOCAB) if not any(kind(i) for kind in kinds)]
  assert 0.9 * len(text) < pool.size <= len(text)
  assert (np.diff(pool) > 0).all() and pool.max() < VOCAB


def test_induction_scores_draw_from_the_chosen_ids(model, tok):
  ordinary = set(analysis.token_pool(VOCAB, tokenizer=tok).tolist())
  drawn = attn.induction_scores(model, length=6, batch=3, tokenizer=tok)
  assert set(drawn.tokens[:, 1:].ravel().tolist()) <= ordinary
  assert (drawn.tokens[:, 0] == tok.bos_id).all()
  ranged = attn.induction_scores(model, length=6, batch=3, id_range=(100, 110))
  assert set(ranged.tokens[:, 1:].ravel().tolist()) <= set(range(100, 110))
  # Without either: the documented range 4..vocab − 1, seeded as before.
  plain = attn.induction_scores(model, length=6, batch=2, seed=5)
  expected = np.random.default_rng(5).integers(4, VOCAB, (2, 6))
  np.testing.assert_array_equal(plain.tokens[:, 1:7], expected)
  own = attn.induction_scores(model, tokens=drawn.tokens)
  assert own.length == 6
  np.testing.assert_allclose(own.scores, drawn.scores)
  assert 0 <= drawn.scores.min() and drawn.scores.max() <= 1


@pytest.mark.parametrize(
  ("kwargs", "text"),
  [
    ({"id_range": (100, 101)}, r"low \+ 2 <= high"),
    ({"id_range": (0, VOCAB + 1)}, "vocab_size=512"),
    ({"id_range": 7}, r"\(low, high\) pair"),
    ({"id_range": (4, 9), "tokenizer": "TOK"}, "not both"),
    ({"id_range": (4, 9), "tokens": CLEAN}, "tokens= replaces the random draw"),
  ],
)
def test_bad_draw_arguments(model, tok, kwargs, text):
  kwargs = {k: tok if isinstance(v, str) else v for k, v in kwargs.items()}
  with pytest.raises(errors.InputError, match=text):
    attn.induction_scores(model, length=4, **kwargs)


# --- 22. named results --------------------------------------------------------------


def _check_named(result, expected_axes):
  named = result.named()
  assert set(named) == set(expected_axes)
  for field, axes in expected_axes.items():
    value = named[field]
    assert isinstance(value, pz.nx.NamedArray)
    assert tuple(value.named_shape) == axes, field
    # JAX arrays: float64 fields arrive in float32 (without jax_enable_x64).
    np.testing.assert_allclose(value.unwrap(*axes), getattr(result, field), rtol=1e-6)


def test_every_result_names_its_axes(model, tok):
  ids = IDS[:, :5]
  _check_named(
    analysis.logit_lens(model, ids, k=3),
    {
      "tokens": ("batch", "seq"),
      "top_ids": ("stage", "batch", "seq", "top_k"),
      "top_probs": ("stage", "batch", "seq", "top_k"),
      "change": ("stage", "batch", "seq"),
      "final_ids": ("batch", "seq"),
    },
  )
  _check_named(
    analysis.top_neurons(model, ids, layers=[1, 3], k=2),
    {
      "tokens": ("batch", "seq"),
      "ids": ("layer", "batch", "seq", "top_k"),
      "values": ("layer", "batch", "seq", "top_k"),
    },
  )
  ind = attn.induction_scores(model, length=4, batch=2, tokenizer=tok)
  _check_named(ind, {"tokens": ("batch", "seq"), "scores": ("layer", "heads")})
  for by, axis in (("position", "seq"), ("head", "heads")):
    site = "resid_post" if by == "position" else "attn.z"
    sweep = patching.patching_sweep(
      model,
      CLEAN,
      CORRUPT,
      analysis.logit_difference(40, 41),
      site=site,
      by=by,
      layers=[0, 2],
      progress=False,
    )
    _check_named(sweep, {"scores": ("layer", axis)})
  proj = analysis.neuron_tokens(model, 1, 3, k=4)
  named = proj.named()
  for end in ("top", "bottom"):
    for i, what in enumerate(("ids", "logits")):
      value = named[f"{end}_{what}"]
      assert value.named_shape == {"kind": 3, "top_k": 4}
      for row, kind in enumerate(("gate", "up", "down")):
        got = np.asarray(value[{"kind": row}].unwrap("top_k"))
        np.testing.assert_array_equal(got, getattr(proj, end)[kind][i])
  losses = attn.token_losses(model, ids, named=True)
  assert losses.named_shape == {"batch": 2, "seq": 4}
  np.testing.assert_allclose(
    losses.unwrap("batch", "seq"), attn.token_losses(model, ids)
  )
  masked = attn.mask_bos(attn.attention_patterns(model, ids, named=True))
  assert set(masked.named_shape) == set(attn.PATTERN_AXES)
  np.testing.assert_allclose(
    masked.unwrap(*attn.PATTERN_AXES),
    attn.mask_bos(attn.attention_patterns(model, ids)),
  )
