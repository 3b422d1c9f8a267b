"""Property-based tests of the public rewrites on the tiny Gemma 2 fixture.

Hypothesis draws sites (also unknown ones), layers (also out of range,
negative, repeated, of the wrong type), heads, neurons, positions, masks and
values (also NaN/inf, wrong axes, wrong sizes) for `gs.steer`, `gs.capture`
and `gs.interventions.ablate/patch/scale_neurons/knock_out_heads/
capture_topk`, builds the rewrite and runs the patched model. Every draw is
classified by the rules the API documents (`ok`): a valid draw must give
finite logits and captures; an invalid one must raise a
`gs.GemmaSurgeryError` subclass, never a raw JAX/numpy/Penzai exception and
never a silently wrong (NaN, misshapen) result.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from helpers.generation import random_tokens
from helpers.paths import HF_FIXTURES
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from penzai import pz

import gemma_surgery as gs
from gemma_surgery.surgery import sites

SEQ, BATCH, N_LAYERS = 6, 2, 4
SIZES = {"embedding": 64, "neurons": 128, "projection": 16, "vocabulary": 512}
SETTINGS = settings(
  max_examples=40,
  deadline=None,
  suppress_health_check=[HealthCheck.too_slow],
)
HEAD_SITES = [s for s, info in sites.SITES.items() if "heads" in info.axes]
TOPK_AXES = {
  "mlp.hidden": "neurons",
  "attn.pattern": "kv_seq",
  "attn.scores": "kv_seq",
  "logits": "vocabulary",
}
_MODEL: list = []


def _model():
  """The fixture model, loaded once (not a pytest fixture: Hypothesis would
  print it with every failing example)."""
  if not _MODEL:
    path = HF_FIXTURES / "gemma2"
    _MODEL.append(gs.load(path, dtype="float32", progress=False).model)
  return _MODEL[0]


def _tokens() -> pz.nx.NamedArray:
  return gs.named_tokens(random_tokens(BATCH, SEQ))


def _size(site: str, axis: str) -> int:
  if axis == "heads":
    return 2 if site in ("attn.k", "attn.v") else 4
  return {"batch": BATCH, "seq": SEQ, "kv_seq": SEQ, "pos": 5, **SIZES}[axis]


# --- Strategies: each draws (argument, ok) -----------------------------------------
# With strict=True a strategy draws only valid arguments (so about half of the
# examples exercise the success path); the oracle `ok` is computed either way.


def _pick(draw, strict: bool, good: list, bad: list):
  return draw(st.sampled_from(good if strict else good + bad))


def site_names(strict: bool):
  return st.sampled_from([*sites.SITES] + ([] if strict else ["resid", "attn.x"]))


@st.composite
def layer_args(draw, site: str, strict: bool, single: bool = False):
  """Layers for ``site``: valid iff None/in range/distinct (None at globals)."""
  per_layer = site in sites.SITES and sites.SITES[site].per_layer
  kinds = (["int"] if single else ["none", "int", "list"]) if per_layer else ["none"]
  kind = _pick(draw, strict, kinds, ["none", "int", "list", "bad"])
  low, high = (-N_LAYERS, N_LAYERS - 1) if strict else (-6, 6)
  if kind == "none":
    return None, not (single and per_layer)
  if kind == "int":
    layer = draw(st.integers(low, high))
    return layer, per_layer and -N_LAYERS <= layer < N_LAYERS
  if kind == "list":
    # Non-empty: an empty list inserts nothing, so sizes only known when the
    # model runs (batch, seq) are never checked.
    layers = draw(
      st.lists(st.integers(low, high), min_size=1, max_size=3, unique=strict)
    )
    fine = all(-N_LAYERS <= x < N_LAYERS for x in layers)
    distinct = len({x % N_LAYERS for x in layers}) == len(layers)
    return layers, per_layer and not single and fine and distinct
  return draw(st.sampled_from(["1", 1.5, True, [0.0]])), False


@st.composite
def index_args(draw, size: int, allowed: bool, strict: bool):
  """Head/neuron indices: valid iff None, or ints in ``0..size-1`` at a site
  that has the axis."""
  good = ["none", "int", "list"] if allowed else ["none"]
  kind = _pick(draw, strict, good, ["int", "list", "bad"])
  low, high = (0, size - 1) if strict else (-2, size + 1)
  if kind == "none":
    return None, True
  if kind == "int":
    i = draw(st.integers(low, high))
    return i, allowed and 0 <= i < size
  if kind == "list":
    items = draw(st.lists(st.integers(low, high), max_size=3))
    return items, allowed and all(0 <= i < size for i in items)
  return draw(st.sampled_from([[1.0], "0", [True]])), False


@st.composite
def named_values(draw, site: str, strict: bool, required: bool = False):
  """A NamedArray over (some of) the site's axes plus batch/seq, maybe bad."""
  info = sites.SITES.get(site)
  own = list(info.axes) if info else ["embedding"]
  axes = own if required else draw(st.lists(st.sampled_from(own), unique=True))
  axes = axes + draw(st.lists(st.sampled_from(["batch", "seq"]), unique=True))
  ok = info is not None
  if not strict and draw(st.booleans()):
    foreign = draw(st.sampled_from(["pos", "neurons", "embedding", "vocabulary"]))
    if foreign not in axes:
      axes.append(foreign)
      ok = ok and foreign in own
  shape = []
  for axis in axes:
    size = _size(site, axis) if info else 64
    if not strict and draw(st.integers(0, 4)) == 0:
      size, ok = size + 1, False
    shape.append(size)
  data = np.random.default_rng(draw(st.integers(0, 9))).normal(size=shape)
  if draw(st.integers(0, 7)) == 0:
    data = np.zeros(shape)  # fine, except for relative steering
  bad = _pick(draw, strict, [None], [np.nan, np.inf, -np.inf])
  if bad is not None and data.size:
    data.flat[0], ok = bad, False
  if not strict and draw(st.integers(0, 5)) == 0:
    return data.astype(np.float32), False  # not a NamedArray
  return pz.nx.wrap(jnp.asarray(data, jnp.float32)).tag(*axes), ok


