"""Splicing a cross-layer transcoder (or a transcoder set) into a model.

    spliced = splice_clt(model, clt)                        # reconstruction
    exact = splice_clt(model, clt, use_error_term=True)     # clean output...
    steered = splice_clt(model, clt, use_error_term=True,   # ...plus edits
                         edits={2: feature_edits(clt, clamp={7: 5.0})})
    spliced, feats = splice_clt(model, clt, capture_features=True)
    spliced(tokens); feats["sae.features", 2]               # {batch, seq, latents}

A pure rewrite. A CLT's encoder ``l`` reads ``mlp.in[l]`` and its decoders
write every later layer's ``mlp.out``. Two layers per model layer are
inserted: `CLTEncode` at ``mlp.in[l]`` computes ``f_l`` and adds its
decoded contribution ``g_l · W_dec[l→k]`` for every ``k ≥ l`` to a pending
``{out_layer, ..., embedding}`` sum held in a ``pz.StateVariable``;
`CLTDecode` at ``mlp.out[k]`` reads slice ``k`` of that sum (and resets it to
None after the last layer, so jitted and generation loops see a fixed state
structure). The activation ``y_k`` at ``mlp.out[k]`` becomes:

* without the error term: ``Σ_{l≤k} edit(f_l) · W_dec[l→k] + b_dec[k]``
  ``(+ mlp.in[k] · W_skip[k])`` — the CLT's reconstruction;
* with ``use_error_term=True``: ``y_k + Σ_{l≤k} (edit(f_l) − f_l) ·
  W_dec[l→k]``, i.e. reconstruction plus the error ``y_k −
  reconstruction``. Without edits that is exactly ``y_k``.

A `TranscoderSet` is spliced as one `splice_sae` per layer with the same
options (transcoder ``l`` reads ``mlp.in[l]`` and writes ``mlp.out[l]``).
Position 0 (BOS) and padding pass through unless ``include_bos=True``, as
for SAEs. `shard_sae` shards a CLT along ``latents`` like an SAE.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.sae.autoencoders import contract
from gemma_surgery.sae.clt import CrossLayerTranscoder, Dictionary, TranscoderSet
from gemma_surgery.sae.edits import FeatureEdits
from gemma_surgery.sae.splice import FEATURES_SITE, splice_sae
from gemma_surgery.surgery import checks, sites
from gemma_surgery.surgery.captures import Captures
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.capture import SaveIntermediate

_SPLICES = itertools.count()


@pz.pytree_dataclass
class CLTEncode(base.SurgeryLayer):
  """At ``mlp.in[layer]``: encodes, and queues the decoded contributions.

  Input and output: the ``{batch, seq, embedding}`` MLP input (unchanged).
  Side inputs: ``token_positions`` (and ``generation_prompt_end`` for
  ``positions="generated"``).

  Attributes:
    clt: The `CrossLayerTranscoder`.
    pending: State variable holding the ``{out_layer, batch, seq,
      embedding}`` float32 sum of contributions queued so far (or None).
    edits: Optional `FeatureEdits` of this layer's latents.
    features: Optional `SaveIntermediate` receiving ``{batch, seq,
      latents}`` features (before edits; zero where the splice doesn't apply).
    layer: Layer index (static).
    use_error_term: Queue ``(edit(f) − f) · W_dec`` only (static).
    include_bos: Also splice position 0 (static).
    positions: ``"all"``, ``"prompt"`` or ``"generated"`` (static).
  """

  clt: CrossLayerTranscoder
  pending: pz.StateVariable
  edits: FeatureEdits | None = None
  features: SaveIntermediate | None = None
  layer: int = base.static_field(0)
  use_error_term: bool = base.static_field(False)
  include_bos: bool = base.static_field(False)
  positions: str = base.static_field("all")

  def _queue(self, contribution: pz.nx.NamedArray) -> None:
    if self.pending.value is None:
      self.pending.value = contribution
    else:
      self.pending.value = self.pending.value + contribution

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    if self.use_error_term and self.edits is None and self.features is None:
      return value  # Contributes (f − f) · W_dec: nothing.
    base.check_rows(self.edits, value)
    x = value.astype(jnp.float32)
    f = self.clt.encode_layer(self.layer, x)
    mask = base.phase_mask(
      self.positions, side_inputs, value, skip_bos=not self.include_bos
    )
    if mask is not None:
      f = pz.nx.nmap(jnp.where)(mask, f, 0.0)
    if self.features is not None:
      self.features(f, **side_inputs)
    edited = f if self.edits is None else self.edits(f)
    if self.use_error_term:
      if self.edits is None:
        return value
      edited = edited - f
    n = self.clt.num_layers
    w_dec = self.clt.w_dec.value[{"layer": self.layer}]
    later = pz.nx.wrap(jnp.arange(n) >= self.layer).tag("out_layer")
    queued = contract("latents", edited, w_dec)
    queued = pz.nx.nmap(jnp.where)(later, queued, 0.0)
    if not self.use_error_term:
      skip = self.clt.skip(self.layer, x)
      if skip is not None:
        here = pz.nx.wrap(jnp.arange(n) == self.layer).tag("out_layer")
        if mask is not None:
          here = here & mask
        queued = queued + pz.nx.nmap(jnp.where)(here, skip, 0.0)
    self._queue(queued)
    return value

  def treescope_color(self) -> str:
    return "#c58af9"


@pz.pytree_dataclass
class CLTDecode(base.SurgeryLayer):
  """At ``mlp.out[layer]``: replaces the MLP output with the CLT's output.

  Input and output: the ``{batch, seq, embedding}`` MLP output. Side inputs
  as `CLTEncode`.

  Attributes:
    clt: The `CrossLayerTranscoder` (for ``b_dec``).
    pending: The state variable `CLTEncode` layers fill.
    layer: Layer index (static).
    last: Whether this is the last layer (resets ``pending``) (static).
    use_error_term: Output ``y + pending[layer]`` (static).
    include_bos: Also splice position 0 (static).
    positions: ``"all"``, ``"prompt"`` or ``"generated"`` (static).
  """

  clt: CrossLayerTranscoder
  pending: pz.StateVariable
  layer: int = base.static_field(0)
  last: bool = base.static_field(False)
  use_error_term: bool = base.static_field(False)
  include_bos: bool = base.static_field(False)
  positions: str = base.static_field("all")

  def __call__(self, value: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    pending = self.pending.value
    if self.last:
      self.pending.value = None
    if pending is None:
      if not self.use_error_term:
        raise errors.SAEError(
          f"CLT output at mlp.out[{self.layer}] found no input: its CLTEncode"
          " layers at mlp.in are missing or did not run first."
        )
      return value
    y = value.astype(jnp.float32)
    queued = pending[{"out_layer": self.layer}]
    if self.use_error_term:
      return (y + queued).astype(value.dtype)
    new = queued + self.clt.bias(self.layer)
    mask = base.phase_mask(
      self.positions, side_inputs, value, skip_bos=not self.include_bos
    )
    if mask is not None:
      new = pz.nx.nmap(jnp.where)(mask, new, y)
    return new.astype(value.dtype)

  def treescope_color(self) -> str:
    return "#c58af9"


def check_clt_fits(model: Any, dictionary: Dictionary) -> None:
  """Raises `SAEError` unless ``dictionary`` covers ``model``'s MLP layers."""
  if not isinstance(dictionary, CrossLayerTranscoder | TranscoderSet):
    raise errors.SAEError(
      "splice_clt needs a CrossLayerTranscoder or TranscoderSet (load_clt,"
      f" load_transcoders); got {type(dictionary).__name__}."
    )
  info = dictionary.info
  n = sites.num_layers(model)
  if info.num_layers != n:
    raise errors.SAEError(
      f"The {info.kind} {info.source!r} covers {info.num_layers} layers; the"
      f" model has {n}."
    )
  if (info.site, info.out_site) != ("mlp.in", "mlp.out"):
    raise errors.SAEError(
      f"{info.source!r} reads {info.site} and writes {info.out_site}; splice_clt"
      " supports mlp.in -> mlp.out."
    )
  for site in ("mlp.in", "mlp.out"):
    have = checks.flat_width(model, site)
    if have != info.d_model:
      raise errors.SAEError(
        f"The {info.kind} {info.source!r} has d_model {info.d_model}, but site"
        f" {site!r} of this model has {have} dimensions."
      )


def _check_edits(
  dictionary: Dictionary, edits: Mapping[int, FeatureEdits] | None
) -> dict[int, FeatureEdits]:
  if edits is None:
    return {}
  if not isinstance(edits, Mapping):
    raise errors.SAEError(
      "CLT edits are a {layer: FeatureEdits} mapping (feature_edits(clt, ...)"
      f" per layer); got {type(edits).__name__}."
    )
  n = dictionary.num_layers
  for layer, edit in edits.items():
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < n:
      raise errors.SAEError(f"Edit layer {layer!r} is not one of 0..{n - 1}.")
    width = dictionary.info.width
    if isinstance(dictionary, TranscoderSet):
      width = dictionary.transcoders[layer].info.width
    if not isinstance(edit, FeatureEdits) or edit.width != width:
      got = edit.width if isinstance(edit, FeatureEdits) else type(edit).__name__
      raise errors.SAEError(
        f"edits[{layer}] must be FeatureEdits for {width} latents; got {got}."
      )
  return dict(edits)


def splice_clt(
  model: Any,
  dictionary: Dictionary,
  *,
  use_error_term: bool = False,
  include_bos: bool = False,
  capture_features: bool = False,
  edits: Mapping[int, FeatureEdits] | None = None,
  positions: str = "all",
) -> Any | tuple[Any, Captures]:
  """Splices a CLT or transcoder set into every MLP of a model; pure.

  Args:
    model: A Penzai Gemma LM (not modified), possibly patched.
    dictionary: A `CrossLayerTranscoder` or `TranscoderSet` covering every
      layer (encoders read ``mlp.in``, decoders write ``mlp.out``).
    use_error_term: Keep the error: each ``mlp.out`` is the clean value plus
      the decoded effect of ``edits`` (see the module doc).
    include_bos: Splice position 0 too (default: BOS passes unchanged).
    capture_features: Also return a `Captures` of the features, keyed
      ``("sae.features", layer)`` for every layer.
    edits: ``{layer: FeatureEdits}`` (from ``feature_edits(dictionary, ...)``).
    positions: ``"all"``, ``"prompt"`` or ``"generated"`` tokens.

  Returns:
    The spliced model, or ``(model, captures)`` with ``capture_features=True``.

  Raises:
    SAEError: The dictionary doesn't cover the model's layers or d_model, or
      the edits are malformed.
  """
  check_clt_fits(model, dictionary)
  edit_of = _check_edits(dictionary, edits)
  if positions not in base.POSITIONS:
    raise errors.SAEError(f"positions={positions!r}; valid: {base.POSITIONS}.")
  n = dictionary.num_layers
  options = dict(
    use_error_term=use_error_term, include_bos=include_bos, positions=positions
  )
  if isinstance(dictionary, TranscoderSet):
    merged = Captures({}, n)
    for tc in dictionary.transcoders:
      layer = tc.info.layer
      out = splice_sae(
        model,
        tc,
        capture_features=capture_features,
        edits=edit_of.get(layer),
        **options,
      )
      model, captures = out if capture_features else (out, None)
      if captures is not None:
        merged = merged | captures
    return (model, merged) if capture_features else model
  prefix = f"clt/{dictionary.info.source or 'clt'}"
  suffix = next(_SPLICES)
  pending = pz.StateVariable(value=None, label=f"{prefix}/pending_{suffix}")
  savers = {}
  if capture_features:
    for layer in range(n):
      savers[FEATURES_SITE, layer] = SaveIntermediate(
        saved=pz.StateVariable(value=None, label=f"{prefix}/features{layer}_{suffix}"),
        site=FEATURES_SITE,
        layer=layer,
      )

  def encoder(layer: int) -> CLTEncode:
    return CLTEncode(
      clt=dictionary,
      pending=pending,
      edits=edit_of.get(layer),
      features=savers.get((FEATURES_SITE, layer)),
      layer=layer,
      **options,
    )

  def decoder(layer: int) -> CLTDecode:
    return CLTDecode(
      clt=dictionary, pending=pending, layer=layer, last=layer == n - 1, **options
    )

  model = sites.insert(model, "mlp.in", None, encoder)
  model = sites.insert(model, "mlp.out", None, decoder)
  return (model, Captures(savers, n)) if capture_features else model
