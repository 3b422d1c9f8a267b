"""The replacement model: MLPs replaced by transcoders, the rest frozen linear.

    rep = replacement_model(model, tcs, tokens)   # tcs: TranscoderSet or CLT
    rep.model(tokens)                             # == model(tokens) (error nodes)
    rep.features[l]                               # {seq, latents} of layer l

From one clean run on the prompt we record every RMSNorm's scale
``1/rms(x)`` and every attention pattern, and each layer's ``mlp.in`` and
``mlp.out``. The replacement is the same Penzai model where

* each ``RMSStandardize`` multiplies by its recorded scale (`FrozenScale`)
  and each attention ``Softmax`` returns its recorded pattern
  (`FrozenPattern`), so the residual stream is linear in what is added to it;
* each layer's ``mlp.out`` is replaced (`ReplacedMLPOut`) by the
  transcoder's decoded features ``Σ_{l≤k} f_l · W_dec[l→k] + b_dec[k]`` plus
  the *error node* ``mlp.out − reconstruction`` (plus the live affine skip
  ``mlp.in · W_skip``, which is linear), and the embedding gets an additive
  input (`AddInput`, zero by default).

With the recorded values the replacement reproduces the clean logits (up
to float reassociation). Features at position 0 (BOS) are zeroed, as in
circuit-tracer: their contribution lives in the error node there
(circuit-tracer 0.5 also zeroes the BOS error vectors, dropping those edges;
we keep them, so every row stays complete).
`linear_reads` is the replacement as a function of what is written at the
embedding and at every ``mlp.out``, returning each layer's ``mlp.in`` and the
logits: the affine map attribution graphs differentiate.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.host import to_numpy
from gemma_surgery.sae.clt import Dictionary
from gemma_surgery.sae.splice import TranscoderInput
from gemma_surgery.surgery import sites
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.capture import CaptureLayer, SaveIntermediate
from gemma_surgery.surgery.run import jit_forward

_LABELS = itertools.count()


def _axes(across: Any) -> tuple[str, ...]:
  return (across,) if isinstance(across, str) else tuple(across)


@pz.pytree_dataclass
class RecordScale(CaptureLayer):
  """``RMSStandardize`` that also stores its scale ``1/sqrt(mean(x²) + ε)``.

  Attributes:
    saved: Receives the scale (the input's axes minus ``across``).
    across: Axes normalized over (static). epsilon: ε (static).
  """

  saved: pz.StateVariable
  across: tuple[str, ...] = base.static_field(("embedding",))
  epsilon: float = base.static_field(1e-6)
  site: str = base.static_field("rms_scale")
  layer: int | None = base.static_field(None)

  def scale(self, value: pz.nx.NamedArray) -> pz.nx.NamedArray:
    mean = pz.nx.nmap(lambda x: jnp.mean(jnp.square(x)))(value.untag(*self.across))
    return pz.nx.nmap(jax.lax.rsqrt)(mean + self.epsilon)

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    scale = self.scale(value)
    self.saved.value = scale
    return value * scale


@pz.pytree_dataclass
class RecordPattern(CaptureLayer):
  """Attention ``Softmax`` that also stores its output (the pattern)."""

  saved: pz.StateVariable
  axes: tuple[str, ...] = base.static_field(("kv_seq",))
  site: str = base.static_field("pattern")
  layer: int | None = base.static_field(None)

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    out = pz.nn.Softmax(self.axes)(value)
    self.saved.value = out
    return out


@pz.pytree_dataclass
class FrozenScale(base.SurgeryLayer):
  """An RMSNorm standardization with a fixed scale: ``x · scale`` (linear).

  Attributes:
    scale: The recorded ``{batch, seq, ...}`` scale.
  """

  scale: pz.nx.NamedArray

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    return value * self.scale.astype(value.dtype)


@pz.pytree_dataclass
class FrozenPattern(base.SurgeryLayer):
  """An attention softmax that returns a recorded pattern, whatever its input.

  Attributes:
    pattern: ``{batch, seq, kv_seq, heads...}`` attention weights.
  """

  pattern: pz.nx.NamedArray

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    return self.pattern.astype(value.dtype)


@pz.pytree_dataclass
class AddInput(base.SurgeryLayer):
  """Adds ``delta`` to the activation (zero by default: a gradient handle)."""

  delta: pz.nx.NamedArray
  site: str = base.static_field("embed")
  layer: int | None = base.static_field(None)

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    return value + self.delta.astype(value.dtype)


@pz.pytree_dataclass
class ReplacedMLPOut(base.SurgeryLayer):
  """Replaces ``mlp.out`` by ``value`` (+ the skip of the stored ``mlp.in``).

  Attributes:
    value: ``{batch, seq, embedding}``: decoded features + b_dec + error.
    w_skip: Optional ``{embedding, embedding_out}`` affine skip.
    channel: State variable set by the `TranscoderInput` at ``mlp.in`` (only
      with a skip).
    layer: Layer index (static).
  """

  value: pz.nx.NamedArray
  w_skip: pz.nx.NamedArray | None = None
  channel: pz.StateVariable | None = None
  layer: int = base.static_field(0)

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    out = self.value
    if self.channel is not None:
      x_in = self.channel.value
      self.channel.value = None
      skip = pz.nx.nmap(jnp.tensordot)(
        x_in.untag("embedding"), self.w_skip.untag("embedding"), axes=1
      )
      out = out + skip.untag("embedding_out").tag("embedding")
    return out.astype(value.dtype)


@dataclasses.dataclass
class Replacement:
  """A prompt's replacement model and what it was built from.

  Attributes:
    model: The frozen replacement (a Penzai model; ``model(tokens)`` gives the
      clean logits).
    tokens: ``{batch: 1, seq}`` prompt ids.
    dictionary: The `TranscoderSet` or `CrossLayerTranscoder`.
    features: Per layer, ``[seq, latents]`` float32 activations (numpy; 0 at
      BOS).
    errors: ``[layers, seq, d_model]`` error vectors (numpy).
    embed: ``[seq, d_model]`` scaled token embeddings (numpy).
    mlp_in: ``[layers, seq, d_model]`` clean ``mlp.in`` (numpy).
    logits: ``[seq, vocab]`` clean logits (numpy).
    written: ``[layers, seq, d_model]``: what each `ReplacedMLPOut` writes
      (decoded features + b_dec + error; the skip is added live).
  """

  model: Any
  tokens: pz.nx.NamedArray
  dictionary: Dictionary
  features: list[np.ndarray]
  errors: np.ndarray
  embed: np.ndarray
  mlp_in: np.ndarray
  logits: np.ndarray
  written: np.ndarray

  @property
  def num_layers(self) -> int:
    return len(self.features)


def _swap_norms_and_softmax(model: Any, make_scale: Any, make_pattern: Any) -> Any:
  model = (
    pz.select(model)
    .at_instances_of(pz.nn.RMSStandardize)
    .apply(lambda layer: make_scale(layer))
  )
  return pz.select(model).at_instances_of(pz.nn.Softmax).apply(make_pattern)


def _record(model: Any, tokens: pz.nx.NamedArray) -> tuple[dict, list, list]:
  """Clean run: captures of ``embed``/``mlp.in``/``mlp.out``, scales, patterns."""
  n = sites.num_layers(model)
  savers = {}

  def saver(site: str, layer: int | None) -> SaveIntermediate:
    savers[site, layer] = SaveIntermediate.fresh(site, layer)
    return savers[site, layer]

  for site in ("mlp.in", "mlp.out"):
    model = sites.insert(model, site, None, lambda i, site=site: saver(site, i))
  model = sites.insert(model, "embed", None, lambda _: saver("embed", None))
  scales: list[RecordScale] = []
  patterns: list[RecordPattern] = []

  def make_scale(layer: pz.nn.RMSStandardize) -> RecordScale:
    var = pz.StateVariable(value=None, label=f"circuits/scale_{next(_LABELS)}")
    scales.append(
      RecordScale(saved=var, across=_axes(layer.across), epsilon=layer.epsilon)
    )
    return scales[-1]

  def make_pattern(layer: pz.nn.Softmax) -> RecordPattern:
    var = pz.StateVariable(value=None, label=f"circuits/pattern_{next(_LABELS)}")
    patterns.append(RecordPattern(saved=var, axes=_axes(layer.axes)))
    return patterns[-1]

  recording = _swap_norms_and_softmax(model, make_scale, make_pattern)
  logits = jit_forward(recording)(tokens)
  values = {key: s.saved.value for key, s in savers.items()}
  values["logits"] = logits
  if n != len([k for k in values if k[0] == "mlp.in"]):
    raise errors.SurgeryError("Could not record every layer's mlp.in.")
  return values, [s.saved.value for s in scales], [p.saved.value for p in patterns]


def _row(x: pz.nx.NamedArray, *axes: str) -> np.ndarray:
  return to_numpy(x[{"batch": 0}].unwrap(*axes), np.float32)


def check_fits(model: Any, dictionary: Dictionary) -> None:
  """Raises `SAEError` unless the dictionary covers the model's MLP layers."""
  n = sites.num_layers(model)
  info = dictionary.info
  if info.num_layers != n or info.d_model != model.metadata.embedding_dim:
    raise errors.SAEError(
      f"The {info.kind} {info.source!r} covers {info.num_layers} layers of"
      f" d_model {info.d_model}; the model has {n} layers of d_model"
      f" {model.metadata.embedding_dim}."
    )
  if (info.site, info.out_site) != ("mlp.in", "mlp.out"):
    raise errors.SAEError(
      f"Replacement models need transcoders reading mlp.in and writing mlp.out;"
      f" {info.source!r} reads {info.site} and writes {info.out_site}."
    )


def _check_tokens(tokens: Any) -> pz.nx.NamedArray:
  if not isinstance(tokens, pz.nx.NamedArray) or tokens.named_shape.get("batch") != 1:
    shape = getattr(tokens, "named_shape", type(tokens).__name__)
    raise errors.InputError(
      "Trace one prompt: tokens must be a {batch: 1, seq} NamedArray (from"
      f" gs.named_tokens([ids])); got {shape}."
    )
  return tokens


def replacement_model(
  model: Any, dictionary: Dictionary, tokens: pz.nx.NamedArray
) -> Replacement:
  """Builds the replacement model of ``model`` on one prompt (see module doc).

  Args:
    model: A Penzai Gemma LM (not modified; unpatched).
    dictionary: A `TranscoderSet` or `CrossLayerTranscoder` reading
      ``mlp.in`` and writing ``mlp.out`` at every layer.
    tokens: ``{batch: 1, seq}`` token ids.

  Raises:
    SAEError: The dictionary does not fit the model. InputError: Bad tokens.
  """
  check_fits(model, dictionary)
  tokens = _check_tokens(tokens)
  values, scales, patterns = _record(model, tokens)
  n = sites.num_layers(model)
  mlp_in = [values["mlp.in", i].astype(jnp.float32) for i in range(n)]
  not_bos = (np.arange(tokens.named_shape["seq"]) > 0)[:, None]
  features = [
    _row(dictionary.encode_layer(i, mlp_in[i]), "seq", "latents") * not_bos
    for i in range(n)
  ]
  feats_named = [pz.nx.wrap(jnp.asarray(f)).tag("seq", "latents") for f in features]
  errs, outs = [], []
  for k in range(n):
    decoded = _row_1(dictionary.decode_layer(k, feats_named))
    skip = dictionary.skip(k, mlp_in[k])
    skip_np = 0.0 if skip is None else _row(skip, "seq", "embedding")
    out = _row(values["mlp.out", k].astype(jnp.float32), "seq", "embedding")
    errs.append(out - decoded - skip_np)
    outs.append(decoded + errs[-1])
  rep = _build(model, dictionary, scales, patterns, np.stack(outs))
  return Replacement(
    model=rep,
    tokens=tokens,
    dictionary=dictionary,
    features=features,
    errors=np.stack(errs),
    embed=_row(values["embed", None].astype(jnp.float32), "seq", "embedding"),
    mlp_in=np.stack([_row(x, "seq", "embedding") for x in mlp_in]),
    logits=_row(values["logits"].astype(jnp.float32), "seq", "vocabulary"),
    written=np.stack(outs),
  )


def _row_1(x: pz.nx.NamedArray) -> np.ndarray:
  return to_numpy(x.unwrap("seq", "embedding"), np.float32)


def _named(x: Any, *axes: str) -> pz.nx.NamedArray:
  return pz.nx.wrap(jnp.asarray(x)).tag(*axes)


def skip_weight(dictionary: Dictionary, layer: int) -> pz.nx.NamedArray | None:
  """``{embedding, embedding_out}`` float32 affine skip of ``layer``, or None."""
  if dictionary.info.kind == "transcoders":
    found = dictionary.transcoders[layer].w_skip
    return None if found is None else found.value.astype(jnp.float32)
  if dictionary.w_skip is None:
    return None
  return dictionary.w_skip.value[{"out_layer": layer}].astype(jnp.float32)


def _build(
  model: Any, dictionary: Dictionary, scales: list, patterns: list, outs: np.ndarray
) -> Any:
  """The frozen replacement; ``outs[k]`` is mlp.out[k] minus its live skip."""
  n, seq, d = outs.shape
  zeros = _named(np.zeros((1, seq, d), np.float32), "batch", "seq", "embedding")
  model = sites.insert(model, "embed", None, lambda _: AddInput(delta=zeros))
  skips = [skip_weight(dictionary, k) for k in range(n)]
  channels = [
    None
    if skips[k] is None
    else pz.StateVariable(value=None, label=f"circuits/skip_{next(_LABELS)}")
    for k in range(n)
  ]
  with_skip = [k for k in range(n) if skips[k] is not None]
  if with_skip:
    model = sites.insert(
      model,
      "mlp.in",
      with_skip,
      lambda i: TranscoderInput(channel=channels[i], site="mlp.in", layer=i),
    )

  def replaced(k: int) -> ReplacedMLPOut:
    value = _named(outs[k][None], "batch", "seq", "embedding")
    return ReplacedMLPOut(value=value, w_skip=skips[k], channel=channels[k], layer=k)

  model = sites.insert(model, "mlp.out", None, replaced)
  scale_it, pattern_it = iter(scales), iter(patterns)
  return _swap_norms_and_softmax(
    model,
    lambda _: FrozenScale(scale=next(scale_it)),
    lambda _: FrozenPattern(pattern=next(pattern_it)),
  )
