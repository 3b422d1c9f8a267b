"""Hugging Face Gemma checkpoints: ``config.json`` + ``*.safetensors``.

Reads single-file and sharded (``model.safetensors.index.json``) checkpoints
with ``safetensors`` in numpy mode: no ``torch``, no ``transformers``, and never
a pickled ``pytorch_model.bin``. Only text-model tensors are read, so the
vision tower of a multimodal Gemma 3 checkpoint is never loaded.

Weight names (after stripping the multimodal prefixes
``model.language_model.`` / ``language_model.model.``) map to the canonical
names of `gemma_surgery.loading.params`::

  model.embed_tokens.weight                  [V, D]     -> embedder
  model.norm.weight                          [D]        -> final_norm
  model.layers.i.self_attn.q_proj.weight     [N*H, D]   -> layer_i/attn/q
  model.layers.i.self_attn.k_proj/v_proj     [K*H, D]   -> layer_i/attn/k, v
  model.layers.i.self_attn.o_proj.weight     [D, N*H]   -> layer_i/attn/o
  model.layers.i.self_attn.q_norm/k_norm     [H]        -> attn/query_norm, key_norm
  model.layers.i.mlp.gate_proj/up_proj       [F, D]     -> mlp/gate, mlp/up
  model.layers.i.mlp.down_proj               [D, F]     -> mlp/down
  model.layers.i.input_layernorm             [D]        -> pre_attention_norm
  model.layers.i.post_attention_layernorm    [D]        -> post_attention_norm
                                                           (pre_ffw_norm on Gemma 1)
  model.layers.i.pre_feedforward_layernorm   [D]        -> pre_ffw_norm
  model.layers.i.post_feedforward_layernorm  [D]        -> post_ffw_norm

Gemma 4's additions (per-layer embeddings, layer scalars, experts) are mapped
by `gemma_surgery.loading.hf_gemma4`; its layers' head widths differ, so the
q/k/v/o layouts use each layer's own ``head_dim``.
"""

from __future__ import annotations

import contextlib
import json
import pathlib
from collections.abc import Callable, Iterator

import ml_dtypes  # registers bfloat16 with numpy (safetensors' BF16)
import numpy as np
import safetensors
from tqdm.auto import tqdm

from gemma_surgery import errors
from gemma_surgery.config import GemmaConfig
from gemma_surgery.loading import hf_gemma4
from gemma_surgery.loading.placement import Index, LazyArray

_PREFIXES = ("model.language_model.", "language_model.model.", "model.")


def _canonical_name(hf_name: str, family: str) -> str | None:
  """Canonical name of an HF tensor, or None for tensors we don't use."""
  for prefix in _PREFIXES:
    if hf_name.startswith(prefix):
      name = hf_name[len(prefix) :]
      break
  else:
    return None
  if family == "gemma4" and (g4 := hf_gemma4.canonical_name(name)) is not None:
    return g4
  if name == "embed_tokens.weight":
    return "embedder"
  if name == "norm.weight":
    return "final_norm"
  parts = name.split(".")
  if parts[0] != "layers" or parts[-1] != "weight" or len(parts) not in (4, 5):
    return None
  layer, group = parts[1], parts[2]
  norms = {
    "input_layernorm": "pre_attention_norm",
    "post_attention_layernorm": (
      "pre_ffw_norm" if family == "gemma1" else "post_attention_norm"
    ),
    "pre_feedforward_layernorm": "pre_ffw_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
  }
  leaves = {
    "self_attn": {
      "q_proj": "attn/q",
      "k_proj": "attn/k",
      "v_proj": "attn/v",
      "o_proj": "attn/o",
      "q_norm": "attn/query_norm",
      "k_norm": "attn/key_norm",
    },
    "mlp": {"gate_proj": "mlp/gate", "up_proj": "mlp/up", "down_proj": "mlp/down"},
  }
  if len(parts) == 4:
    target = norms.get(group)
  else:
    target = leaves.get(group, {}).get(parts[3])
  return None if target is None else f"layer_{layer}/{target}"


def _head_dim(name: str, config: GemmaConfig) -> int:
  """The head width of the layer a canonical name belongs to."""
  layer = hf_gemma4.layer_of(name)
  if layer is None or not 0 <= layer < config.num_layers:
    return config.head_dim
  return config.layer_head_dim(layer)


def _convert(name: str, arr: np.ndarray, config: GemmaConfig) -> dict[str, np.ndarray]:
  """Canonical array(s) of one HF tensor."""
  if config.family == "gemma4" and hf_gemma4.canonical_name_is_new(name):
    return hf_gemma4.convert(name, arr, config)
  return {name: _to_canonical_layout(name, arr, config)}


