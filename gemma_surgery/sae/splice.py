"""Splicing SAEs and transcoders into a model: pure rewrites.

    spliced = splice_sae(model, sae)                          # reconstruction
    exact = splice_sae(model, sae, use_error_term=True)       # clean output...
    steered = splice_sae(model, sae, use_error_term=True,     # ...plus edits
                         edits=feature_edits(sae, clamp={3124: 150.0}))
    spliced, feats = splice_sae(model, sae, capture_features=True)
    spliced(tokens); feats.value()                            # {batch, seq, latents}
    feats["sae.features", sae.info.layer]                     # the same
    gs.unpatch(spliced)                                       # removes it all

At the SAE's site and layer, the activation ``x`` becomes:

* without the error term: ``decode(edit(f))`` with ``f = encode(x)``;
* with ``use_error_term=True``: ``x + (decode(edit(f)) − decode(f))``,
  computed as ``x + (edit(f) − f) · W_dec`` (``b_dec`` cancels). Without
  edits this is exactly ``x``, so everything downstream is bit-identical to
  the clean model, while feature edits still propagate.

Tokens at position 0 (BOS: Gemma Scope SAEs were not trained on it) and
padding (position −1) pass through unchanged unless ``include_bos=True``;
positions come from the ``token_positions`` side input, so this holds under
KV caching and left padding. ``positions="prompt"``/``"generated"`` restricts
the splice further (see `gemma_surgery.surgery.layers.base`).

Attention SAEs (site ``attn.z``) read z flattened head-major: ``embedding``
index ``head * head_dim + p`` over the user-facing ``heads`` axis (see
`gemma_surgery.surgery.heads`); the output is split back to Penzai's native head axes.

Transcoders read one site and replace another. Two layers are inserted:
`TranscoderInput` at the input site stores the activation in a
``pz.StateVariable`` shared with `TranscoderOutput` at the output site, which
reads it, resets it to None (so the variable is None between calls: jitted
and fused-generation loops see a fixed state structure) and replaces its
activation with the transcoder's prediction (``+ x_in · W_skip`` for affine
transcoders), or with ``y + (edit(f) − f) · W_dec`` with the error term.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Literal, overload

import jax.numpy as jnp
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.sae.autoencoders import AutoEncoder, Transcoder, contract
from gemma_surgery.sae.edits import FeatureEdits
from gemma_surgery.surgery import checks, heads, sites
from gemma_surgery.surgery.captures import Captures
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.capture import SaveIntermediate

# Order of the per-layer sites an SAE can read or write, within a block.
_READABLE = ("resid_pre", "attn.z", "attn.out", "resid_mid", "mlp.in_unscaled")
_READABLE += ("mlp.in", "mlp.out", "resid_post")
# The capture key of an SAE's features in `Captures`.
FEATURES_SITE = "sae.features"
# Suffixes keeping state variable labels unique when an SAE is spliced twice.
_SPLICES = itertools.count()


def flatten_heads(site: str, value: pz.nx.NamedArray) -> pz.nx.NamedArray:
  """The SAE input at ``site``: at ``attn.z``, ``{heads, projection}`` ->
  ``{embedding}`` with index ``head * head_dim + p``; elsewhere unchanged."""
  if site != "attn.z":
    return value
  z = heads.to_user_heads(value)
  flat = pz.nx.nmap(lambda a: a.reshape(-1))(z.untag("heads", "projection"))
  return flat.tag("embedding")


def unflatten_heads(
  site: str, value: pz.nx.NamedArray, like: pz.nx.NamedArray
) -> pz.nx.NamedArray:
  """Inverse of `flatten_heads`, to ``like``'s native head layout."""
  if site != "attn.z":
    return value
  num_heads = heads.to_user_heads(like).named_shape["heads"]
  split = pz.nx.nmap(lambda a: a.reshape(num_heads, -1))(value.untag("embedding"))
  return heads.to_native_heads(split.tag("heads", "projection"), dict(like.named_shape))


def _spliced(
  sae: AutoEncoder,
  features: pz.nx.NamedArray,
  target: pz.nx.NamedArray,
  edits: FeatureEdits | None,
  use_error_term: bool,
  skip: pz.nx.NamedArray | None = None,
) -> pz.nx.NamedArray:
  """The new (float32, flat) activation replacing ``target``."""
  if use_error_term:
    if edits is None:
      return target
    return target + contract("latents", edits(features) - features, sae.w_dec.value)
  out = sae.decode(features if edits is None else edits(features))
  return out if skip is None else out + skip


def _finish(
  layer: Any,
  value: pz.nx.NamedArray,
  target: pz.nx.NamedArray,
  new: pz.nx.NamedArray,
  features: pz.nx.NamedArray,
  side_inputs: dict,
) -> pz.nx.NamedArray:
  """Masks positions, stores features, restores the site's layout and dtype."""
  mask = base.phase_mask(
    layer.positions, side_inputs, value, skip_bos=not layer.include_bos
  )
  if mask is not None:
    new = pz.nx.nmap(jnp.where)(mask, new, target)
    features = pz.nx.nmap(jnp.where)(mask, features, 0.0)
  if layer.features is not None:
    layer.features(features, **side_inputs)
  return unflatten_heads(layer.site, new, value).astype(value.dtype)


