"""The one-token decoding layers compute what Penzai's layers compute.

Each `decode_layers` layer is compared with the Penzai layer it replaces on
random inputs: one token (its fast form, equal within float32 rounding) and
several tokens (its fallback, bit for bit). The conversion puts them in every
cached attention layer and the unembedding, and the cache write lowers to no
scatter (Penzai's lowers to one: the negative control). A prompt's logits are
computed for its last position only unless something at the ``logits`` site
observes them (then for every position; the compiled loop's temporaries show
which).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.generation import decoding, sampling
from gemma_surgery.model import caching, decode_layers

QK = (
  (
    {"seq": "tq", "heads": "h", "projection": "p"},
    {"seq": "tkv", "heads": "h", "projection": "p"},
  ),
  {"seq": "tq", "heads": "h", "kv_seq": "tkv"},
)
AV = (
  (
    {"seq": "tq", "heads": "h", "kv_seq": "tkv"},
    {"seq": "tkv", "heads": "h", "projection": "p"},
  ),
  {"seq": "tq", "heads": "h", "projection": "p"},
)


def named(seed: int, dtype=jnp.float32, **shape) -> pz.nx.NamedArray:
  data = np.random.default_rng(seed).standard_normal(tuple(shape.values()))
  return pz.nx.wrap(jnp.asarray(data, dtype)).tag(*shape)


def same_values(a: pz.nx.NamedArray, b: pz.nx.NamedArray, exact: bool) -> None:
  assert dict(a.named_shape) == dict(b.named_shape)
  assert a.dtype == b.dtype
  names = tuple(a.named_shape)
  x, y = np.asarray(a.unwrap(*names)), np.asarray(b.unwrap(*names))
  if exact:
    np.testing.assert_array_equal(x, y)
  else:
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tq", [1, 3])
@pytest.mark.parametrize("spec", [QK, AV], ids=["scores", "values"])
def test_single_query_einsum_matches_named_einsum(spec, tq):
  inputs, output = spec
  shapes = {"tq": tq, "tkv": 7, "h": 3, "p": 5}
  arrays = tuple(
    named(i, batch=2, **{ax: shapes[ix] for ax, ix in axes.items()})
    for i, axes in enumerate(inputs)
  )
  ours = decode_layers.SingleQueryEinsum(input_axes=inputs, output_axes=output)
  penzai = pz.nn.NamedEinsum(input_axes=inputs, output_axes=output)
  same_values(ours(arrays), penzai(arrays), exact=tq > 1)


def test_single_query_einsum_promotes_like_einsum():
  inputs, output = QK
  query = named(0, batch=1, seq=1, heads=2, projection=4)
  keys = named(1, jnp.bfloat16, batch=1, seq=6, heads=2, projection=4)
  ours = decode_layers.SingleQueryEinsum(input_axes=inputs, output_axes=output)
  penzai = pz.nn.NamedEinsum(input_axes=inputs, output_axes=output)
  same_values(ours((query, keys)), penzai((query, keys)), exact=False)


@pytest.mark.parametrize("batch", [1, 2])
def test_single_token_embedding_decode_matches(batch):
  table = pz.nn.EmbeddingTable(
    embeddings=pz.Parameter(value=named(0, vocabulary=50, embedding=16), label="table"),
    vocabulary_axis="vocabulary",
  )
  x = named(1, batch=batch, seq=1, embedding=16)
  ours = decode_layers.SingleTokenEmbeddingDecode(table=table)
  same_values(ours(x), pz.nn.EmbeddingDecode(table)(x), exact=batch > 1)


def test_write_seq_matches_penzai_update():
  cache = named(0, batch=2, heads=3, seq=8, projection=4)
  new = named(1, batch=2, seq=1, heads=3, projection=4)
  penzai = pz.nx.nmap(jax.lax.dynamic_update_slice)(
    cache.untag("seq"), new.untag("seq"), (5,)
  ).tag("seq")
  same_values(decode_layers.write_seq(cache, new, "seq", 5), penzai, exact=True)


def test_cache_write_lowers_to_no_scatter():
  cache = named(0, batch=2, heads=3, seq=8, projection=4)
  new = named(1, batch=2, seq=1, heads=3, projection=4)

  def penzai(cache, new, end):
    update = pz.nx.nmap(jax.lax.dynamic_update_slice)
    return update(cache.untag("seq"), new.untag("seq"), (end,)).tag("seq")

  def ours(cache, new, end):
    return decode_layers.write_seq(cache, new, "seq", end)

  end = jnp.int32(2)
  assert "scatter" in jax.jit(penzai).lower(cache, new, end).as_text()
  assert "scatter" not in jax.jit(ours).lower(cache, new, end).as_text()


@pytest.fixture(scope="module")
def small_model():
  config = dataclasses.replace(
    gs.preset("gemma3_1b"),
    num_layers=2,
    embedding_dim=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    mlp_hidden_dim=48,
    vocab_size=64,
    attention_types=("local", "global"),
    sliding_window=4,
    query_pre_attn_scalar=8,
  )
  return gs.build_model(config, jax.random.key(0))


def test_conversion_uses_decode_layers(small_model):
  cached = caching.kv_caching_lm(small_model, cache_len=12, batch_axes={"batch": 1})
  attns = pz.select(cached).at_instances_of(pz.nn.KVCachingAttention).get_sequence()
  assert len(attns) == 2
  for attn in attns:
    assert isinstance(attn, decode_layers.InPlaceKVCachingAttention)
    einsums = pz.select(attn).at_instances_of(pz.nn.NamedEinsum).get_sequence()
    assert len(einsums) == 2
    assert all(isinstance(e, decode_layers.SingleQueryEinsum) for e in einsums)
    # Keys as Penzai lays them out, values seq-major (no transposes per step).
    keys, values = (list(a.named_shape) for a in attn.kv_cache.value)
    assert keys[-2:] == ["projection", "seq"]
    assert values[-2:] == ["seq", "projection"]
  decoders = pz.select(cached).at_instances_of(pz.nn.EmbeddingDecode).get_sequence()
  assert [type(d) for d in decoders] == [decode_layers.SingleTokenEmbeddingDecode]


def test_converted_steps_match_the_uncached_model(small_model):
  tokens = np.random.default_rng(0).integers(1, 64, (1, 6)).astype(np.int32)
  full = small_model(pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq"))
  cached = caching.kv_caching_lm(small_model, cache_len=8, batch_axes={"batch": 1})
  unbound, variables = pz.unbind_state_vars(cached)
  state = [v.freeze() for v in variables]
  prompt = pz.nx.wrap(jnp.asarray(tokens[:, :3])).tag("batch", "seq")
  logits, state = unbound.stateless_call(state, prompt)
  steps = [logits]
  for i in range(3, 6):
    token = pz.nx.wrap(jnp.asarray(tokens[:, i : i + 1])).tag("batch", "seq")
    logits, state = unbound.stateless_call(state, token)
    steps.append(logits)
  got = np.concatenate(
    [np.asarray(s.unwrap("batch", "seq", "vocabulary")) for s in steps], axis=1
  )
  # Nothing observes the logits: the prompt's come for its last position only.
  want = np.asarray(full.unwrap("batch", "seq", "vocabulary"))[:, 2:]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _prompt_logits(model, tokens, cache_len=8):
  cached = caching.kv_caching_lm(model, cache_len=cache_len, batch_axes={"batch": 1})
  unbound, variables = pz.unbind_state_vars(cached)
  prompt = pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq")
  logits, _ = unbound.stateless_call([v.freeze() for v in variables], prompt)
  return np.asarray(logits.unwrap("batch", "seq", "vocabulary"))


@pytest.mark.parametrize("observer", [None, "capture", "steer"])
def test_prompt_logits_are_kept_where_the_logits_are_observed(small_model, observer):
  tokens = np.random.default_rng(1).integers(1, 64, (1, 5)).astype(np.int32)
  model = small_model
  if observer == "capture":
    model, _ = gs.capture(small_model, "logits")
  elif observer == "steer":
    model = gs.steer(small_model, "logits", None, named(2, vocabulary=64), 0.5)
  full = np.asarray(
    model(pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq")).unwrap(
      "batch", "seq", "vocabulary"
    )
  )
  got = _prompt_logits(model, tokens)
  if observer is None:
    assert got.shape == (1, 1, 64)
    np.testing.assert_allclose(got, full[:, -1:], rtol=1e-5, atol=1e-5)
  else:  # the logits site sees every prompt position, edited or captured
    assert got.shape == (1, 5, 64)
    np.testing.assert_allclose(got, full, rtol=1e-5, atol=1e-5)


VOCAB = 16384


def test_prefill_does_not_hold_logits_for_every_prompt_position(small_model):
  """The compiled fused loop's temporaries: a 256-token prompt at a vocabulary
  of 16k holds 16 MiB of logits per row only where they are observed (the
  model's other temporaries are about 2 MiB)."""
  config = dataclasses.replace(small_model.config, vocab_size=VOCAB)
  base = gs.build_model(config, jax.random.key(0))
  prompt = np.ones((1, 256), np.int32)
  controls = {
    "eos": np.int32(-1),
    "pad": np.int32(0),
    "temperature": np.float32(1.0),
    "top_k": np.int32(VOCAB),
    "top_p": np.float32(2.0),
  }
  full_logits = 256 * VOCAB * 4

  def temp_bytes(model):
    prepared, leaves = decoding.prepare(model, 1, 260, None, None)
    args = (prepared.structure, leaves, prompt, np.array([256], np.int32))
    compiled = decoding.decode.lower(
      *args,
      controls,
      jax.random.key(0),
      max_new_tokens=4,
      mode=sampling.SamplingMode(greedy=True),
    ).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  assert temp_bytes(base) < full_logits / 4
  observed = gs.steer(base, "logits", None, named(2, vocabulary=VOCAB), 0.5)
  assert temp_bytes(observed) >= full_logits  # negative control
