"""The positional layers compute what Penzai's named-axis layers compute.

Each case runs the same weights through Penzai's own layer and through ours,
on inputs whose data arrays lie in an unusual order (transposed views), and
compares; a positional axis makes ours fall back to Penzai's code.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.model import build, positional, positional_layers

FIXTURES = pathlib.Path(__file__).parents[1] / "fixtures" / "hf"

RNG = np.random.default_rng(0)


def named(
  shape: dict[str, int], order: tuple[str, ...] | None = None
) -> pz.nx.NamedArray:
  """Random data named by ``shape``; ``order`` transposes the data underneath."""
  data = pz.nx.wrap(jnp.asarray(RNG.standard_normal(list(shape.values())), jnp.float32))
  value = data.tag(*shape)
  if order is not None:
    value = value.order_as(*order)
  return value


def penzai_linear(
  inputs: dict, outputs: dict, parallel: dict | None = None
) -> pz.nn.Linear:
  return pz.nn.Linear.from_config(
    name="w",
    init_base_rng=jax.random.key(1),
    input_axes=inputs,
    output_axes=outputs,
    parallel_axes=parallel,
  )


def close(ours: pz.nx.NamedArray, theirs: pz.nx.NamedArray, atol: float = 1e-5) -> None:
  assert dict(ours.named_shape) == dict(theirs.named_shape)
  names = tuple(theirs.named_shape)
  np.testing.assert_allclose(
    np.asarray(ours.order_as(*names).data_array),
    np.asarray(theirs.order_as(*names).data_array),
    atol=atol,
    rtol=1e-5,
  )


@pytest.mark.parametrize(
  "order", [None, ("embedding", "seq", "batch"), ("seq", "embedding", "batch")]
)
def test_linear_matches_penzai(order):
  linear = penzai_linear({"embedding": 12}, {"heads": 3, "projection": 5})
  x = named({"batch": 2, "seq": 4, "embedding": 12}, order)
  ours = positional.positional_linear(linear)
  assert isinstance(ours, pz.nn.Linear)
  close(ours(x), linear(x))


def test_linear_with_parallel_axes_matches_penzai():
  """An output projection contracts heads, projection; a per-head one keeps heads."""
  out = penzai_linear({"heads": 3, "projection": 5}, {"embedding": 7})
  x = named({"seq": 4, "projection": 5, "heads": 3}, ("projection", "heads", "seq"))
  close(positional.positional_linear(out)(x), out(x))
  per_head = penzai_linear({"projection": 5}, {"neurons": 6}, parallel={"heads": 3})
  close(positional.positional_linear(per_head)(x), per_head(x))


def test_rms_norm_matches_penzai():
  norm = pz.nn.RMSLayerNorm.from_config(
    name="n", init_base_rng=jax.random.key(2), across_axes={"embedding": 8}
  )
  # A non-trivial scale, so that the elementwise product is checked.
  norm = (
    pz.select(norm)
    .at_instances_of(pz.Parameter)
    .apply(lambda p: pz.Parameter(value=named({"embedding": 8}), label=p.label))
  )
  x = named({"batch": 2, "embedding": 8, "seq": 3}, ("embedding", "batch", "seq"))
  close(positional.positional_norm(norm)(x), norm(x))


def test_bf16_weights_promote_as_penzai_does():
  linear = penzai_linear({"embedding": 12}, {"neurons": 4})
  linear = (
    pz.select(linear)
    .at_instances_of(pz.Parameter)
    .apply(lambda p: pz.Parameter(value=p.value.astype(jnp.bfloat16), label=p.label))
  )
  x = named({"seq": 3, "embedding": 12})
  ours, theirs = positional.positional_linear(linear)(x), linear(x)
  assert ours.dtype == theirs.dtype == jnp.float32
  close(ours, theirs)


def test_positional_axes_fall_back_to_penzai():
  """A leftover positional axis goes to Penzai's code, which rejects it."""
  linear = penzai_linear({"embedding": 6}, {"neurons": 2})
  x = named({"seq": 3, "embedding": 6}).untag("seq")  # `seq` is positional now
  for layer in (linear, positional.positional_linear(linear)):
    with pytest.raises(pz.chk.StructureMismatchError, match="Positional shape"):
      layer(x)


def test_wrong_axis_size_is_a_clear_error():
  linear = positional.positional_linear(penzai_linear({"embedding": 6}, {"neurons": 2}))
  with pytest.raises(ValueError, match="'embedding' has size 5 in the input but 6"):
    linear(named({"seq": 2, "embedding": 5}))
  with pytest.raises(ValueError, match="lacks the axis 'embedding'"):
    linear(named({"seq": 2, "projection": 6}))


@pytest.mark.parametrize(
  "scale_factor, proportion", [(1.0, 1.0), (8.0, 1.0), (1.0, 0.25)]
)
def test_rope_matches_the_per_slice_rotation(scale_factor, proportion):
  rope = build.ScaledRoPE(
    embedding_axis="projection",
    max_wavelength=10_000.0,
    positions_input_name="token_positions",
    scale_factor=scale_factor,
    proportion=proportion,
  )
  x = named(
    {"batch": 2, "seq": 5, "heads": 3, "projection": 16},
    ("projection", "seq", "heads", "batch"),
  )
  positions = pz.nx.wrap(jnp.asarray(RNG.integers(0, 3000, (5, 2)), jnp.int32)).tag(
    "seq", "batch"
  )
  ours = rope(x, token_positions=positions)
  # Penzai's path: the per-slice `_apply_1d` vectorized over every named axis.
  theirs = pz.nx.nmap(rope._apply_1d)(x.untag("projection"), positions).tag(
    "projection"
  )
  close(ours, theirs, atol=2e-4)  # angles up to 3000 rad: float32 sin/cos rounding
  if scale_factor == 1.0 and proportion == 1.0:
    plain = pz.nn.ApplyRoPE(
      embedding_axis="projection",
      max_wavelength=10_000.0,
      positions_input_name="token_positions",
    )
    close(ours, plain(x, token_positions=positions), atol=2e-4)


