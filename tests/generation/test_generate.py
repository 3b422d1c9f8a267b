"""`gs.generate`: parity with Penzai's loop, sampling, EOS, batching, recompiles.

Most tests share one patched model (steering at ``resid_post[1]`` plus
captures) and one batch shape, so they share compilations.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import compiles
from helpers.generation import NEW, STRINGS, load, patched, tokenizer
from penzai import pz
from penzai.models.transformer import sampling_mode, simple_decoding_loop
from penzai.toolshed import jit_wrapper

import gemma_surgery as gs
from gemma_surgery.generation import decoding, prepared, sampling
from gemma_surgery.generation import inputs as generation_inputs


@pytest.fixture(scope="module")
def rows():
  return tokenizer().encode(STRINGS)


@pytest.fixture(scope="module")
def base():
  return load()


@pytest.fixture(scope="module")
def model(base):
  return patched(base)


@pytest.fixture(scope="module")
def greedy(model, rows):
  return gs.generate(model[0], rows, max_new_tokens=NEW, captures=model[1])


def _pyloop(model, acts, rows, seed, temperature):
  """Penzai's temperature_sample_pyloop with a jitted body, same padding."""
  for variable in acts.variables():
    variable.value = None  # as in a fresh model: no extra retrace
  ids = generation_inputs.prompt_array(rows, 512, 0, None)
  cached = sampling_mode.KVCachingTransformerLM.from_uncached(
    model, cache_len=ids.shape[1] + NEW, batch_axes={"batch": len(rows)}, pad_id=-1
  )
  sampler = pz.select(cached).at(lambda c: c.body).apply(jit_wrapper.Jitted)
  out = simple_decoding_loop.temperature_sample_pyloop(
    sampler,
    prompt=pz.nx.wrap(jnp.asarray(ids)).tag("batch", "seq"),
    rng=jax.random.key(seed),
    temperature=temperature,
    max_sampling_steps=NEW,
  )
  return np.asarray(out.unwrap("batch", "seq"))


def test_greedy_matches_penzai_pyloop_on_patched_model(model, rows, greedy):
  """Rows of different lengths; pyloop at T=1e-6 is greedy."""
  np.testing.assert_array_equal(greedy.tokens, _pyloop(*model, rows, 0, 1e-6))


def test_seeded_sampling_matches_penzai_pyloop(model, rows):
  """Same per-step keys as Penzai's loop: identical samples."""
  ours = gs.generate(model[0], rows, max_new_tokens=NEW, temperature=0.9, seed=3)
  np.testing.assert_array_equal(ours.tokens, _pyloop(*model, rows, 3, 0.9))


@contextlib.contextmanager
def count_compiles():
  """Counts XLA backend compilations and traces of the decode loop."""
  traces = decoding.trace_count()
  with compiles.count_compiles() as counts:
    counts["traces"] = traces
    try:
      yield counts
    finally:
      counts["traces"] = decoding.trace_count() - traces


def test_new_steering_values_do_not_recompile(base, rows, greedy):
  """Scale and vector are leaves; another layer is a new structure."""
  model, _ = patched(base, scale=-6.0, seed=1)  # a new model object
  with count_compiles() as same:
    other = gs.generate(model, rows, max_new_tokens=NEW)
  assert same == {"compiles": 0, "traces": 0}
  assert (other.tokens != greedy.tokens).any()  # the new values took effect
  restructured = gs.steer(
    model, "mlp.out", 0, pz.nx.wrap(jnp.ones(64)).tag("embedding")
  )
  with count_compiles() as new:
    gs.generate(restructured, rows, max_new_tokens=NEW)
  assert new["traces"] == 1 and new["compiles"] >= 1


def test_sampling_controls(model, rows, greedy):
  """top-k 1 and tiny top-p are greedy; seeds reproduce; T never recompiles."""

  def run(**kw):
    return gs.generate(model[0], rows, max_new_tokens=NEW, **kw).tokens

  np.testing.assert_array_equal(run(temperature=1.0, top_k=1), greedy.tokens)
  with count_compiles() as counts:
    np.testing.assert_array_equal(run(temperature=2.0, top_p=1e-6), greedy.tokens)
    np.testing.assert_array_equal(
      run(temperature=0.5, top_k=40, top_p=0.9, seed=4),
      run(temperature=0.5, top_k=40, top_p=0.9, seed=4),
    )
  assert counts == {"compiles": 0, "traces": 0}
  a = run(temperature=1.0, seed=1)
  with count_compiles() as counts:
    np.testing.assert_array_equal(run(temperature=1.0, seed=1), a)
    assert (run(temperature=1.0, seed=2) != a).any()
    run(temperature=1.7, seed=1)
  assert counts == {"compiles": 0, "traces": 0}


def test_filter_logits_keeps_top_k_and_the_nucleus():
  probs = np.array([0.05, 0.5, 0.15, 0.3])  # ranks: 1, 3, 2, 0 -> order 1, 3, 2, 0
  logits = jnp.log(jnp.asarray(probs, jnp.float32))

  def kept(top_k=4, top_p=2.0):
    out = sampling.filter_logits(logits, jnp.int32(top_k), jnp.float32(top_p))
    return set(np.flatnonzero(np.isfinite(np.asarray(out))).tolist())

  assert kept() == {0, 1, 2, 3}
  assert kept(top_k=2) == {1, 3}
  assert kept(top_p=0.5) == {1}  # 0.5 alone reaches 0.5
  assert kept(top_p=0.79) == {1, 3}  # 0.5 + 0.3 = 0.8 >= 0.79
  assert kept(top_p=0.81) == {1, 3, 2}
  assert kept(top_p=1e-9) == {1}  # always at least one token
  assert kept(top_k=3, top_p=0.99) == {1, 3, 2}
  # Top-p acts on the top-k renormalized distribution: 0.5/0.8 = 0.625.
  assert kept(top_k=2, top_p=0.6) == {1}
  assert kept(top_k=2, top_p=0.63) == {1, 3}


def test_sampled_frequencies_follow_the_filtered_distribution():
  probs = np.array([0.05, 0.5, 0.15, 0.3], np.float32)
  logits = pz.nx.wrap(jnp.log(jnp.tile(probs, (4000, 1)))).tag("batch", "vocabulary")
  mode = sampling.SamplingMode(greedy=False, filtered=True)
  choose = jax.jit(
    lambda logits, key: sampling.choose_tokens(
      logits,
      key,
      mode,
      temperature=jnp.float32(1.0),
      top_k=jnp.int32(4),
      top_p=jnp.float32(0.75),
      batch_axes={"batch": 4000},
    )
  )
  tokens, _ = choose(logits, jax.random.key(0))
  counts = np.bincount(np.asarray(tokens.unwrap("batch")), minlength=4) / 4000
  np.testing.assert_allclose(counts, [0, 0.5 / 0.8, 0, 0.3 / 0.8], atol=0.03)


def test_prepared_models_are_forgotten_with_their_model(base):
  """The conversion cache holds models weakly (no compile involved)."""
  import gc

  model = gs.steer(base, "resid_post", 0, pz.nx.wrap(jnp.ones(64)).tag("embedding"))
  before = len(prepared._CACHE)
  decoding.prepare(model, 1, 8, None, None)
  assert len(prepared._CACHE) == min(before + 1, prepared._CACHE_SIZE)
  entry = decoding.prepare(model, 1, 8, None, None)[0]
  del model
  gc.collect()
  assert entry not in prepared._CACHE.values()