@pz.pytree_dataclass
class SpliceSAE(base.SurgeryLayer):
  """Replaces the activation at a site with an SAE's reconstruction.

  Input and output are the site's activation (``{batch, seq, embedding}``, or
  native heads × ``projection`` at ``attn.z``). Side inputs:
  ``token_positions`` (and ``generation_prompt_end`` for
  ``positions="generated"``).

  Attributes:
    sae: The `AutoEncoder`.
    edits: Optional `FeatureEdits` (array leaves).
    features: Optional `SaveIntermediate` receiving ``{batch, seq, latents}``
      features (before edits; zero where the splice doesn't apply).
    site: Site name (static).
    layer: Layer index (static).
    use_error_term: Output ``x + (edit(f) − f) · W_dec`` (static).
    include_bos: Also splice position 0 (static).
    positions: ``"all"``, ``"prompt"`` or ``"generated"`` (static).
  """

  sae: AutoEncoder
  edits: FeatureEdits | None = None
  features: SaveIntermediate | None = None
  site: str = base.static_field("resid_post")
  layer: int = base.static_field(0)
  use_error_term: bool = base.static_field(False)
  include_bos: bool = base.static_field(False)
  positions: str = base.static_field("all")

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    if self.use_error_term and self.edits is None and self.features is None:
      return value  # x + (decode(f) - decode(f)): nothing to compute.
    base.check_rows(self.edits, value)
    x = flatten_heads(self.site, value).astype(jnp.float32)
    f = self.sae.encode(x)
    new = _spliced(self.sae, f, x, self.edits, self.use_error_term)
    return _finish(self, value, x, new, f, side_inputs)

  def treescope_color(self) -> str:
    return "#c58af9"


@pz.pytree_dataclass
class TranscoderInput(base.SurgeryLayer):
  """Hands the activation at a transcoder's input site to `TranscoderOutput`.

  Attributes:
    channel: State variable shared with the `TranscoderOutput` layer.
    site: Input site (static).
    layer: Layer index (static).
  """

  channel: pz.StateVariable
  site: str = base.static_field("mlp.in")
  layer: int = base.static_field(0)

  def __call__(self, value: Any, /, **side_inputs) -> Any:
    self.channel.value = value
    return value


@pz.pytree_dataclass
class TranscoderOutput(base.SurgeryLayer):
  """Replaces the output site's activation with a transcoder's prediction.

  Reads (and resets to None) the input stored by `TranscoderInput`. Fields as
  `SpliceSAE`, plus ``channel``; ``site`` is the output site. With the error
  term the output is ``y + (edit(f) − f) · W_dec`` for the true activation
  ``y``; without it ``decode(edit(f)) + x_in · W_skip``.
  """

  sae: Transcoder
  channel: pz.StateVariable
  edits: FeatureEdits | None = None
  features: SaveIntermediate | None = None
  site: str = base.static_field("mlp.out")
  layer: int = base.static_field(0)
  use_error_term: bool = base.static_field(False)
  include_bos: bool = base.static_field(False)
  positions: str = base.static_field("all")

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    x_in = self.channel.value
    if x_in is None:
      raise errors.SAEError(
        f"Transcoder output at {self.site}[{self.layer}] found no input: its"
        f" TranscoderInput layer at {self.sae.info.site}[{self.layer}] is"
        " missing or did not run first."
      )
    self.channel.value = None
    if self.use_error_term and self.edits is None and self.features is None:
      return value
    base.check_rows(self.edits, value)
    x_in = flatten_heads(self.sae.info.site, x_in).astype(jnp.float32)
    y = flatten_heads(self.site, value).astype(jnp.float32)
    f = self.sae.encode(x_in)
    skip = None if self.use_error_term else self.sae.skip(x_in)
    new = _spliced(self.sae, f, y, self.edits, self.use_error_term, skip)
    return _finish(self, value, y, new, f, side_inputs)

  def treescope_color(self) -> str:
    return "#c58af9"


def check_fits(model: Any, sae: AutoEncoder) -> None:
  """Raises `SAEError` unless ``sae`` can be spliced into ``model``."""
  info = sae.info
  where = info.source or info.name
  wanted = [("input", info.site, info.d_in)]
  if isinstance(sae, Transcoder):
    wanted.append(("output", info.out_site, info.d_out or info.d_in))
    if info.out_site not in _READABLE or info.site not in _READABLE:
      raise errors.SAEError(f"{where}: unsupported transcoder sites {wanted}.")
    if _READABLE.index(info.site) >= _READABLE.index(info.out_site):
      raise errors.SAEError(
        f"{where}: a transcoder must read a site ({info.site}) before the"
        f" site it writes ({info.out_site})."
      )
  n = sites.num_layers(model)
  if not 0 <= info.layer < n:
    raise errors.SAEError(
      f"{where}: the SAE is for layer {info.layer}, but the model has {n}"
      f" layers (0..{n - 1})."
    )
  for role, site, size in wanted:
    if site not in _READABLE:
      raise errors.SAEError(
        f"{where}: site {site!r} is not one an SAE can read; valid:"
        f" {', '.join(_READABLE)}."
      )
    have = checks.flat_width(model, site, info.layer)
    if size != have:
      raise errors.SAEError(
        f"{where}: SAE {role} size is {size}, but site {site!r} of this model"
        f" has {have} dimensions (d_model={model.metadata.embedding_dim})."
      )


