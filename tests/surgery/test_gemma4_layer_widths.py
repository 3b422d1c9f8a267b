"""Neuron and head-width edits at Gemma 4 layers whose sizes differ.

Gemma 4's KV-shared layers have double-wide MLPs and its global layers wider
heads, so ``neurons`` and ``projection`` sizes belong to a layer. Edits at a
layer must take that layer's sizes; edits spanning layers of different sizes
must be refused by name. The reference for neuron edits is transformers'
`Gemma4ForCausalLM` with the same change made to its ``down_proj`` weights
(zeroing or scaling hidden neuron ``n`` is scaling column ``n`` of it).
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
