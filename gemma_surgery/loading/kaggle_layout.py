"""Layouts of Kaggle/Flax Gemma checkpoints and their canonical mapping.

The official Flax checkpoints (Kaggle, GCS) are orbax PyTree checkpoints written
by the ``gemma`` library in one of three layouts. All three are reduced here to
one dict of *per-layer module names* (``"layer_3/attn/q_einsum"``) pointing at
a `Ref` to a leaf of the orbax tree, before anything is read:

* FLAT (Gemma 1/2/3 releases): top-level keys hold module paths,
  ``{"transformer/layer_0/attn/q_einsum": {"w": array}, ...}``.
* NESTED (``gemma`` PyPI library, Flax ``model.init`` structure):
  ``{"transformer": {"layer_0": {"attn": {"q_einsum": {"w": array}}, "mlp":
  {"gating_einsum": array, "linear": array}}}}``; MLP weights lack the ``"w"``
  level and the outer ``"transformer"`` key may be absent.
* STACKED (``gemma`` library, Gemma 3): layers sharing a position in the
  attention pattern are stacked on a new leading axis,
  ``"transformer/stacked_layers/attention_type_{p}/attn/q_einsum": {"w":
  [S, N, D, H]}``, where slice ``s`` is layer ``s * P + p`` and ``P`` (the
  pattern length) is the number of ``attention_type_*`` groups, so the groups
  may hold different numbers of slices when ``P`` does not divide the layer
  count. This follows ``gemma.gm.ckpts._compat.stack_params``. As an
  extension, ``stacked_layers/<module>`` without ``attention_type_*`` is read
  as ``P = 1`` (slice ``s`` is layer ``s``). Flat and nested spellings of the
  stacked keys are both accepted.

Module names drop the ``transformer/`` prefix and a trailing ``w``/``scale``
parameter name. Kaggle modules map to the canonical names of
`gemma_surgery.loading.params` (N query heads, K kv heads, D embedding, H head
dim, F MLP width)::

  embedder/input_embedding     [V, D]                  -> embedder
  final_norm                   [D]                     -> final_norm
  layer_i/{pre,post}_{attention,ffw}_norm  [D]         -> same names
  layer_i/attn/q_einsum        [N, D, H]               -> attn/q
  layer_i/attn/kv_einsum       [2, K, D, H] or [2, D, H] (MQA, squeezed)
                                                       -> attn/k = w[0], attn/v = w[1]
  layer_i/attn/qkv_einsum      [3, N, D, H] (MHA)      -> attn/q, attn/k, attn/v
  layer_i/attn/attn_vec_einsum [N, H, D]               -> attn/o
  layer_i/attn/_query_norm, _key_norm  [H]             -> attn/query_norm, key_norm
  layer_i/mlp/gating_einsum    [2, D, F] or transposed [2, F, D]
                                                       -> mlp/gate = w[0], mlp/up = w[1]
  layer_i/mlp/linear           [F, D]                  -> mlp/down

Norm weights are copied as stored (the model applies ``1 + scale``). Other
keys outside the layers (vision tower ``SigLiPFromPatches_0/...``, multimodal
``embedder/mm_*``) are ignored and never read; unknown keys inside a layer are
an error, since silently dropping them would give a wrong model.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from gemma_surgery import errors
from gemma_surgery.config import GemmaConfig

TreePath = tuple[str, ...]

_PARAM_NAMES = ("w", "scale")
_STACKED = re.compile(r"^stacked_layers/(?:attention_type_(\d+)/)?(.+)$")
_LAYER = re.compile(r"^layer_(\d+)/(.+)$")
NORMS = ("pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")
LAYER_MODULES = frozenset(
  (
    *NORMS,
    "attn/q_einsum",
    "attn/kv_einsum",
    "attn/qkv_einsum",
    "attn/attn_vec_einsum",
    "attn/_query_norm",
    "attn/_key_norm",
    "mlp/gating_einsum",
    "mlp/linear",
  )
)


@dataclasses.dataclass(frozen=True)
class Ref:
  """Where one module's weight lives in the orbax tree.

  Attributes:
    path: Keys of the leaf in the (restored or metadata) tree.
    shape: Shape of this module's weight, without a stacked layer axis.
    dtype: Stored dtype.
    index: For the stacked layout, the slice of the leaf's leading axis.
  """

  path: TreePath
  shape: tuple[int, ...]
  dtype: np.dtype
  index: int | None = None

  @property
  def key(self) -> str:
    """The leaf's name as orbax spells it in messages."""
    where = "/".join(self.path)
    return where if self.index is None else f"{where}[{self.index}]"

  def take(self, leaf: np.ndarray) -> np.ndarray:
    """This module's weight from the restored leaf."""
    return leaf if self.index is None else leaf[self.index]

  def proxy(self) -> np.ndarray:
    """A zero-memory stand-in with this shape, to check shapes before reading."""
    return np.broadcast_to(np.zeros((), self.dtype), self.shape)


