"""Gemma 4 Kaggle/Flax checkpoints: the same weights as Hugging Face, same logits.

A tiny random Gemma 4 written by `transformers` (`helpers.gemma4`) is saved
both as safetensors and, re-spelled by `helpers.gemma4_flax` from the
transformers tensors, as an orbax checkpoint in the ``gemma`` 4.x library's
Flax layout (derived from the library's code; no real Gemma 4 Flax
checkpoint is reachable offline). Both must load to the same logits
(<= 1e-5), and to transformers' own (<= 1e-4); with the dense MLP's gate and
up projections swapped in the Flax tree they must not.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from helpers import kaggle_writers as writers
from jax.sharding import NamedSharding, PartitionSpec
from penzai import pz

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from helpers import gemma4 as g4  # noqa: E402
from helpers import gemma4_flax as flax  # noqa: E402

import gemma_surgery as gs  # noqa: E402
from gemma_surgery import errors  # noqa: E402
from gemma_surgery.loading import kaggle, kaggle_gemma4, kaggle_layout  # noqa: E402
from gemma_surgery.loading.kaggle_sharded import leaf_spec  # noqa: E402
from gemma_surgery.model import parameters  # noqa: E402
from gemma_surgery.parallel import sharding  # noqa: E402

# Dense: KV sharing (the last 2 layers), per-layer embeddings, k = v on the
# global layers, double-wide shared MLPs. MoE: the same plus top-2 of 4
# experts beside the dense MLP.
CONFIGS = {
  "dense": {**g4.ALL_FEATURES, "enable_moe_block": False},
  "moe": g4.ALL_FEATURES,
}
pytestmark = pytest.mark.filterwarnings(
  "ignore::gemma_surgery.errors.ReplicationWarning"
)


class Case:
  def __init__(self, root, name):
    self.hf_dir = root / "hf"
    self.torch = g4.write_checkpoint(self.hf_dir, seed=5, **CONFIGS[name])
    self.hf_config = CONFIGS[name]
    self.state = flax.state_dict(self.torch)
    self.hf = gs.load(self.hf_dir, dtype="float32", progress=False)
    self.config = self.hf.config
    self.tokens = g4.tokens(2, 10, seed=1)
    self.hf_logits = g4.logits(self.hf.model, self.tokens)

  def write(self, path, tree):
    return writers.save(jax.tree.map(np.asarray, tree), path)

  def nested(self, **kwargs):
    return flax.to_nested(self.state, self.hf_config, **kwargs)

  def load(self, path, **kwargs):
    kwargs.setdefault("config", self.config)
    return gs.load(path, dtype="float32", progress=False, **kwargs)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
  return Case(tmp_path_factory.mktemp(f"g4k_{request.param}"), request.param)


def test_kaggle_layout_loads_to_the_hf_and_transformers_logits(case, tmp_path):
  path = case.write(tmp_path / "nested", case.nested())
  got = g4.logits(case.load(path).model, case.tokens)
  np.testing.assert_allclose(got, case.hf_logits, atol=1e-5, rtol=0)
  want = g4.torch_logits(case.torch, case.tokens)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
  # The FLAT spelling of the same tree, with an outer 'transformer/' prefix.
  flat = case.write(tmp_path / "flat", flax.to_flat(case.nested()))
  np.testing.assert_allclose(
    g4.logits(case.load(flat).model, case.tokens), got, atol=1e-6, rtol=0
  )


def test_negative_control_swapped_gate_and_up_change_the_logits(case, tmp_path):
  path = case.write(tmp_path / "swapped", case.nested(swap_gate_up=True))
  got = g4.logits(case.load(path).model, case.tokens)
  assert np.abs(got - case.hf_logits).max() > 1e-2


def _params(model) -> dict[str, pz.nx.NamedArray]:
  return {p.label: p.value for p in pz.unbind_params(model)[1]}


def test_mesh_load_equals_unsharded_load(case, tmp_path):
  if not case.hf_config.get("enable_moe_block"):
    pytest.skip("the MoE case covers every dense weight too (kept fast)")
  path = case.write(tmp_path / "nested", case.nested())
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  host, placed = case.load(path), case.load(path, mesh=mesh)
  got, want = _params(placed.model), _params(host.model)
  assert sorted(got) == sorted(want)
  for label, value in want.items():
    data = got[label].data_array
    assert got[label].named_shape == value.named_shape, label
    np.testing.assert_array_equal(np.asarray(data), np.asarray(value.data_array))
    spec = sharding.partition_spec(dict(value.named_shape), 0, mesh)
    assert data.sharding.is_equivalent_to(NamedSharding(mesh, spec), data.ndim), label


@pytest.mark.parametrize(
  "part, target, penzai, leaf, expected",
  [
    # Experts' gating_einsum [E, 2, X, D] -> moe/gate [E, D, X]: experts on E.
    (
      kaggle_layout.Part(0, axis=1, swap_last=True),
      ("experts", "embedding", "neurons"),
      ("model", None, None),
      (4, 2, 6, 8),
      ("model", None, None, None),
    ),
    # ... and a neurons split lands on X.
    (
      kaggle_layout.Part(1, axis=1, swap_last=True),
      ("experts", "embedding", "neurons"),
      (None, None, "model"),
      (4, 2, 6, 8),
      (None, None, "model", None),
    ),
    # Dense gating_einsum [2, F, D] -> mlp/gate [D, F]: neurons on F.
    (
      kaggle_layout.Part(0, transpose=True),
      ("embedding", "neurons"),
      (None, "model"),
      (2, 6, 8),
      (None, "model", None),
    ),
  ],
)
def test_stored_leaves_are_read_in_per_device_slices(
  part, target, penzai, leaf, expected
):
  mesh = sharding.make_mesh({"data": 4, "model": 2})
  ref = kaggle_layout.Ref(("w",), leaf, np.dtype(np.float32))
  t = parameters.Target("x", target)
  got = leaf_spec(t, part, ref, PartitionSpec(*penzai), leaf, mesh)
  assert got == PartitionSpec(*expected)


# -- bad input -----------------------------------------------------------------


def _drop(tree, path):
  *parents, last = path.split("/")
  node = tree
  for key in parents:
    node = node[key]
  del node[last]
  return tree


def _set(tree, path, value):
  *parents, last = path.split("/")
  node = tree
  for key in parents:
    node = node[key]
  node[last] = value
  return tree


@pytest.mark.parametrize(
  "edit, match",
  [
    # A missing weight is named with its stored key.
    (
      lambda t: _drop(t, "layer_3/attn/attn_vec_einsum"),
      "missing weight 'transformer/layer_3/attn/attn_vec_einsum'",
    ),
    (lambda t: _drop(t, "layer_1/skip_scale"), "'transformer/layer_1/skip_scale'"),
    # A shape that disagrees with the config.
    (
      lambda t: _set(t, "layer_2/attn/q_einsum/w", np.zeros((3, 64, 32), np.float32)),
      r"'layer_2/attn/q_einsum/w' has shape \(3, 64, 32\)",
    ),
    (
      lambda t: _set(t, "embedder/per_layer_embeddings", np.zeros((128, 5, 8))),
      "'embedder/per_layer_embeddings' has shape",
    ),
    # A weight Gemma 4 layers don't have.
    (
      lambda t: _set(t, "layer_0/attn/qkv_einsum", {"w": np.zeros((3, 4, 64, 16))}),
      "unsupported weight 'transformer/layer_0/attn/qkv_einsum'",
    ),
  ],
)
def test_bad_trees_raise_checkpoint_errors_naming_the_key(case, tmp_path, edit, match):
  tree = jax.tree.map(np.asarray, case.nested())
  path = case.write(tmp_path / "bad", edit(tree))
  with pytest.raises(errors.CheckpointError, match=match):
    case.load(path)


def test_configs_that_disagree_with_the_weights(case, tmp_path):
  path = case.write(tmp_path / "nested", case.nested())
  # Per-layer embeddings the config doesn't have would be silently dropped.
  no_ple = case.config.replace(per_layer_input_dim=0, per_layer_vocab_size=None)
  with pytest.raises(errors.CheckpointError, match="per_layer.*does not use"):
    case.load(path, config=no_ple)
  # Fewer layers than stored.
  fewer = case.config.replace(
    num_layers=5, attention_types=case.config.attention_types[:5]
  )
  with pytest.raises(errors.CheckpointError, match="layer_5"):
    case.load(path, config=fewer)
  # The other family, the wrong variant, or none for a custom size.
  with pytest.raises(errors.CheckpointError, match="gemma2 model"):
    case.load(path, config=None, variant="gemma2_2b")
  with pytest.raises(errors.CheckpointError, match="does not fit variant 'gemma4_e2b'"):
    case.load(path, config=None, variant="gemma4_e2b")
  with pytest.raises(errors.ConfigError, match="no published Gemma 4 variant"):
    case.load(path, config=None)


# -- published presets are recognised from the shapes alone --------------------


def _hf_kwargs(cfg) -> dict:
  """``Gemma4TextConfig`` arguments of a preset (test-side translation)."""
  kinds = {"local": "sliding_attention", "global": "full_attention"}
  return dict(
    vocab_size=cfg.vocab_size,
    hidden_size=cfg.embedding_dim,
    intermediate_size=cfg.mlp_hidden_dim,
    num_hidden_layers=cfg.num_layers,
    num_attention_heads=cfg.num_heads,
    num_key_value_heads=cfg.num_kv_heads,
    head_dim=cfg.head_dim,
    global_head_dim=cfg.global_head_dim,
    num_global_key_value_heads=cfg.num_global_kv_heads,
    attention_k_eq_v=cfg.k_eq_v_global,
    num_kv_shared_layers=cfg.num_kv_shared_layers,
    hidden_size_per_layer_input=cfg.per_layer_input_dim,
    vocab_size_per_layer_input=cfg.per_layer_vocab_size or cfg.vocab_size,
    layer_types=[kinds[k] for k in cfg.attention_types],
    use_double_wide_mlp=cfg.double_wide_shared_mlp,
    enable_moe_block=bool(cfg.num_experts),
    num_experts=cfg.num_experts or None,
    top_k_experts=cfg.top_k_experts or None,
    moe_intermediate_size=cfg.expert_hidden_dim or None,
  )


@pytest.mark.parametrize(
  "name", ["gemma4_e2b", "gemma4_e4b", "gemma4_26b_a4b", "gemma4_31b"]
)
def test_full_size_presets_are_inferred_from_shapes(name):
  kwargs = _hf_kwargs(gs.preset(name))
  with torch.device("meta"):
    model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**kwargs))
  shapes = {
    k.removeprefix("model."): jax.ShapeDtypeStruct(tuple(v.shape), np.float32)
    for k, v in model.state_dict().items()
    if k.startswith("model.")
  }
  tree = jax.eval_shape(lambda s: flax.to_nested(s, kwargs), shapes)
  entries = kaggle_layout.layout_entries(tree, name)
  assert kaggle_gemma4.is_gemma4(entries)
  for layout in (tree, flax.to_flat(tree)):
    assert kaggle.infer_config_from_kaggle(layout) == gs.preset(name)
    assert kaggle.infer_config_from_kaggle(layout, name) == gs.preset(name)
  # Negative control: a Gemma 1-3 tree is not taken for Gemma 4.
  g3 = writers.tiny_config("gemma3")
  flat = writers.to_flat(g3, writers.random_params(g3))
  assert not kaggle_gemma4.is_gemma4(kaggle_layout.layout_entries(flat, "g3"))