def test_every_gemma_model_builds_positional_layers():
  model = gs.load("tiny").model
  linears = pz.select(model).at_instances_of(pz.nn.Linear).get_sequence()
  assert linears and all(isinstance(x, positional.PositionalLinear) for x in linears)
  # A negative control: Penzai's own layers are not ours.
  assert not isinstance(
    pz.nn.Linear.from_config("x", None, {"a": 1}, {"b": 1}), positional.PositionalLinear
  )


def test_softmax_masks_and_einsum_match_penzai():
  """The attention pieces, on scores whose data lie in an unusual order."""
  scores = named(
    {"batch": 2, "seq": 4, "heads": 3, "kv_seq": 4}, ("kv_seq", "heads", "batch", "seq")
  )
  positions = pz.nx.wrap(jnp.asarray([[0, 1, 2, 3], [-1, 0, 1, 2]])).tag("batch", "seq")
  masked = jnp.float32(-1e30)
  pairs = [
    (pz.nn.Softmax("kv_seq"), positional_layers.PositionalSoftmax("kv_seq")),
    (
      pz.nn.ApplyCausalAttentionMask(masked_out_value=masked),
      positional_layers.PositionalCausalMask(masked_out_value=masked),
    ),
    (
      pz.nn.ApplyCausalSlidingWindowAttentionMask(
        masked_out_value=masked, sliding_window_size=2
      ),
      positional_layers.PositionalSlidingWindowMask(
        masked_out_value=masked, sliding_window_size=2
      ),
    ),
    (pz.nn.TanhSoftCap(jnp.float32(1.5)), positional_layers.PositionalTanhSoftCap(1.5)),
    (
      pz.nn.Elementwise(jax.nn.gelu),
      positional_layers.PositionalElementwise(jax.nn.gelu),
    ),
    (
      pz.nn.ConstantRescale(jnp.float32(0.3)),
      positional_layers.PositionalConstantRescale(jnp.float32(0.3)),
    ),
  ]
  for theirs, ours in pairs:
    close(
      ours(scores, token_positions=positions), theirs(scores, token_positions=positions)
    )
  # The masks really mask: the padded row's first key is out for every query.
  out = pairs[1][1](scores, token_positions=positions)
  assert bool(jnp.all(out[{"batch": 1, "kv_seq": 0}].data_array == masked))
  values = named(
    {"batch": 2, "kv_seq": 4, "heads": 3, "projection": 5},
    ("projection", "kv_seq", "batch", "heads"),
  )
  spec = (
    {"seq": "tq", "heads": "h", "kv_seq": "tkv"},
    {"kv_seq": "tkv", "heads": "h", "projection": "p"},
  )
  out_spec = {"seq": "tq", "heads": "h", "projection": "p"}
  close(
    positional_layers.PositionalNamedEinsum(spec, out_spec)((scores, values)),
    pz.nn.NamedEinsum(spec, out_spec)((scores, values)),
  )


def test_residual_and_product_match_penzai():
  x = named({"seq": 3, "embedding": 6}, ("embedding", "seq"))
  branches = [pz.nn.Elementwise(jnp.tanh), pz.nn.Elementwise(jnp.cos)]
  close(
    positional_layers.PositionalBranchAndMultiplyTogether(branches)(x),
    pz.nn.BranchAndMultiplyTogether(branches)(x),
  )
  close(
    positional_layers.PositionalResidual(branches[0])(x), pz.nn.Residual(branches[0])(x)
  )


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_models_match_their_penzai_layer_twins(family):
  """Whole models: the library's layers vs every one swapped back to Penzai's."""
  model = gs.load(FIXTURES / family).model
  twin = positional_layers.with_penzai_layers(model)
  assert (
    not pz.select(twin).at_instances_of(positional_layers.POSITIONAL_LAYERS).count()
  )
  assert pz.select(model).at_instances_of(positional_layers.POSITIONAL_LAYERS).count()
  tokens = pz.nx.wrap(jnp.asarray(RNG.integers(0, 100, (2, 9)))).tag("batch", "seq")
  close(model(tokens), twin(tokens), atol=2e-5)


def _outcome(layer, x):
  """What ``layer(x)`` gives: an exception type, or the result with any
  positional axis named (so that `close` can compare it)."""
  try:
    out = layer(x)
  except Exception as e:  # noqa: BLE001 - the type is the outcome compared
    return type(e)
  return out.tag("extra") if out.positional_shape else out


@pytest.mark.parametrize("order", [("seq", "embedding"), ("embedding", "seq")])
def test_non_scalar_factors_take_penzai_path(order):
  """Penzai combines a vector rescale or cap with the data positionally (so
  its result depends on the layout); ours gives exactly what Penzai gives."""
  x = named({"seq": 3, "embedding": 4}, order)
  vector = jnp.asarray([0.5, 1.0, 2.0, 4.0], jnp.float32)
  pairs = [
    (
      pz.nn.ConstantRescale(vector),
      positional_layers.PositionalConstantRescale(vector),
    ),
    (pz.nn.TanhSoftCap(vector), positional_layers.PositionalTanhSoftCap(vector)),
  ]
  for theirs, ours in pairs:
    expected, got = _outcome(theirs, x), _outcome(ours, x)
    if isinstance(expected, type):
      assert got is expected
    else:
      close(got, expected)
  assert positional.elementwise(jnp.multiply, x, vector) is None
  assert positional.elementwise(jnp.multiply, vector, vector) is None