def _to_canonical_layout(name: str, arr: np.ndarray, config: GemmaConfig) -> np.ndarray:
  """Reorders an HF (out, in) matrix into the canonical layout."""
  h, d = _head_dim(name, config), config.embedding_dim
  leaf = name.split("/", 1)[-1]
  if leaf in ("attn/q", "attn/k", "attn/v"):
    if arr.ndim != 2 or arr.shape[0] % h or arr.shape[1] != d:
      return arr  # Leave it to the shape check to report.
    return arr.reshape(arr.shape[0] // h, h, d).transpose(0, 2, 1)
  if leaf == "attn/o":
    if arr.ndim != 2 or arr.shape[1] % h or arr.shape[0] != d:
      return arr
    return arr.reshape(d, arr.shape[1] // h, h).transpose(1, 2, 0)
  if leaf.startswith("mlp/"):
    return arr.T
  return arr


def safetensors_files(directory: pathlib.Path) -> list[pathlib.Path]:
  """The checkpoint's safetensors files, validated against its index."""
  index = directory / "model.safetensors.index.json"
  if index.exists():
    try:
      weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise errors.CheckpointError(f"{index} is not a valid index: {e}") from e
    files = [directory / f for f in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
      raise errors.CheckpointError(
        f"{index} lists shard(s) {missing} that are not in {directory};"
        " the download may be incomplete."
      )
    return files
  files = sorted(directory.glob("*.safetensors"))
  if not files:
    hint = ""
    if list(directory.glob("*.bin")):
      hint = (
        " It has pytorch *.bin files, which are pickles and are never loaded;"
        " convert them to safetensors first."
      )
    raise errors.CheckpointError(f"No *.safetensors files in {directory}.{hint}")
  return files


def read_hf_params(
  directory: str | pathlib.Path,
  config: GemmaConfig,
  *,
  progress: bool = True,
  keep: Callable[[str], bool] | None = None,
) -> dict[str, np.ndarray]:
  """Reads an HF checkpoint's text weights as canonical numpy arrays.

  Args:
    directory: Folder with ``*.safetensors`` (and optionally the index).
    config: The architecture (from ``config.json``), used for the layout.
    progress: Show a progress bar over tensors.
    keep: Optional filter on canonical names (e.g. for partial loads).

  Raises:
    CheckpointError: Missing or corrupt files.
  """
  directory = pathlib.Path(directory)
  files = safetensors_files(directory)
  params: dict[str, np.ndarray] = {}
  bar = tqdm(
    total=None, desc="Reading safetensors", unit="tensor", disable=not progress
  )
  for path in files:
    try:
      with safetensors.safe_open(str(path), framework="numpy") as f:
        for hf_name in f.keys():
          name = _canonical_name(hf_name, config.family)
          if name is None or (keep is not None and not keep(name)):
            continue
          if config.family == "gemma4" and hf_gemma4.ignored(name, config):
            continue
          params.update(_convert(name, f.get_tensor(hf_name), config))
          bar.update()
    except safetensors.SafetensorError as e:
      raise errors.CheckpointError(
        f"Cannot read {path}: {e}. The file may be truncated or corrupt;"
        " delete it and download again."
      ) from e
  bar.close()
  return params


_DTYPES = {
  "F64": np.float64,
  "F32": np.float32,
  "F16": np.float16,
  "BF16": ml_dtypes.bfloat16,
}


def _layout(name: str, shape: tuple[int, ...], config: GemmaConfig) -> str:
  """How a tensor maps to its canonical layout (see `_to_canonical_layout`)."""
  h, d = _head_dim(name, config), config.embedding_dim
  leaf = name.split("/", 1)[-1]
  if leaf in ("attn/q", "attn/k", "attn/v"):
    ok = len(shape) == 2 and shape[0] % h == 0 and shape[1] == d
    return "qkv" if ok else "same"
  if leaf == "attn/o":
    ok = len(shape) == 2 and shape[1] % h == 0 and shape[0] == d
    return "o" if ok else "same"
  return "mlp" if leaf.startswith("mlp/") else "same"


def _stored_dtype(name: str, tensor, path: pathlib.Path) -> np.dtype:
  stored = tensor.get_dtype()
  if stored not in _DTYPES:
    raise errors.CheckpointError(
      f"{path}: tensor for {name!r} has dtype {stored}; expected one of"
      f" {sorted(_DTYPES)}."
    )
  return np.dtype(_DTYPES[stored])


def _getter(name: str, tensor, path: pathlib.Path) -> Callable[[tuple], np.ndarray]:
  """Reads ``tensor[index]`` from the file, corrupt files as `CheckpointError`."""

  def get(index: tuple) -> np.ndarray:
    try:
      return tensor[index]
    except safetensors.SafetensorError as e:
      raise errors.CheckpointError(
        f"Cannot read {name!r} from {path}: {e}. The file may be truncated or"
        " corrupt; delete it and download again."
      ) from e

  return get


def _lazy(name: str, tensor, path: pathlib.Path, config: GemmaConfig) -> LazyArray:
  """A `LazyArray` over one safetensors tensor (``safe_open(...).get_slice``).

  Only the rows/columns of the requested canonical slice are read: heads map
  to row (q/k/v) or column (o) ranges of ``head_dim`` rows each, MLP slices to
  the transposed ranges.
  """
  shape = tuple(int(n) for n in tensor.get_shape())
  dtype = _stored_dtype(name, tensor, path)
  layout, h = _layout(name, shape, config), _head_dim(name, config)
  get = _getter(name, tensor, path)

  if layout == "qkv":  # [N*H, D] -> [N, D, H]
    canonical = (shape[0] // h, shape[1], h)

    def read(index: Index) -> np.ndarray:
      n, dd, hh = index
      rows = get((slice(n.start * h, n.stop * h), dd))
      return rows.reshape(n.stop - n.start, h, -1).transpose(0, 2, 1)[:, :, hh]

  elif layout == "o":  # [D, N*H] -> [N, H, D]
    canonical = (shape[1] // h, h, shape[0])

    def read(index: Index) -> np.ndarray:
      n, hh, dd = index
      cols = get((dd, slice(n.start * h, n.stop * h)))
      return cols.reshape(-1, n.stop - n.start, h).transpose(1, 2, 0)[:, hh, :]

  elif layout == "mlp":  # [out, in] -> [in, out]
    canonical = shape[::-1]

    def read(index: Index) -> np.ndarray:
      return get(index[::-1]).T

  else:
    canonical = shape

    def read(index: Index) -> np.ndarray:
      return get(index)

  return LazyArray(shape=canonical, dtype=dtype, read=read)


def _lazy_gemma4(
  name: str, tensor, path: pathlib.Path, config: GemmaConfig
) -> dict[str, LazyArray]:
  """`LazyArray` s of a Gemma 4-only tensor (`hf_gemma4.lazy_convert`): a
  slice of the per-layer tables or of the experts reads only its rows."""
  shape = tuple(int(n) for n in tensor.get_shape())
  dtype = _stored_dtype(name, tensor, path)
  arrays = hf_gemma4.lazy_convert(name, shape, _getter(name, tensor, path), config)
  return {
    key: LazyArray(shape=tuple(canonical), dtype=dtype, read=read)
    for key, (canonical, read) in arrays.items()
  }


@contextlib.contextmanager
def open_hf_params(
  directory: str | pathlib.Path,
  config: GemmaConfig,
  *,
  keep: Callable[[str], bool] | None = None,
) -> Iterator[dict[str, LazyArray]]:
  """The checkpoint's text weights as canonical `LazyArray` s; reads nothing.

  Only the safetensors headers are parsed here; the files stay open (memory
  mapped) until the ``with`` block ends, and each `LazyArray.read` reads just
  its slice (``safe_open(...).get_slice``). `params.bind_parameters` with a
  mesh uses them so that each process reads only its devices' shards.

  Args:
    directory: Folder with ``*.safetensors`` (and optionally the index).
    config: The architecture (from ``config.json``), used for the layout.
    keep: Optional filter on canonical names.

  Raises:
    CheckpointError: Missing or corrupt files.
  """
  directory = pathlib.Path(directory)
  files = safetensors_files(directory)
  with contextlib.ExitStack() as stack:
    params: dict[str, LazyArray] = {}
    for path in files:
      try:
        f = stack.enter_context(safetensors.safe_open(str(path), framework="numpy"))
        for hf_name in f.keys():
          name = _canonical_name(hf_name, config.family)
          if name is None or (keep is not None and not keep(name)):
            continue
          if config.family == "gemma4" and hf_gemma4.ignored(name, config):
            continue
          if config.family == "gemma4" and hf_gemma4.canonical_name_is_new(name):
            params.update(_lazy_gemma4(name, f.get_slice(hf_name), path, config))
            continue
          params[name] = _lazy(name, f.get_slice(hf_name), path, config)
      except safetensors.SafetensorError as e:
        raise errors.CheckpointError(
          f"Cannot read {path}: {e}. The file may be truncated or corrupt;"
          " delete it and download again."
        ) from e
    yield params