@st.composite
def masks(draw, strict: bool):
  """A steering/patching positions mask, and whether it's valid."""
  kind = _pick(draw, strict, ["none", "bool", "batch"], ["pos", "short", "half"])
  bits = np.random.default_rng(draw(st.integers(0, 9))).random((BATCH, SEQ)) < 0.5
  if kind == "none":
    return None, True
  if kind == "bool":
    return pz.nx.wrap(jnp.asarray(bits[0])).tag("seq"), True
  if kind == "batch":
    return pz.nx.wrap(jnp.asarray(bits.astype(np.int32))).tag("batch", "seq"), True
  if kind == "pos":
    return pz.nx.wrap(jnp.asarray(bits[0])).tag("pos"), False
  if kind == "short":
    return pz.nx.wrap(jnp.asarray(bits[0, :3])).tag("seq"), False
  return pz.nx.wrap(jnp.full(SEQ, 0.5)).tag("seq"), False


def scalars(strict: bool):
  finite = st.floats(-100, 100, allow_nan=False).map(lambda x: (x, True))
  bad = st.sampled_from([np.nan, np.inf, -np.inf, "2", None]).map(lambda x: (x, False))
  return finite if strict else st.one_of(finite, bad)


# --- The property -----------------------------------------------------------------


def _outcome(build, ok: bool, note: str) -> None:
  """Builds and runs a rewrite; checks the outcome against ``ok``."""
  event("valid draw" if ok else "invalid draw")
  try:
    out = build()
    patched, acts = out if isinstance(out, tuple) else (out, None)
    logits = patched(_tokens())
    values = [acts[key] for key in acts] if acts is not None else []
  except gs.GemmaSurgeryError as error:
    assert not ok, f"valid draw refused: {error!r}\n{note}"
    assert str(error), "an error must say what was wrong"
    return
  assert ok, f"invalid draw accepted\n{note}"
  assert dict(logits.named_shape) == {"batch": BATCH, "seq": SEQ, "vocabulary": 512}
  for value in [logits, *values]:
    for leaf in value if isinstance(value, tuple) else (value,):
      assert np.isfinite(np.asarray(leaf.data_array, np.float64)).all(), note


@SETTINGS
@given(st.data())
def test_steer(data):
  model, strict = _model(), data.draw(st.booleans())
  site = data.draw(site_names(strict))
  layers, ok_layers = data.draw(layer_args(site, strict))
  vector, ok_vector = data.draw(named_values(site, strict))
  scale, ok_scale = data.draw(scalars(strict))
  mask, ok_mask = data.draw(masks(strict))
  relative = data.draw(st.booleans())
  ok = ok_layers and ok_vector and ok_scale and ok_mask
  if relative and ok:
    norm_axes = {a for a in sites.SITES[site].axes if a != "heads"}
    ok = site != "attn.scores" and norm_axes <= set(vector.named_shape)
    ok = ok and bool(np.asarray(vector.data_array).any())
  note = f"{site=} {layers=} {scale=} {relative=} mask={mask}"

  def build():
    return gs.steer(model, site, layers, vector, scale, mask=mask, relative=relative)

  _outcome(build, ok, note)


