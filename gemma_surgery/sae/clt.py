"""Cross-layer transcoders (CLTs) and per-layer transcoder sets as Penzai layers.

A CLT has an encoder per layer ``l`` reading that layer's ``mlp.in`` and, for
every latent, a decoder to each later layer's ``mlp.out`` (Gemma Scope 2 /
"Circuit Tracing", Ameisen et al. 2025)::

  f_l     = JumpReLU_θl(x_l · W_enc[l] + b_enc[l])
  ŷ_k     = Σ_{l ≤ k} f_l · W_dec[l, :, k] + b_dec[k]   (+ x_k · W_skip[k])

Axes: ``layer`` (source layer of an encoder), ``out_layer`` (the layer a
decoder writes), ``embedding`` (d_model), ``latents`` (per-layer width);
``embedding_out`` for the skip's output. Decoders to earlier layers
(``k < l``) are stored in the public layout but never used (causality).

`TranscoderSet` wraps one `Transcoder` per layer behind the same interface
(`encode_layer`, `decoder`, `bias`, `skip`), so the replacement model and
attribution graphs (`gemma_surgery.circuits`) treat both alike.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery.errors import SAEError
from gemma_surgery.sae.autoencoders import Transcoder, contract, weight_dtype
from gemma_surgery.surgery.layers import base

# Named axes of the stacked CLT arrays.
CLT_AXES = {
  "w_enc": ("layer", "embedding", "latents"),
  "b_enc": ("layer", "latents"),
  "threshold": ("layer", "latents"),
  "w_dec": ("layer", "latents", "out_layer", "embedding"),
  "b_dec": ("out_layer", "embedding"),
  "w_skip": ("out_layer", "embedding", "embedding_out"),
}


@dataclasses.dataclass(frozen=True)
class CLTInfo:
  """Static description of a CLT or transcoder set.

  Attributes:
    num_layers: Layers it covers (encoders ``0..num_layers-1``).
    d_model: Input and output size.
    width: Latents per layer.
    site: Site each encoder reads (``mlp.in``).
    out_site: Site each decoder writes (``mlp.out``).
    source: Where it was loaded from.
    kind: ``"clt"`` or ``"transcoders"``.
  """

  num_layers: int
  d_model: int
  width: int
  site: str = "mlp.in"
  out_site: str = "mlp.out"
  source: str = ""
  kind: str = "clt"


def _f32(x: pz.nx.NamedArray) -> pz.nx.NamedArray:
  return x.astype(jnp.float32)


@pz.pytree_dataclass
class CrossLayerTranscoder(pz.nn.Layer):
  """A JumpReLU cross-layer transcoder.

  Called on ``{layer, ..., embedding}`` MLP inputs (one slice per layer) it
  returns the ``{layer, ..., embedding}`` predicted MLP outputs (float32).

  Attributes:
    w_enc: ``{layer, embedding, latents}``.
    b_enc: ``{layer, latents}``.
    threshold: ``{layer, latents}`` θ (float32).
    w_dec: ``{layer, latents, out_layer, embedding}``.
    b_dec: ``{out_layer, embedding}``.
    w_skip: Optional ``{out_layer, embedding, embedding_out}``.
    info: Static `CLTInfo`.
  """

  w_enc: pz.ParameterLike[pz.nx.NamedArray]
  b_enc: pz.ParameterLike[pz.nx.NamedArray]
  threshold: pz.ParameterLike[pz.nx.NamedArray]
  w_dec: pz.ParameterLike[pz.nx.NamedArray]
  b_dec: pz.ParameterLike[pz.nx.NamedArray]
  info: CLTInfo = base.static_field()
  w_skip: pz.ParameterLike[pz.nx.NamedArray] | None = None

  @classmethod
  def from_arrays(
    cls, arrays: dict[str, np.ndarray], info: CLTInfo, *, dtype: Any = "float32"
  ) -> CrossLayerTranscoder:
    """Builds the layer from stacked numpy arrays named as `CLT_AXES`."""
    dtype = weight_dtype(dtype)
    prefix = f"clt/{info.source or 'clt'}"
    fields = {}
    for name, axes in CLT_AXES.items():
      if name not in arrays:
        continue
      kind = jnp.float32 if name == "threshold" else dtype
      named = pz.nx.wrap(jnp.asarray(np.asarray(arrays[name]), kind)).tag(*axes)
      fields[name] = pz.Parameter(value=named, label=f"{prefix}/{name}")
    return cls(**fields, info=info)

  @property
  def num_layers(self) -> int:
    return self.info.num_layers

  def _at(self, name: str, axis: str, index: int) -> pz.nx.NamedArray:
    return getattr(self, name).value[{axis: index}]

  def encode_layer(self, layer: int, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """Layer ``layer``'s ``{..., embedding}`` MLP input -> ``{..., latents}``."""
    pre = contract("embedding", x, self._at("w_enc", "layer", layer))
    pre = pre + _f32(self._at("b_enc", "layer", layer))
    theta = _f32(self._at("threshold", "layer", layer))
    return pz.nx.nmap(jnp.where)(pre > theta, pre, jnp.zeros((), jnp.float32))

  def encoder(self, layer: int) -> pz.nx.NamedArray:
    """``{embedding, latents}`` encoder of ``layer``."""
    return self._at("w_enc", "layer", layer)

  def encoder_bias(self, layer: int) -> pz.nx.NamedArray:
    """``{latents}`` encoder bias of ``layer``."""
    return self._at("b_enc", "layer", layer)

  def decoder(self, source: int, target: int) -> pz.nx.NamedArray | None:
    """``{latents, embedding}`` decoder of layer ``source`` into ``target``
    (None when ``target < source``)."""
    if target < source:
      return None
    return self.w_dec.value[{"layer": source, "out_layer": target}]

  def bias(self, target: int) -> pz.nx.NamedArray:
    """``{embedding}`` decoder bias of output layer ``target``."""
    return _f32(self._at("b_dec", "out_layer", target))

  def skip(self, target: int, x: pz.nx.NamedArray) -> pz.nx.NamedArray | None:
    """``x · W_skip[target]`` as ``{..., embedding}``, or None without skip."""
    if self.w_skip is None:
      return None
    out = contract("embedding", x, self._at("w_skip", "out_layer", target))
    return out.untag("embedding_out").tag("embedding")

  def decode_layer(
    self, target: int, features: list[pz.nx.NamedArray]
  ) -> pz.nx.NamedArray:
    """``Σ_{l ≤ target} f_l · W_dec[l→target] + b_dec[target]`` (no skip)."""
    out = self.bias(target)
    for source in range(target + 1):
      out = out + contract("latents", features[source], self.decoder(source, target))
    return out

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    """``{layer, ..., embedding}`` inputs -> ``{layer, ..., embedding}`` outputs."""
    n = self.num_layers
    feats = [self.encode_layer(i, x[{"layer": i}]) for i in range(n)]
    outs = []
    for k in range(n):
      out = self.decode_layer(k, feats)
      skip = self.skip(k, x[{"layer": k}])
      outs.append(out if skip is None else out + skip)
    return pz.nx.stack(outs, "layer")

  def treescope_color(self) -> str:
    return "#c58af9"