def flatten_tree(tree: Mapping[str, Any], prefix: TreePath = ()) -> Iterator:
  """Yields ``(path, leaf)`` for every array-like leaf (anything with a shape)."""
  for key, value in tree.items():
    path = (*prefix, str(key))
    if isinstance(value, Mapping):
      yield from flatten_tree(value, path)
    elif hasattr(value, "shape"):
      yield path, value


def module_name(path: TreePath) -> str:
  """``("transformer/layer_0/attn/q_einsum", "w")`` -> ``"layer_0/attn/q_einsum"``."""
  parts = "/".join(path).split("/")
  if parts[0] == "transformer":
    parts = parts[1:]
  if len(parts) > 1 and parts[-1] in _PARAM_NAMES:
    parts = parts[:-1]
  return "/".join(parts)


def _add(entries: dict[str, Ref], name: str, ref: Ref, source: str) -> None:
  if name in entries:
    raise errors.CheckpointError(
      f"{source}: {name!r} is stored twice, as {entries[name].key!r} and"
      f" {ref.key!r}; the checkpoint mixes layouts."
    )
  entries[name] = ref


def layout_entries(tree: Mapping[str, Any], source: str) -> dict[str, Ref]:
  """Per-layer module names of a flat, nested or stacked tree (see module doc).

  Args:
    tree: The orbax tree; leaves need only ``shape`` and ``dtype`` (arrays,
      orbax ``ArrayMetadata`` or ``jax.ShapeDtypeStruct``).
    source: Where the tree came from, for error messages.

  Raises:
    CheckpointError: Duplicate or malformed stacked entries.
  """
  entries: dict[str, Ref] = {}
  stacked = []
  for path, leaf in flatten_tree(tree):
    name = module_name(path)
    match = _STACKED.match(name)
    if match is None:
      _add(entries, name, Ref(path, tuple(leaf.shape), np.dtype(leaf.dtype)), source)
    else:
      stacked.append((path, leaf, match.group(1), match.group(2)))
  typed = {group is not None for _, _, group, _ in stacked}
  if len(typed) > 1:
    raise errors.CheckpointError(
      f"{source}: stacked_layers mixes keys with and without"
      " 'attention_type_<p>'; cannot tell which layer each slice is."
    )
  period = 1 + max((int(g) for _, _, g, _ in stacked if g is not None), default=0)
  for path, leaf, group, suffix in stacked:
    if not leaf.shape:
      raise errors.CheckpointError(
        f"{source}: stacked weight {'/'.join(path)!r} is a scalar; it needs a"
        " leading layer axis."
      )
    offset = int(group or 0)
    for s in range(leaf.shape[0]):
      ref = Ref(path, tuple(leaf.shape[1:]), np.dtype(leaf.dtype), s)
      _add(entries, f"layer_{s * period + offset}/{suffix}", ref, source)
  return entries


def layer_indices(entries: Mapping[str, Ref]) -> list[int]:
  """Sorted layer numbers that have at least one module."""
  found = {int(m.group(1)) for m in map(_LAYER.match, entries) if m}
  return sorted(found)


def gating_is_transposed(
  ref: Ref, config: GemmaConfig, default: bool, source: str
) -> bool:
  """Whether ``gating_einsum`` is stored ``[2, F, D]`` rather than ``[2, D, F]``.

  The shape decides whenever ``D != F``; only a square MLP falls back to
  ``default`` (from `needs_gating_transpose` of the variant or config).
  """
  d, f = config.embedding_dim, config.mlp_hidden_dim
  shape = ref.shape
  if len(shape) == 3 and shape[0] == 2:
    if d == f and shape[1:] == (d, d):
      return default
    if shape[1:] == (d, f):
      return False
    if shape[1:] == (f, d):
      return True
  raise errors.CheckpointError(
    f"{source}: {ref.key!r} has shape {shape}; expected [2, {d}, {f}] or the"
    f" transposed [2, {f}, {d}] (d_model={d}, mlp={f})."
  )


