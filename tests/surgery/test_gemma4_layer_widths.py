"""Neuron and head-width edits at Gemma 4 layers whose sizes differ.

Gemma 4's KV-shared layers have double-wide MLPs and its global layers wider
heads, so ``neurons`` and ``projection`` sizes belong to a layer. Edits, SAEs
and top-k captures at a layer must take that layer's sizes; edits spanning
layers of different sizes must be refused by name. The reference for neuron
edits is transformers' `Gemma4ForCausalLM` with the same change made to its
``down_proj`` weights (zeroing or scaling hidden neuron ``n`` is scaling
column ``n`` of it).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from helpers import gemma4 as g4  # noqa: E402
from helpers import sae_writers as W  # noqa: E402

import gemma_surgery as gs  # noqa: E402
from gemma_surgery import errors  # noqa: E402
from gemma_surgery.sae.autoencoders import AutoEncoder, SAEInfo  # noqa: E402

# ALL_FEATURES: 6 layers; 4 and 5 reuse keys/values with MLPs of 2 x 96;
# head_dim 16 on local layers, 32 on the global ones (2 and 5).
WIDE, BASE = 4, 0


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
  directory = tmp_path_factory.mktemp("gemma4_widths")
  reference = g4.write_checkpoint(directory, seed=7, **g4.ALL_FEATURES)
  lm = gs.load(directory, dtype="float32", progress=False)
  assert lm.config.layer_mlp_dim(WIDE) == 2 * lm.config.layer_mlp_dim(BASE) == 192
  return reference, lm.model, g4.tokens(2, 8, seed=1)


def _torch_logits_with_column(reference, layer, neuron, factor, tokens):
  weight = reference.model.layers[layer].mlp.down_proj.weight
  with torch.no_grad():
    saved = weight[:, neuron].clone()
    weight[:, neuron] *= factor
    out = g4.torch_logits(reference, tokens)
    weight[:, neuron] = saved
  return out


@pytest.mark.parametrize("factor", [0.0, 3.0])
def test_neuron_edits_past_the_base_width_match_transformers(pair, factor):
  reference, model, tokens = pair
  neuron = 150  # only layers 4 and 5 have it
  if factor == 0.0:
    edited = gs.interventions.ablate(model, "mlp.hidden", WIDE, neurons=[neuron])
  else:
    edited = gs.interventions.scale_neurons(model, WIDE, [neuron], factor)
  expected = _torch_logits_with_column(reference, WIDE, neuron, factor, tokens)
  assert np.abs(g4.logits(model, tokens) - expected).max() > 1e-3  # it matters
  np.testing.assert_allclose(g4.logits(edited, tokens), expected, atol=1e-4)


def test_layer_sizes_bound_indices_and_values(pair):
  _, model, _ = pair
  with pytest.raises(errors.SurgeryError, match=r"valid: 0\.\.95"):
    gs.interventions.ablate(model, "mlp.hidden", BASE, neurons=[150])
  # Layers of different widths at once: refused, naming both sizes.
  with pytest.raises(errors.SurgeryError, match="96 at layers .*192 at layers"):
    gs.interventions.ablate(model, "mlp.hidden", [BASE, WIDE], neurons=[3])
  with pytest.raises(errors.SurgeryError, match="layers differ"):
    gs.interventions.scale_neurons(model, None, [3], 2.0)
  # Without indices or values the sizes don't matter: all layers are fine.
  gs.interventions.ablate(model, "mlp.hidden", None)
  # A steering vector has its layer's sizes: 192 neurons at layer 4, 32-wide
  # heads at global layer 2, 16-wide at local layer 0.
  wide = pz.nx.wrap(jnp.ones(192)).tag("neurons")
  gs.steer(model, "mlp.hidden", WIDE, wide)
  with pytest.raises(errors.SurgeryError, match="neurons=96"):
    gs.steer(model, "mlp.hidden", BASE, wide)
  z = pz.nx.wrap(jnp.ones((4, 32))).tag("heads", "projection")
  gs.steer(model, "attn.z", 2, z)
  with pytest.raises(errors.SurgeryError, match="projection=16"):
    gs.steer(model, "attn.z", BASE, z)
  with pytest.raises(errors.SurgeryError, match="projection size"):
    gs.steer(model, "attn.z", [BASE, 2], z)


def test_neuron_tokens_takes_the_layers_width(pair):
  _, model, _ = pair
  out = gs.analysis.neuron_tokens(model, WIDE, 150, k=3)
  assert len(out.top["down"][0]) == 3
  with pytest.raises(errors.InputError, match=r"0\.\.95"):
    gs.analysis.neuron_tokens(model, BASE, 150, k=3)


def _attn_sae(layer: int, d_in: int) -> AutoEncoder:
  info = SAEInfo(family="att", layer=layer, site="attn.z", d_in=d_in, width=8)
  return AutoEncoder.from_arrays(W.random_sae(3, d_in=d_in, width=8), info)


def test_attn_sae_takes_the_layers_head_width(pair):
  _, model, tokens = pair
  # Global layer 2: 4 heads x 32 = 128 inputs; local layer 0: 4 x 16 = 64.
  wide = _attn_sae(2, 128)
  spliced = gs.sae.splice_sae(model, wide, use_error_term=True)
  np.testing.assert_allclose(
    g4.logits(spliced, tokens), g4.logits(model, tokens), atol=1e-4
  )
  with pytest.raises(errors.SAEError, match="size is 64, but site 'attn.z'.* 128"):
    gs.sae.splice_sae(model, _attn_sae(2, 64))
  with pytest.raises(errors.SAEError, match="size is 128, but site 'attn.z'.* 64"):
    gs.sae.splice_sae(model, _attn_sae(BASE, 128))
  # Steering with a feature reshapes its row with the layer's own head width:
  # the same as steering with the row as {heads: 4, projection: 32}.
  row = np.asarray(wide.w_dec.value.unwrap("latents", "embedding"))[5]
  by_feature = gs.sae.steer_with_feature(model, wide, 5, 2.0)
  by_hand = gs.steer(
    model,
    "attn.z",
    2,
    pz.nx.wrap(jnp.asarray(2.0 * row).reshape(4, 32)).tag("heads", "projection"),
  )
  steered = g4.logits(by_feature, tokens)
  assert np.abs(steered - g4.logits(model, tokens)).max() > 1e-3  # it matters
  np.testing.assert_allclose(steered, g4.logits(by_hand, tokens), atol=1e-5)


def test_topk_bound_is_the_layers_width(pair):
  _, model, _ = pair
  gs.interventions.capture_topk(model, "mlp.hidden", WIDE, k=150)
  with pytest.raises(errors.SurgeryError, match=r"1\.\.96"):
    gs.interventions.capture_topk(model, "mlp.hidden", BASE, k=150)
  with pytest.raises(errors.SurgeryError, match=r"1\.\.96"):
    gs.interventions.capture_topk(model, "mlp.hidden", [BASE, WIDE], k=150)
