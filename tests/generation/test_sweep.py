"""Per-row edits and sweeps: one batch of N edits == N single-row runs.

The embedded model and its SAE; each batched row is compared with a separate
`gs.generate` of that row's prompt under that row's edit (tokens identical,
logits within 1e-5 of the same batch shape), and the sweep compiles the
decode loop exactly once.

Why the batch-1 comparison needs a term proportional to the logits (1e-5 +
2e-6 * max|logit|, not a flat 1e-5): XLA:CPU picks another float32 reduction
order for a batch of 1 (a matrix-vector product) than for a batch of several
rows. Measured (2026-12-05, jax on this CPU): a single jitted ``[n, 256] @
[256, 4096]`` matmul differs by 2.4e-6 (outputs up to 6) between n = 1 and n
= 2, 4 or 16, and neither is the more accurate one (3.1e-6 and 2.2e-6 from
float64). Through the embedded model's 6 layers the unedited forward pass of
one prompt differs by 2.3e-5 .. 3.5e-5 between batch 1 and batches of 2 .. 16
(logits up to 27: 1.3e-6 relative), and a 3-scale x 2-prompt steering sweep
by 1.2e-5 .. 3.2e-5 from its batch-1 runs (logits 12 .. 32). So a flat 1e-5
fails with the edits or without them; the edits add nothing beyond the batch
shape's roundoff: against a reference of the same batch shape (the row's
edit applied to every row) every row agrees to a flat 1e-5.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.generation import decoding

PROMPTS = ["The cat sat on", "Once upon a time there"]
NEW = 6


@pytest.fixture(scope="module")
def lm():
  return gs.load("tiny", progress=False)


@pytest.fixture(scope="module")
def sae():
  return gs.sae.load_sae("tiny")


def _vector(seed=0):
  rng = np.random.default_rng(seed)
  return pz.nx.wrap(jnp.asarray(rng.standard_normal(256), jnp.float32)).tag("embedding")


def _logits(result):
  return np.asarray(result.logits.unwrap("batch", "seq", "vocabulary"))


def _check_rows(out, edit, lm):
  """Every sweep row equals its edit run alone.

  Two references: (a) the same batch of prompts with that row's edit applied
  to every row (same shapes: must agree to 1e-5), (b) a single-row run of that
  row's prompt (tokens identical; logits to 1e-5 plus the float32 roundoff of
  another batch shape, ~1e-6 relative, which the unedited model shows too,
  see test_batch_shape_roundoff_is_not_from_edits).
  """
  tok, n_prompts = lm.tokenizer, len(out.coords["prompt"])
  mine = _logits(out.result)
  rows = list(out.coords["prompt"]) * (len(mine) // n_prompts)
  names = out.axes[:-1]
  for point in np.ndindex(out.shape[:-1]):
    values = {a: out.coords[a][i] for a, i in zip(names, point, strict=True)}
    model = edit(lm.model, **values)
    uniform = gs.generate(
      model, rows, max_new_tokens=NEW, tokenizer=tok, return_logits=True
    )
    for p, prompt in enumerate(out.coords["prompt"]):
      r = out.row(**values, prompt=p)
      np.testing.assert_array_equal(out.result.tokens[r], uniform.tokens[r])
      np.testing.assert_allclose(mine[r], _logits(uniform)[r], atol=1e-5, rtol=0)
      alone = gs.generate(
        model, [prompt], max_new_tokens=NEW, tokenizer=tok, return_logits=True
      )
      np.testing.assert_array_equal(out.result.tokens[r], alone.tokens[0])
      roundoff = 1e-5 + 2e-6 * np.abs(mine[r]).max()
      np.testing.assert_allclose(mine[r], _logits(alone)[0], atol=roundoff, rtol=0)


def test_batch_shape_roundoff_is_not_from_edits(lm):
  """The unedited model: one row alone vs the same row in a batch of 4."""
  one = gs.generate(
    lm.model,
    PROMPTS[1:],
    max_new_tokens=NEW,
    return_logits=True,
    tokenizer=lm.tokenizer,
  )
  four = gs.generate(
    lm.model,
    PROMPTS[1:] * 4,
    max_new_tokens=NEW,
    return_logits=True,
    tokenizer=lm.tokenizer,
  )
  diff = np.abs(_logits(one)[0] - _logits(four)[3])
  assert diff.max() < 2e-6 * np.abs(_logits(one)).max() + 1e-5


def test_scale_sweep_equals_separate_runs_with_one_compile(lm):
  vector = _vector()

  def edit(model, scale):
    return gs.steer(model, "resid_post", 2, vector, scale)

  scales = [-16.0, 0.0, 16.0]
  before = decoding.trace_count()
  out = gs.sweep(
    lm.model,
    edit,
    PROMPTS,
    grid={"scale": scales},
    max_new_tokens=NEW,
    tokenizer=lm.tokenizer,
    return_logits=True,
  )
  assert decoding.trace_count() - before == 1
  assert out.shape == (3, 2) and out.tokens.shape == (3, 2, NEW)
  # Negative control: the scales change the continuation.
  assert len({tuple(out.tokens[i, 0]) for i in range(3)}) > 1
  _check_rows(out, edit, lm)
  # Other values of the same grid shape: no new compilation.
  before = decoding.trace_count()
  again = gs.sweep(
    lm.model,
    edit,
    PROMPTS,
    grid={"scale": [s / 2 for s in scales]},
    max_new_tokens=NEW,
    tokenizer=lm.tokenizer,
    return_logits=True,
  )
  assert decoding.trace_count() == before
  assert np.abs(_logits(again.result) - _logits(out.result)).max() > 1.0
  assert out.get(scale=0.0, prompt=1)["text"] == out.text[1, 1]
  assert out.row(scale=16.0, prompt=1) == 5