@pz.pytree_dataclass
class TranscoderSet(pz.nn.Layer):
  """One `Transcoder` per layer, with the `CrossLayerTranscoder` interface.

  Attributes:
    transcoders: The transcoders, layer ``i`` at index ``i``.
    info: Static `CLTInfo` (``kind="transcoders"``).
  """

  transcoders: tuple[Transcoder, ...]
  info: CLTInfo = base.static_field()

  @classmethod
  def of(cls, transcoders: list[Transcoder], source: str = "") -> TranscoderSet:
    """Checks that transcoder ``i`` is for layer ``i`` and sizes agree.

    Raises:
      SAEError: Missing layers, mismatched sizes or non-transcoders.
    """
    if not transcoders:
      raise SAEError("A transcoder set needs at least one transcoder.")
    for i, tc in enumerate(transcoders):
      if not isinstance(tc, Transcoder):
        raise SAEError(f"Entry {i} is a {type(tc).__name__}, not a Transcoder.")
      if tc.info.layer != i:
        layers = [t.info.layer for t in transcoders]
        raise SAEError(
          f"A transcoder set needs layers 0..{len(transcoders) - 1} in order;"
          f" got layers {layers}."
        )
    widths = {t.info.width for t in transcoders}
    dims = {t.info.d_in for t in transcoders}
    if len(dims) != 1:
      raise SAEError(f"Transcoders of one set must share d_model; got {sorted(dims)}.")
    info = CLTInfo(
      num_layers=len(transcoders),
      d_model=dims.pop(),
      width=max(widths),
      site=transcoders[0].info.site,
      out_site=transcoders[0].info.out_site or "mlp.out",
      source=source,
      kind="transcoders",
    )
    return cls(transcoders=tuple(transcoders), info=info)

  @property
  def num_layers(self) -> int:
    return self.info.num_layers

  def encode_layer(self, layer: int, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
    return self.transcoders[layer].encode(x)

  def encoder(self, layer: int) -> pz.nx.NamedArray:
    return self.transcoders[layer].w_enc.value

  def encoder_bias(self, layer: int) -> pz.nx.NamedArray:
    return self.transcoders[layer].b_enc.value

  def decoder(self, source: int, target: int) -> pz.nx.NamedArray | None:
    if source != target:
      return None
    return self.transcoders[source].w_dec.value

  def bias(self, target: int) -> pz.nx.NamedArray:
    return _f32(self.transcoders[target].b_dec.value)

  def skip(self, target: int, x: pz.nx.NamedArray) -> pz.nx.NamedArray | None:
    return self.transcoders[target].skip(x)

  def decode_layer(
    self, target: int, features: list[pz.nx.NamedArray]
  ) -> pz.nx.NamedArray:
    return self.transcoders[target].decode(features[target])

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    outs = [tc(x[{"layer": i}]) for i, tc in enumerate(self.transcoders)]
    return pz.nx.stack(outs, "layer")


# Either kind of dictionary the circuits code accepts.
Dictionary = CrossLayerTranscoder | TranscoderSet