@SETTINGS
@given(st.data())
def test_capture(data):
  model, strict = _model(), data.draw(st.booleans())
  names = data.draw(st.lists(site_names(strict), min_size=1, max_size=3, unique=strict))
  per_layer = [s for s in names if s in sites.SITES and sites.SITES[s].per_layer]
  site = per_layer[0] if per_layer else names[0]
  layers, ok_layers = data.draw(layer_args(site, strict))
  ok = all(s in sites.SITES for s in names) and len(set(names)) == len(names)
  ok = ok and (ok_layers if per_layer else layers is None)
  _outcome(lambda: gs.capture(model, names, layers), ok, f"{names=} {layers=}")


@SETTINGS
@given(st.data())
def test_ablate(data):
  model, strict = _model(), data.draw(st.booleans())
  site = data.draw(site_names(strict))
  layers, ok = data.draw(layer_args(site, strict))
  head_site, n_heads = site in HEAD_SITES, _size(site, "heads")
  heads, ok_heads = data.draw(index_args(n_heads, head_site, strict))
  neurons, ok_neurons = data.draw(index_args(128, site == "mlp.hidden", strict))
  mode = _pick(data.draw, strict, ["zero", "mean", "value"], ["half"])
  value, ok_value = (None, True)
  if mode == "value":
    value, ok_value = data.draw(named_values(site, strict))
  ok = ok and site in sites.SITES and ok_heads and ok_neurons and ok_value
  ok = ok and mode != "half"
  note = f"{site=} {layers=} {heads=} {neurons=} {mode=}"

  def build():
    return gs.interventions.ablate(
      model, site, layers, heads=heads, neurons=neurons, mode=mode, value=value
    )

  _outcome(build, ok, note)


@SETTINGS
@given(st.data())
def test_patch(data):
  model, strict = _model(), data.draw(st.booleans())
  site = data.draw(site_names(strict))
  layer, ok = data.draw(layer_args(site, strict, single=True))
  value, ok_value = data.draw(named_values(site, strict, required=True))
  has_seq = isinstance(value, pz.nx.NamedArray) and "seq" in value.named_shape
  positions = masks(strict)
  if has_seq or not strict:
    positions = st.one_of(positions, index_args(SEQ, True, strict))
  if not strict:
    positions = st.one_of(positions, st.just((0.5, False)))
  positions, ok_positions = data.draw(positions)
  if isinstance(positions, int | list) and isinstance(value, pz.nx.NamedArray):
    # Indices are bounded by the value's seq axis; without one they can't be.
    ok_positions = ok_positions and value.named_shape.get("seq") == SEQ
  head_site, n_heads = site in HEAD_SITES, _size(site, "heads")
  heads, ok_heads = data.draw(index_args(n_heads, head_site, strict))
  ok = ok and ok_value and ok_positions and ok_heads and site in sites.SITES
  note = f"{site=} {layer=} {positions=} {heads=}"

  def build():
    return gs.interventions.patch(
      model, site, layer, value, positions=positions, heads=heads
    )

  _outcome(build, ok, note)


@SETTINGS
@given(st.data())
def test_scale_neurons(data):
  model, strict = _model(), data.draw(st.booleans())
  layers, ok = data.draw(layer_args("mlp.hidden", strict))
  neurons, ok_neurons = data.draw(index_args(128, True, strict))
  factor, ok_factor = data.draw(scalars(strict))
  ok = ok and ok_neurons and neurons is not None and ok_factor
  note = f"{layers=} {neurons=} {factor=}"

  def build():
    return gs.interventions.scale_neurons(model, layers, neurons, factor)

  _outcome(build, ok, note)


@SETTINGS
@given(st.data())
def test_knock_out_heads(data):
  model, strict = _model(), data.draw(st.booleans())
  layers, ok = data.draw(layer_args("attn.pattern", strict))
  heads, ok_heads = data.draw(index_args(4, True, strict))
  build = lambda: gs.interventions.knock_out_heads(model, layers, heads)  # noqa: E731
  _outcome(build, ok and ok_heads, f"{layers=} {heads=}")


@SETTINGS
@given(st.data())
def test_capture_topk(data):
  model, strict = _model(), data.draw(st.booleans())
  site = data.draw(st.sampled_from(list(TOPK_AXES)) if strict else site_names(False))
  layers, ok = data.draw(layer_args(site, strict))
  axis = TOPK_AXES.get(site)
  size = _size(site, axis) if axis else 0
  k = data.draw(
    st.integers(1, size) if strict else st.one_of(st.integers(-1, 600), st.just(2.0))
  )
  ok = ok and axis is not None and isinstance(k, int) and 1 <= k <= size
  build = lambda: gs.interventions.capture_topk(model, site, layers, k)  # noqa: E731
  _outcome(build, ok, f"{site=} {layers=} {k=}")
