"""JumpReLU sparse autoencoders and transcoders as Penzai layers.

Axes: an SAE maps an ``{..., embedding}`` activation to ``{..., latents}``
features and back; ``embedding`` is the SAE's input size ``d_in`` (d_model,
or ``heads * projection`` for attention-output SAEs, see
`gemma_surgery.sae.splice`). Other axes (``batch``, ``seq``…) pass through.

The equations are Gemma Scope's (arXiv 2408.05147), with no ``b_dec``
pre-subtraction and no input normalization::

  f     = JumpReLU_θ(x · W_enc + b_enc),   JumpReLU_θ(z) = z · 1[z > θ]
  x_hat = f · W_dec + b_dec                (+ x · W_skip for affine transcoders)

Everything is computed in float32 whatever the parameters' dtype; the
threshold θ is always stored in float32. Weights are ``pz.Parameter`` s
labelled ``sae/<name>/{w_enc,b_enc,w_dec,b_dec,threshold,w_skip}``, so
``pz.unbind_params``, `gemma_surgery.parallel.sharding.shard_model` and treescope see
them like model weights.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery.errors import SAEError
from gemma_surgery.surgery.layers import base

FAMILIES = ("res", "mlp", "att", "transcoder")


@dataclasses.dataclass(frozen=True)
class SAEInfo:
  """Static description of an SAE: what it reads, where it came from.

  Attributes:
    family: ``"res"``, ``"mlp"``, ``"att"`` or ``"transcoder"``.
    layer: The block index it reads (and, for transcoders, writes).
    site: The gemma_surgery site it reads (`gemma_surgery.surgery.sites`).
    d_in: Input size (``embedding`` axis of the SAE).
    width: Number of latents.
    out_site: For transcoders, the site whose activation it replaces.
    d_out: Output size (``d_in`` except for unusual transcoders).
    source: Where it was loaded from (``repo:path`` or a local path).
    release: ``"gemma-scope"``, ``"gemma-scope-2"`` or None.
    l0: The L0 label of the release (``"71"``, ``"medium"``…), if known.
    neuronpedia: Neuronpedia ``model/source`` id, e.g.
      ``"gemma-2-2b/20-gemmascope-res-16k"``, if known. Neuronpedia hosts one
      L0 variant per layer and width; it describes this SAE only when that
      variant is the one loaded.
    hook_in: The Hugging Face hook point it reads (``hf_hook_point_in``).
    hook_out: The Hugging Face hook point a transcoder writes.
  """

  family: str
  layer: int
  site: str
  d_in: int
  width: int
  out_site: str | None = None
  d_out: int | None = None
  source: str = ""
  release: str | None = None
  l0: str | None = None
  neuronpedia: str | None = None
  hook_in: str | None = None
  hook_out: str | None = None

  @property
  def name(self) -> str:
    """A short name: ``res/layer_20/16384`` style."""
    return f"{self.family}/layer_{self.layer}/{self.width}"


def _f32(x: pz.nx.NamedArray) -> pz.nx.NamedArray:
  return x.astype(jnp.float32)


def contract(name: str, left: pz.nx.NamedArray, right: pz.nx.NamedArray) -> Any:
  """Float32 contraction over axis ``name`` at full precision (no TF32/bf16
  passes on accelerators: JumpReLU thresholds are sensitive)."""
  return pz.nx.nmap(jnp.tensordot)(
    _f32(left).untag(name),
    _f32(right).untag(name),
    axes=1,
    precision=jax.lax.Precision.HIGHEST,
  )


# The named axes of each canonical SAE array.
AXES = {
  "w_enc": ("embedding", "latents"),
  "b_enc": ("latents",),
  "w_dec": ("latents", "embedding"),
  "b_dec": ("embedding",),
  "threshold": ("latents",),
  "w_skip": ("embedding", "embedding_out"),
}


# Weight storage dtypes and their usual spellings. Integer dtypes would
# truncate the weights (Gemma Scope's are all below 1 in magnitude: all zeros).
WEIGHT_DTYPES = {
  "float32": ("float32", "fp32", "f32"),
  "bfloat16": ("bfloat16", "bf16"),
  "float16": ("float16", "fp16", "f16"),
}
_DTYPE_NAMES = {
  alias: name for name, aliases in WEIGHT_DTYPES.items() for alias in aliases
}


def weight_dtype(dtype: Any) -> jnp.dtype:
  """The weight storage dtype ``dtype`` names (a name, alias or dtype object).

  Raises:
    SAEError: Not a float dtype the SAE can store its weights in (e.g.
      ``int8``, ``float64``, a misspelling), listing the valid names.
  """
  name = _DTYPE_NAMES.get(dtype.lower()) if isinstance(dtype, str) else None
  if name is None and not isinstance(dtype, str):
    try:
      name = jnp.dtype(dtype).name
    except TypeError:
      name = None
  if name not in WEIGHT_DTYPES:
    valid = ", ".join(f"{n} ({'/'.join(a[1:])})" for n, a in WEIGHT_DTYPES.items())
    raise SAEError(
      f"SAE weight dtype {dtype!r} is not supported; valid: {valid} (or the"
      " matching numpy/jax dtypes). The SAE always computes in float32."
    )
  return jnp.dtype(name)


def storage_dtype(name: str, dtype: Any) -> Any:
  """The dtype array ``name`` is stored in: θ always float32."""
  return jnp.float32 if name == "threshold" else dtype


def _param(value: Any, name: str, prefix: str, dtype: Any) -> pz.Parameter:
  """Parameter ``prefix/name`` from a numpy array, or from a NamedArray with
  the canonical axes that is already placed (e.g. on a mesh) in its dtype."""
  if isinstance(value, pz.nx.NamedArray):
    named = value
  else:
    array = jnp.asarray(np.asarray(value), storage_dtype(name, dtype))
    named = pz.nx.wrap(array).tag(*AXES[name])
  return pz.Parameter(value=named, label=f"{prefix}/{name}")


def _fields(arrays: dict, info: SAEInfo, dtype: Any, prefix: str) -> dict:
  """Constructor fields of `AutoEncoder` (parameters labelled ``prefix/…``)."""
  fields = {
    name: _param(arrays[name], name, prefix, dtype)
    for name in ("w_enc", "b_enc", "w_dec", "b_dec")
  }
  theta = _param(arrays["threshold"], "threshold", prefix, dtype)
  return dict(**fields, activation=JumpReLU(theta), info=info)


@pz.pytree_dataclass
class JumpReLU(pz.nn.Layer):
  """``z · 1[z > θ]`` elementwise over ``latents``.

  Attributes:
    threshold: ``{latents}`` float32 θ.
  """

  threshold: pz.ParameterLike[pz.nx.NamedArray]

  def __call__(self, pre: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    """Applies the JumpReLU to ``{..., latents}`` pre-activations (float32)."""
    pre = _f32(pre)
    theta = _f32(self.threshold.value)
    return pz.nx.nmap(jnp.where)(pre > theta, pre, jnp.zeros((), jnp.float32))


@pz.pytree_dataclass
class AutoEncoder(pz.nn.Layer):
  """A JumpReLU sparse autoencoder; calling it reconstructs its input.

  Attributes:
    w_enc: ``{embedding, latents}`` encoder weights.
    b_enc: ``{latents}`` encoder bias.
    w_dec: ``{latents, embedding}`` decoder weights (row ``i`` is latent
      ``i``'s direction).
    b_dec: ``{embedding}`` decoder bias.
    activation: The `JumpReLU` holding θ.
    info: Static metadata (`SAEInfo`).
  """

  w_enc: pz.ParameterLike[pz.nx.NamedArray]
  b_enc: pz.ParameterLike[pz.nx.NamedArray]
  w_dec: pz.ParameterLike[pz.nx.NamedArray]
  b_dec: pz.ParameterLike[pz.nx.NamedArray]
  activation: JumpReLU
  info: SAEInfo = base.static_field()

  def encode(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """``{..., embedding}`` activations to ``{..., latents}`` features (f32)."""
    pre = contract("embedding", x, self.w_enc.value)
    return self.activation(pre + _f32(self.b_enc.value))

  def decode(self, features: pz.nx.NamedArray) -> pz.nx.NamedArray:
    """``{..., latents}`` features to ``{..., embedding}`` output (f32)."""
    out = contract("latents", features, self.w_dec.value)
    return out + _f32(self.b_dec.value)

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    """The reconstruction ``decode(encode(x))`` (float32)."""
    return self.decode(self.encode(x))

  @property
  def width(self) -> int:
    return self.info.width

  @property
  def d_in(self) -> int:
    return self.info.d_in

  @classmethod
  def from_arrays(
    cls,
    arrays: dict[str, np.ndarray],
    info: SAEInfo,
    *,
    dtype: Any = jnp.float32,
    name: str | None = None,
  ) -> AutoEncoder:
    """Builds the layer from numpy arrays with the canonical names.

    Args:
      arrays: ``w_enc [d, F]``, ``w_dec [F, d]``, ``b_enc [F]``, ``b_dec
        [d]``, ``threshold [F]`` (and ``w_skip [d, d]`` for a `Transcoder`);
        shapes are assumed checked (`gemma_surgery.sae.files.check_arrays`).
        Each may also be a NamedArray with the axes of `AXES`, already in its
        storage dtype (`storage_dtype`) and placed, e.g. on a mesh.
      info: Metadata.
      dtype: Storage dtype of the weights (θ is always float32).
      name: Label prefix, default ``info.source`` or ``info.name``.

    Raises:
      SAEError: ``dtype`` is not a float dtype (`weight_dtype`).
    """
    dtype = weight_dtype(dtype)
    return cls(
      **_fields(arrays, info, dtype, f"sae/{name or info.source or info.name}")
    )

  def treescope_color(self) -> str:
    return "#c58af9"


@pz.pytree_dataclass(
  has_implicitly_inherited_fields=True
)  # pytype: disable=wrong-keyword-args
class Transcoder(AutoEncoder):
  """A JumpReLU transcoder: reads one site, predicts another.

  ``__call__(x) = decode(encode(x)) + x · W_skip`` (the skip term only for
  affine transcoders). `decode` alone never includes the skip term, which
  depends on the input, not on the features.

  Attributes:
    w_skip: Optional ``{embedding, embedding_out}`` affine skip connection
      (``x̂ += x · W_skip``), or None.
  """

  w_skip: pz.ParameterLike[pz.nx.NamedArray] | None = None

  @classmethod
  def from_arrays(
    cls,
    arrays: dict[str, np.ndarray],
    info: SAEInfo,
    *,
    dtype: Any = jnp.float32,
    name: str | None = None,
  ) -> Transcoder:
    """As `AutoEncoder.from_arrays`, plus the optional ``w_skip``."""
    dtype = weight_dtype(dtype)
    prefix = f"sae/{name or info.source or info.name}"
    skip = arrays.get("w_skip")
    if skip is not None:
      skip = _param(skip, "w_skip", prefix, dtype)
    return cls(**_fields(arrays, info, dtype, prefix), w_skip=skip)

  def skip(self, x: pz.nx.NamedArray) -> pz.nx.NamedArray | None:
    """``x · W_skip`` as ``{..., embedding}`` (f32), or None without skip."""
    if self.w_skip is None:
      return None
    out = contract("embedding", x, self.w_skip.value)
    return out.untag("embedding_out").tag("embedding")

  def __call__(self, x: pz.nx.NamedArray, /, **side_inputs) -> pz.nx.NamedArray:
    """The predicted output activation (float32)."""
    out = self.decode(self.encode(x))
    skip = self.skip(x)
    return out if skip is None else out + skip