@dataclasses.dataclass(frozen=True)
class Part:
  """Makes a canonical array from a module's weight ``w`` (hashable, so it can
  be a static argument of ``jax.jit``; works on numpy and jax arrays).

  Attributes:
    index: Take ``w[index]`` along ``axis`` of a fused weight; None: ``w``.
    transpose: Then reverse all axes.
    add_axis: Then add a leading axis of size 1 (squeezed MQA kv).
    axis: The axis ``index`` selects along.
    swap_last: Then swap the last two axes (Gemma 4 expert weights).
  """

  index: int | None = None
  transpose: bool = False
  add_axis: bool = False
  axis: int = 0
  swap_last: bool = False

  def __call__(self, a: Any) -> Any:
    out = a if self.index is None else a[(slice(None),) * self.axis + (self.index,)]
    out = out.T if self.transpose else out
    if self.swap_last:
      out = out.swapaxes(-1, -2)
    return out[None] if self.add_axis else out

  def stored_spec(self, spec: tuple) -> tuple:
    """Mesh axes of the weight's dims, given those of the canonical array's."""
    spec = tuple(spec)
    if self.add_axis:
      spec = spec[1:]
    if self.swap_last:
      spec = (*spec[:-2], spec[-1], spec[-2])
    if self.transpose:
      spec = spec[::-1]
    if self.index is None:
      return spec
    return (*spec[: self.axis], None, *spec[self.axis :])


_same = Part()


def _part(i: int, *, transpose: bool = False, add_axis: bool = False) -> Part:
  return Part(i, transpose, add_axis)


def canonical_plan(
  entries: Mapping[str, Ref],
  config: GemmaConfig,
  transpose_gating: bool,
  source: str,
) -> dict[str, tuple[Ref, Part]]:
  """How to build each canonical parameter from the checkpoint's modules.

  Args:
    entries: From `layout_entries`.
    config: The architecture (sizes inferred from the same entries).
    transpose_gating: Orientation of a square ``gating_einsum`` (D == F).
    source: Where the checkpoint came from, for error messages.

  Returns:
    Canonical name -> (module ref, function from its array to the canonical
    array). Applied to `Ref.proxy` it gives the canonical shapes for free.

  Raises:
    CheckpointError: A module the config needs is missing, a layer holds an
      unknown module, or a fused weight has an unexpected rank.
  """

  def need(name: str) -> Ref:
    if name not in entries:
      raise errors.CheckpointError(
        f"{source}: missing weight 'transformer/{name}' that a"
        f" {config.family} model with {config.num_layers} layers needs; the"
        " checkpoint may be truncated or of another variant."
      )
    return entries[name]

  for name in entries:
    match = _LAYER.match(name)
    if match and match.group(2) not in LAYER_MODULES:
      raise errors.CheckpointError(
        f"{source}: unsupported weight 'transformer/{name}'; it is not part"
        " of a Gemma 1/2/3 text layer, so this checkpoint is of another"
        f" architecture. Known layer modules: {sorted(LAYER_MODULES)}."
      )
  plan = {
    "embedder": (need("embedder/input_embedding"), _same),
    "final_norm": (need("final_norm"), _same),
  }
  for i in range(config.num_layers):
    src = f"layer_{i}"
    wanted = {
      "pre_attention_norm": True,
      "pre_ffw_norm": True,
      "post_attention_norm": config.use_post_attn_norm,
      "post_ffw_norm": config.use_post_ffw_norm,
    }
    for norm, used in wanted.items():
      if used:
        plan[f"{src}/{norm}"] = (need(f"{src}/{norm}"), _same)
    if f"{src}/attn/qkv_einsum" in entries:
      qkv = need(f"{src}/attn/qkv_einsum")
      if len(qkv.shape) != 4 or qkv.shape[0] != 3:
        raise errors.CheckpointError(
          f"{source}: {qkv.key!r} has shape {qkv.shape}; expected [3, N, D, H]."
        )
      for j, name in enumerate("qkv"):
        plan[f"{src}/attn/{name}"] = (qkv, _part(j))
    else:
      plan[f"{src}/attn/q"] = (need(f"{src}/attn/q_einsum"), _same)
      kv = need(f"{src}/attn/kv_einsum")
      if len(kv.shape) not in (3, 4) or kv.shape[0] != 2:
        raise errors.CheckpointError(
          f"{source}: {kv.key!r} has shape {kv.shape}; expected [2, K, D, H]"
          " or, for multi-query attention, [2, D, H]."
        )
      squeezed = len(kv.shape) == 3
      plan[f"{src}/attn/k"] = (kv, _part(0, add_axis=squeezed))
      plan[f"{src}/attn/v"] = (kv, _part(1, add_axis=squeezed))
    plan[f"{src}/attn/o"] = (need(f"{src}/attn/attn_vec_einsum"), _same)
    if config.use_qk_norm:
      plan[f"{src}/attn/query_norm"] = (need(f"{src}/attn/_query_norm"), _same)
      plan[f"{src}/attn/key_norm"] = (need(f"{src}/attn/_key_norm"), _same)
    gating = need(f"{src}/mlp/gating_einsum")
    flip = gating_is_transposed(gating, config, transpose_gating, source)
    plan[f"{src}/mlp/gate"] = (gating, _part(0, transpose=flip))
    plan[f"{src}/mlp/up"] = (gating, _part(1, transpose=flip))
    plan[f"{src}/mlp/down"] = (need(f"{src}/mlp/linear"), _same)
  return plan
