"""Hugging Face Gemma 4 tensor names and layouts -> canonical parameters.

`gemma_surgery.loading.hf` reads the files; this module knows the names
Gemma 4 adds (after the ``model.`` / ``model.language_model.`` prefix) and
how each becomes canonical (see `gemma_surgery.model.parameters`)::

  embed_tokens_per_layer.weight             [V, L*P]   -> per_layer_embedder [V, L, P]
  per_layer_model_projection.weight         [L*P, D]   -> per_layer_projection [D, L, P]
  per_layer_projection_norm.weight          [P]
  layers.i.layer_scalar                     [1]        -> layer_i/layer_scalar []
  layers.i.per_layer_input_gate.weight      [P, D]     -> per_layer_input/gate [D, P]
  layers.i.per_layer_projection.weight      [D, P]     -> per_layer_input/projection
  layers.i.post_per_layer_input_norm.weight [D]        -> per_layer_input/norm
  layers.i.post_feedforward_layernorm_1     [D]        -> post_ffw_norm_1
  layers.i.pre_feedforward_layernorm_2      [D]        -> moe/pre_norm
  layers.i.post_feedforward_layernorm_2     [D]        -> moe/post_norm
  layers.i.router.proj.weight               [E, D]     -> moe/router [D, E]
  layers.i.router.scale                     [D]        -> moe/router_norm
  layers.i.router.per_expert_scale          [E]        -> moe/per_expert_scale
  layers.i.experts.gate_up_proj             [E, 2X, D] -> moe/gate, moe/up [E, D, X]
  layers.i.experts.down_proj                [E, D, X]  -> moe/down [E, X, D]

`lazy_convert` gives each canonical array as a shape and a slice reader, so
that a load onto a mesh reads only each device's rows of the per-layer
embedding table, its experts, its kv heads (`gemma_surgery.loading.placement`);
`convert` is the same mapping on a whole array.

Checkpoints may still hold key/value weights of KV-shared layers, which
transformers ignores too (`ignored`). Multimodal checkpoints' vision and audio
towers never match these names and are skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from gemma_surgery.config import GemmaConfig

_GLOBAL = {
  "embed_tokens_per_layer.weight": "per_layer_embedder",
  "per_layer_model_projection.weight": "per_layer_projection",
  "per_layer_projection_norm.weight": "per_layer_projection_norm",
}
_LAYER = {
  "layer_scalar": "layer_scalar",
  "per_layer_input_gate.weight": "per_layer_input/gate",
  "per_layer_projection.weight": "per_layer_input/projection",
  "post_per_layer_input_norm.weight": "per_layer_input/norm",
  "post_feedforward_layernorm_1.weight": "post_ffw_norm_1",
  "pre_feedforward_layernorm_2.weight": "moe/pre_norm",
  "post_feedforward_layernorm_2.weight": "moe/post_norm",
  "router.proj.weight": "moe/router",
  "router.scale": "moe/router_norm",
  "router.per_expert_scale": "moe/per_expert_scale",
  "experts.gate_up_proj": "moe/gate_up",
  "experts.down_proj": "moe/down",
}


def canonical_name(name: str) -> str | None:
  """Canonical name of a Gemma 4-only tensor (prefix stripped), else None.

  ``moe/gate_up`` is split in two by `convert`.
  """
  if name in _GLOBAL:
    return _GLOBAL[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "layers" and parts[2] in _LAYER:
    return f"layer_{parts[1]}/{_LAYER[parts[2]]}"
  return None


_NEW_LEAVES = frozenset(_LAYER.values())
_TRANSPOSED = ("per_layer_input/gate", "per_layer_input/projection", "moe/router")


def canonical_name_is_new(name: str) -> bool:
  """Whether a canonical name is one `canonical_name` gives (Gemma 4 only)."""
  return name in _GLOBAL.values() or name.split("/", 1)[-1] in _NEW_LEAVES


def layer_of(name: str) -> int | None:
  """The layer index of a canonical ``layer_{i}/...`` name."""
  if not name.startswith("layer_"):
    return None
  return int(name.split("/", 1)[0].removeprefix("layer_"))


def ignored(name: str, config: GemmaConfig) -> bool:
  """Key/value weights of a KV-shared layer (unused, as in transformers)."""
  layer = layer_of(name)
  leaf = name.split("/", 1)[-1]
  return (
    layer is not None
    and leaf in ("attn/k", "attn/v", "attn/key_norm")
    and layer < config.num_layers
    and config.is_kv_shared(layer)
  )


Index = tuple[slice, ...]
Reader = Callable[[Index], np.ndarray]


def _full(shape: tuple[int, ...]) -> Index:
  return tuple(slice(0, n) for n in shape)


def lazy_convert(
  name: str, shape: tuple[int, ...], get: Reader, config: GemmaConfig
) -> dict[str, tuple[tuple[int, ...], Reader]]:
  """`convert` without reading: canonical shape and slice reader per array.

  Args:
    name: The canonical name (`canonical_name`).
    shape: The stored tensor's shape.
    get: Reads ``stored[index]`` (one step-1 ``slice`` per stored axis).
    config: The architecture.

  Returns:
    For each canonical array (two for ``moe/gate_up``): its shape and a
    function of a canonical index (step-1 slices) that returns that slice,
    reading only the stored rows/columns it covers: a vocabulary or layer
    range of the per-layer tables, an expert range of the expert weights.
  """
  leaf = name.split("/", 1)[-1]
  n, p = config.num_layers, config.per_layer_input_dim
  if name == "per_layer_embedder" and len(shape) == 2 and p and shape[1] == n * p:

    def table(index: Index) -> np.ndarray:  # [V, L*P] -> [V, L, P]
      v, layers, q = index
      cols = get((v, slice(layers.start * p, layers.stop * p)))
      return cols.reshape(v.stop - v.start, layers.stop - layers.start, p)[:, :, q]

    return {name: ((shape[0], n, p), table)}
  if name == "per_layer_projection" and len(shape) == 2 and p and shape[0] == n * p:

    def projection(index: Index) -> np.ndarray:  # [L*P, D] -> [D, L, P]
      d, layers, q = index
      rows = get((slice(layers.start * p, layers.stop * p), d))
      return rows.T.reshape(d.stop - d.start, layers.stop - layers.start, p)[:, :, q]

    return {name: ((shape[1], n, p), projection)}
  if leaf == "layer_scalar" and int(np.prod(shape)) == 1:
    return {name: ((), lambda index: get(_full(shape)).reshape(()))}
  if leaf in _TRANSPOSED and len(shape) == 2:
    return {name: (shape[::-1], lambda index: get(index[::-1]).T)}
  if leaf == "moe/gate_up" and len(shape) == 3 and shape[1] % 2 == 0:
    prefix = name.rsplit("/", 1)[0]
    x = shape[1] // 2

    def half(offset: int) -> Reader:
      def read(index: Index) -> np.ndarray:  # [E, 2X, D] -> [E, D, X]
        e, d, cols = index
        rows = slice(offset + cols.start, offset + cols.stop)
        return get((e, rows, d)).transpose(0, 2, 1)

      return read

    canonical = (shape[0], shape[2], x)
    return {
      f"{prefix}/gate": (canonical, half(0)),
      f"{prefix}/up": (canonical, half(x)),
    }
  if leaf == "moe/down" and len(shape) == 3:

    def down(index: Index) -> np.ndarray:  # [E, D, X] -> [E, X, D]
      e, cols, d = index
      return get((e, d, cols)).transpose(0, 2, 1)

    return {name: ((shape[0], shape[2], shape[1]), down)}
  return {name: (shape, get)}


def convert(name: str, arr: np.ndarray, config: GemmaConfig) -> dict[str, np.ndarray]:
  """Canonical array(s) from a Gemma 4-only tensor (see the module table).

  Shapes that don't fit are passed through for the shape check to report.
  """
  arrays = lazy_convert(name, arr.shape, lambda index: arr[index], config)
  return {key: read(_full(shape)) for key, (shape, read) in arrays.items()}