def _check_edits(sae: AutoEncoder, edits: FeatureEdits | None) -> None:
  if edits is not None and (
    not isinstance(edits, FeatureEdits) or edits.width != sae.info.width
  ):
    got = edits.width if isinstance(edits, FeatureEdits) else type(edits).__name__
    raise errors.SAEError(
      f"edits must be FeatureEdits for {sae.info.width} latents (from"
      f" feature_edits(sae, ...)); got {got}."
    )


@overload
def splice_sae(
  model: Any,
  sae: AutoEncoder,
  *,
  use_error_term: bool = ...,
  include_bos: bool = ...,
  capture_features: Literal[False] = ...,
  edits: FeatureEdits | None = ...,
  positions: str = ...,
) -> Any: ...


@overload
def splice_sae(
  model: Any,
  sae: AutoEncoder,
  *,
  use_error_term: bool = ...,
  include_bos: bool = ...,
  capture_features: Literal[True],
  edits: FeatureEdits | None = ...,
  positions: str = ...,
) -> tuple[Any, Captures]: ...


def splice_sae(
  model: Any,
  sae: AutoEncoder,
  *,
  use_error_term: bool = False,
  include_bos: bool = False,
  capture_features: bool = False,
  edits: FeatureEdits | None = None,
  positions: str = "all",
) -> Any | tuple[Any, Captures]:
  """Splices an SAE (or transcoder) into a model at its site and layer.

  Args:
    model: A Penzai Gemma LM (not modified), possibly patched; convert it to
      ``KVCachingTransformerLM`` afterwards for decoding.
    sae: An `AutoEncoder` or `Transcoder` (e.g. from `load_sae`).
    use_error_term: Keep the SAE error: the output is exactly the clean
      activation plus the effect of ``edits`` (see the module doc).
    include_bos: Splice at position 0 too (default: BOS passes unchanged).
    capture_features: Also return a `Captures` of the features (key
      ``("sae.features", layer)``; ``captures.value()`` reads them).
    edits: `FeatureEdits` (clamp/ablate/scale latents).
    positions: ``"all"``, ``"prompt"`` or ``"generated"`` tokens.

  Returns:
    The spliced model, or ``(model, captures)`` with ``capture_features=True``.

  Raises:
    SAEError: The SAE's layer, site or size doesn't fit the model, or the
      edits are for another width.
  """
  check_fits(model, sae)
  _check_edits(sae, edits)
  if positions not in base.POSITIONS:
    raise errors.SAEError(f"positions={positions!r}; valid: {base.POSITIONS}.")
  info = sae.info
  prefix = f"sae/{info.source or info.name}"
  suffix = next(_SPLICES)
  saver = None
  if capture_features:
    saver = SaveIntermediate(
      saved=pz.StateVariable(value=None, label=f"{prefix}/features_{suffix}"),
      site=FEATURES_SITE,
      layer=info.layer,
    )
  common = dict(
    sae=sae,
    edits=edits,
    features=saver,
    layer=info.layer,
    use_error_term=use_error_term,
    include_bos=include_bos,
    positions=positions,
  )
  if isinstance(sae, Transcoder):
    channel = pz.StateVariable(value=None, label=f"{prefix}/input_{suffix}")
    model = sites.insert(
      model,
      info.site,
      info.layer,
      lambda i: TranscoderInput(channel=channel, site=info.site, layer=i),
    )
    layer = TranscoderOutput(channel=channel, site=info.out_site, **common)
    model = sites.insert(model, info.out_site, info.layer, lambda _: layer)
  else:
    layer = SpliceSAE(site=info.site, **common)
    model = sites.insert(model, info.site, info.layer, lambda _: layer)
  if not capture_features:
    return model
  return model, Captures({(FEATURES_SITE, info.layer): saver}, sites.num_layers(model))


def set_edits(model: Any, edits: FeatureEdits | None, sae: Any = None) -> Any:
  """Replaces the edits of spliced SAEs (all, or those of ``sae``); pure.

  Edits are array leaves: a jitted model with new edits reuses its compile.
  """
  layers = pz.select(model).at_instances_of(SpliceSAE | TranscoderOutput)
  if sae is not None:
    layers = layers.where(lambda layer: layer.sae.info == sae.info)
  for layer in layers.get_sequence():
    _check_edits(layer.sae, edits)
  return layers.apply(lambda layer: dataclasses.replace(layer, edits=edits))
