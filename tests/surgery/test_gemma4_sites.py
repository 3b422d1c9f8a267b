"""Sites and MoE surgery on Gemma 4, checked against `transformers`.

New sites are compared with the reference's own tensors (router logits and
top-k weights through a forward hook, per-layer inputs from
``project_per_layer_inputs``); expert ablation equals the reference with that
expert's ``per_expert_scale`` set to 0; KV-cached generation equals uncached
greedy decoding with a steering vector, a capture and an expert ablation in
place; KV-shared layers hold no cache of their own.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import gemma4 as g4  # noqa: E402

import gemma_surgery as gs  # noqa: E402
from gemma_surgery import errors  # noqa: E402
from gemma_surgery.generation.api import greedy_generate  # noqa: E402
from gemma_surgery.model import caching, gemma4  # noqa: E402
from gemma_surgery.surgery import sites  # noqa: E402


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gemma4_sites")
  reference = g4.write_checkpoint(directory, **g4.ALL_FEATURES)
  lm = gs.load(directory, dtype="float32", progress=False)
  return reference, lm.model, g4.tokens(2, 10, seed=4)


def _named(tokens):
  return pz.nx.wrap(jnp.asarray(tokens)).tag("batch", "seq")


def test_every_site_resolves_on_gemma4(pair):
  _, model, tokens = pair
  shared = [i for i in range(6) if model.config.is_kv_shared(i)]
  for site, info in {**sites.SITES, **sites.GEMMA4_SITES}.items():
    if not info.per_layer:
      assert sites.select(model, site).count() == 1
      continue
    if site in ("attn.k", "attn.v"):
      with pytest.raises(errors.SiteError, match="KV-shared"):
        sites.select(model, site, shared[0])
      layers = [i for i in range(6) if i not in shared]
    else:
      layers = None
    assert sites.select(model, site, layers).count() == len(layers or range(6))
  patched, acts = gs.capture(model, ["moe.expert_out", "per_layer.input"])
  patched(_named(tokens))
  assert acts["moe.expert_out", 2].named_shape == {
    "batch": 2,
    "seq": 10,
    "experts": 4,
    "embedding": 64,
  }


def test_router_and_per_layer_sites_match_transformers(pair):
  reference, model, tokens = pair
  seen = {}
  hook = reference.model.layers[3].router.register_forward_hook(
    lambda _m, _i, out: seen.update(probs=out[0], weights=out[1], index=out[2])
  )
  logits_hook = reference.model.layers[3].router.proj.register_forward_hook(
    lambda _m, _i, out: seen.update(logits=out)
  )
  ids = torch.from_numpy(tokens).long()
  with torch.no_grad():
    reference(ids)
    embeds = reference.model.embed_tokens(ids)
    per_layer = reference.model.project_per_layer_inputs(
      embeds, reference.model.get_per_layer_inputs(ids, embeds)
    ).numpy()
  hook.remove()
  logits_hook.remove()
  dense = np.zeros((20, 4), np.float32)
  np.put_along_axis(dense, seen["index"].numpy(), seen["weights"].numpy(), axis=1)

  patched, acts = gs.capture(
    model, ["moe.router_logits", "moe.weights", "per_layer.input"], [3]
  )
  patched(_named(tokens))
  got = acts["moe.router_logits", 3].unwrap("batch", "seq", "experts")
  np.testing.assert_allclose(got.reshape(20, 4), seen["logits"].numpy(), atol=1e-5)
  got = acts["moe.weights", 3].unwrap("batch", "seq", "experts")
  np.testing.assert_allclose(got.reshape(20, 4), dense, atol=1e-5)
  got = acts["per_layer.input", 3].unwrap("batch", "seq", "per_layer")
  np.testing.assert_allclose(got, per_layer[:, :, 3], atol=1e-5)


def test_expert_ablation_equals_zero_per_expert_scale(pair):
  reference, model, tokens = pair
  ablated = gs.ablate_experts(model, [1, 4], [2])
  with torch.no_grad():
    for layer in (1, 4):
      reference.model.layers[layer].router.per_expert_scale[2] = 0.0
    expected = g4.torch_logits(reference, tokens)
    for layer in (1, 4):
      reference.model.layers[layer].router.per_expert_scale[2] = 1.0
  assert np.abs(g4.logits(model, tokens) - expected).max() > 1e-2  # it matters
  np.testing.assert_allclose(g4.logits(ablated, tokens), expected, atol=1e-4)
  restored = g4.logits(gs.unpatch(ablated), tokens)
  np.testing.assert_array_equal(restored, g4.logits(model, tokens))


def test_forced_routing_uses_only_the_chosen_experts(pair):
  _, model, tokens = pair
  forced = gs.force_routing(model, 0, [0, 3])
  patched, acts = gs.capture(forced, "moe.weights", 0)
  patched(_named(tokens))
  weights = acts["moe.weights", 0].unwrap("batch", "seq", "experts")
  assert np.all(weights[..., [1, 2]] == 0) and np.all(weights[..., [0, 3]] > 0)


def test_bad_expert_indices_are_typed_errors(pair):
  _, model, _ = pair
  for bad in (4, -1, [0, 0], [], 1.0, True):
    with pytest.raises(errors.SurgeryError):
      gs.ablate_experts(model, 0, bad)
  with pytest.raises(errors.SurgeryError, match="0..3"):
    gs.force_routing(model, 0, [9])
  dense = gs.load("tiny").model
  with pytest.raises(errors.SiteError, match="mixture-of-experts"):
    gs.ablate_experts(dense, 0, 0)


def test_cached_generation_equals_uncached_with_edits(pair):
  _, model, _ = pair
  vector = pz.nx.wrap(
    jnp.asarray(np.random.default_rng(0).normal(size=64), jnp.float32)
  )
  edited = gs.steer(model, "resid_post", 2, vector.tag("embedding"), 2.0)
  edited = gs.ablate_experts(edited, None, [1])
  edited, _ = gs.capture(edited, "moe.weights", 4)
  prompt = g4.tokens(2, 6, seed=8)
  cached = greedy_generate(edited, prompt, max_new_tokens=32)
  np.testing.assert_array_equal(cached, g4.greedy_uncached(edited, prompt, 32))
  plain = greedy_generate(model, prompt, max_new_tokens=32)
  assert (plain != cached).any()  # the edits change the continuation


def test_kv_shared_layers_allocate_no_cache(pair):
  _, model, _ = pair
  cached = caching.kv_caching_lm(model, cache_len=16, batch_axes={"batch": 1})
  attns = (
    pz.select(cached.body)
    .at_instances_of(pz.nn.KVCachingAttention | gemma4.SharedKVCachingAttention)
    .get_sequence()
  )
  own = [a for a in attns if isinstance(a, pz.nn.KVCachingAttention)]
  assert len(own) == 4  # layers 0-3; 4 (local) reuses 3, 5 (global) reuses 2
  variables = {id(v) for v in pz.unbind_state_vars(cached)[1]}
  assert len([a for a in attns]) == 6
  assert attns[4].kv_cache is own[3].kv_cache
  assert attns[5].kv_cache is own[2].kv_cache
  cache_vars = {id(a.kv_cache) for a in attns}
  assert len(cache_vars) == 4 and cache_vars <= variables
  global_key = own[2].kv_cache.value[0]
  assert global_key.named_shape["projection"] == 32
  assert own[0].kv_cache.value[0].named_shape["projection"] == 16
