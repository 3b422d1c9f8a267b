"""Gemma Scope 2 cross-layer transcoders and transcoder sets: read and write.

    clt = load_clt("tiny")                      # the embedded model's CLT
    clt = load_clt("google/gemma-scope-2-1b-pt", "clt/width_262k_l0_medium_affine")
    tcs = load_transcoders("tiny")              # one transcoder per layer
    tcs = load_transcoders("google/gemma-scope-2-1b-pt", "transcoder_all",
                           width="16k", l0="small", num_layers=26)

Layouts (Gemma Scope 2 on Hugging Face, as read by SAELens and circuit-tracer):

* CLT folder ``clt/width_W_l0_X[_affine]/``: ``config.json`` and one
  ``params_layer_L.safetensors`` per layer holding ``w_enc [d, F]``,
  ``b_enc [F]``, ``threshold [F]``, ``b_dec [d]`` (the bias of output layer
  L), ``w_dec [F, n_layers, d]`` (latent -> every layer's MLP output; entries
  for layers before L are unused) and, for affine CLTs,
  ``affine_skip_connection [d, d]`` (layer L's skip).
* Transcoder folder ``transcoder_all/layer_L_width_W_l0_X[_affine]/``:
  ``params.safetensors`` + ``config.json`` each (`gemma_surgery.sae.load`).

Files are safetensors only (never pickles); a truncated or foreign file is an
`SAEError` naming it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from gemma_surgery import assets, atomic
from gemma_surgery.errors import SAEError
from gemma_surgery.host import to_numpy
from gemma_surgery.loading import hub
from gemma_surgery.sae import files
from gemma_surgery.sae.clt import CLTInfo, CrossLayerTranscoder, TranscoderSet
from gemma_surgery.sae.load import load_sae

_LAYER_FILE = re.compile(r"^params_layer_(\d+)\.safetensors$")
_CLT_KEYS = ("w_enc", "b_enc", "threshold", "w_dec", "b_dec")
_TC_FOLDER = re.compile(r"^layer_(\d+)_(width_.+)$")


def _clt_layer_files(folder: pathlib.Path, where: str) -> list[pathlib.Path]:
  if not folder.is_dir():
    raise SAEError(f"{where}: no such CLT folder {str(folder)!r}.")
  found = {}
  for path in folder.iterdir():
    match = _LAYER_FILE.match(path.name)
    if match:
      found[int(match.group(1))] = path
  if not found or sorted(found) != list(range(len(found))):
    raise SAEError(
      f"{where}: expected params_layer_0.safetensors .. params_layer_{{n-1}}"
      f".safetensors in {str(folder)!r}; found layers {sorted(found)}."
    )
  return [found[i] for i in range(len(found))]


def _check_clt_layer(raw: dict, layer: int, n: int, where: str) -> tuple[int, int]:
  keys = set(raw)
  allowed = set(_CLT_KEYS) | {"affine_skip_connection"}
  if not set(_CLT_KEYS) <= keys or not keys <= allowed:
    raise SAEError(
      f"{where}: params_layer_{layer} has keys {sorted(keys)}; expected"
      f" {list(_CLT_KEYS)} (and optionally affine_skip_connection)."
    )
  if raw["w_enc"].ndim != 2:
    raise SAEError(f"{where}: w_enc of layer {layer} has shape {raw['w_enc'].shape}.")
  d, width = raw["w_enc"].shape
  expected = {
    "w_enc": (d, width),
    "b_enc": (width,),
    "threshold": (width,),
    "w_dec": (width, n, d),
    "b_dec": (d,),
    "affine_skip_connection": (d, d),
  }
  bad = {k: tuple(v.shape) for k, v in raw.items() if tuple(v.shape) != expected[k]}
  if bad:
    want = {k: expected[k] for k in bad}
    raise SAEError(
      f"{where}: params_layer_{layer} shapes {bad} do not fit a {n}-layer CLT with"
      f" d_model={d}, width={width}; expected {want}."
    )
  for key, value in raw.items():
    if value.dtype.kind != "f":
      raise SAEError(f"{where}: {key} of layer {layer} has dtype {value.dtype}.")
  return d, width


def read_clt_folder(
  folder: str | os.PathLike[str], where: str | None = None
) -> tuple[dict[str, np.ndarray], dict]:
  """Reads a Gemma Scope 2 CLT folder into stacked arrays (`clt.CLT_AXES`).

  Returns:
    ``(arrays, config)``: ``w_enc [L, d, F]``, ``b_enc [L, F]``,
    ``threshold [L, F]``, ``w_dec [L, F, L, d]``, ``b_dec [L, d]`` and
    optionally ``w_skip [L, d, d]``; the parsed ``config.json`` (or {}).

  Raises:
    SAEError: Missing, truncated, pickled or inconsistent files.
  """
  folder = pathlib.Path(folder)
  where = where or str(folder)
  paths = _clt_layer_files(folder, where)
  n = len(paths)
  layers = []
  shapes = set()
  for i, path in enumerate(paths):
    raw = files.read_safetensors(path)
    shapes.add(_check_clt_layer(raw, i, n, where))
    layers.append(raw)
  if len(shapes) != 1:
    raise SAEError(f"{where}: layers disagree on (d_model, width): {sorted(shapes)}.")
  skips = {"affine_skip_connection" in raw for raw in layers}
  if len(skips) != 1:
    raise SAEError(f"{where}: only some layers have an affine_skip_connection.")
  arrays = {k: np.stack([raw[k] for raw in layers]) for k in _CLT_KEYS}
  if skips.pop():
    arrays["w_skip"] = np.stack([raw["affine_skip_connection"] for raw in layers])
  config = {}
  if (folder / "config.json").is_file():
    try:
      config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise SAEError(f"{where}: unreadable config.json: {e}") from e
  return arrays, config


def load_clt(
  source: str | os.PathLike[str],
  path: str | None = None,
  *,
  dtype: Any = "float32",
  revision: str | None = None,
  cache_dir: str | os.PathLike[str] | None = None,
  token: str | bool | None = None,
) -> CrossLayerTranscoder:
  """Loads a Gemma Scope 2 cross-layer transcoder.

  Args:
    source: ``"tiny"`` (the embedded model's CLT), a local CLT folder, or a
      Hugging Face repo id (with ``path``).
    path: The CLT folder in the repo (``clt/width_262k_l0_medium``); only
      its ``params_layer_*.safetensors`` and ``config.json`` are fetched.
    dtype: Weight storage dtype (θ stays float32; compute is float32).
    revision: Hub revision. cache_dir: Hub cache. token: Hub token.

  Raises:
    SAEError: Bad files (see `read_clt_folder`). HubError: Download failed.
  """
  if path is None and str(source) == assets.TINY_NAME:
    folder, where = assets.tiny_clt_dir(), "tiny CLT"
  elif path is not None:
    rel = path.strip("/")
    snapshot = hub.download_hf(
      str(source),
      revision=revision,
      allow_patterns=[f"{rel}/params_layer_*.safetensors", f"{rel}/config.json"],
      cache_dir=cache_dir,
      token=token,
    )
    folder, where = snapshot / rel, f"{source}:{rel}"
  else:
    folder = pathlib.Path(source).expanduser()
    where = str(folder)
  arrays, _ = read_clt_folder(folder, where)
  n, d, width = arrays["w_enc"].shape
  info = CLTInfo(num_layers=n, d_model=d, width=width, source=where, kind="clt")
  return CrossLayerTranscoder.from_arrays(arrays, info, dtype=dtype)


def save_clt_gemma_scope_2(
  clt: CrossLayerTranscoder, folder: str | os.PathLike[str], *, l0: str, model_name: str
) -> None:
  """Writes a CLT in the Gemma Scope 2 layout (see the module doc).

  Every file is written atomically, all as one set.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  n = clt.num_layers

  def arr(name: str, *axes: str) -> np.ndarray:
    value = getattr(clt, name).value.unwrap(*axes)
    return np.ascontiguousarray(to_numpy(value, np.float32))

  w_enc = arr("w_enc", "layer", "embedding", "latents")
  b_enc = arr("b_enc", "layer", "latents")
  theta = arr("threshold", "layer", "latents")
  w_dec = arr("w_dec", "layer", "latents", "out_layer", "embedding")
  b_dec = arr("b_dec", "out_layer", "embedding")
  skip = None
  if clt.w_skip is not None:
    skip = arr("w_skip", "out_layer", "embedding", "embedding_out")
  config = dict(
    hf_hook_point_in="model.layers.{layer}.pre_feedforward_layernorm.output",
    hf_hook_point_out="model.layers.{layer}.post_feedforward_layernorm.output",
    width=clt.info.width,
    l0=l0,
    model_name=model_name,
    architecture="jump_relu",
    affine_connection=skip is not None,
    type="clt",
    num_layers=n,
  )
  targets = [folder / f"params_layer_{i}.safetensors" for i in range(n)]
  with atomic.atomic_paths(*targets, folder / "config.json") as tmps:
    for i in range(n):
      layer = {
        "w_enc": np.ascontiguousarray(w_enc[i]),
        "b_enc": np.ascontiguousarray(b_enc[i]),
        "threshold": np.ascontiguousarray(theta[i]),
        "w_dec": np.ascontiguousarray(w_dec[i]),
        "b_dec": np.ascontiguousarray(b_dec[i]),
      }
      if skip is not None:
        layer["affine_skip_connection"] = np.ascontiguousarray(skip[i])
      save_file(layer, str(tmps[i]))
    tmps[-1].write_text(json.dumps(config, indent=2) + "\n")


def _local_transcoder_folders(
  root: pathlib.Path, variant: str | None, where: str
) -> list[pathlib.Path]:
  if not root.is_dir():
    raise SAEError(f"{where}: no such transcoder folder {str(root)!r}.")
  by_variant: dict[str, dict[int, pathlib.Path]] = {}
  for path in root.iterdir():
    match = _TC_FOLDER.match(path.name)
    if match and path.is_dir():
      by_variant.setdefault(match.group(2), {})[int(match.group(1))] = path
  if variant is None:
    if len(by_variant) != 1:
      raise SAEError(
        f"{where}: found transcoder variants {sorted(by_variant)}; pick one with"
        " width=/l0=/affine=."
      )
    variant = next(iter(by_variant))
  layers = by_variant.get(variant, {})
  if not layers or sorted(layers) != list(range(len(layers))):
    raise SAEError(
      f"{where}: variant {variant!r} needs folders layer_0_.. layer_{{n-1}}_;"
      f" found layers {sorted(layers)} (variants: {sorted(by_variant)})."
    )
  return [layers[i] for i in range(len(layers))]


def _variant(width: str | None, l0: str | None, affine: bool | None) -> str | None:
  if width is None and l0 is None:
    return None
  if width is None or l0 is None:
    raise SAEError("Pass both width= and l0= (e.g. width='16k', l0='small').")
  return f"width_{width}_l0_{l0}" + ("_affine" if affine else "")


def load_transcoders(
  source: str | os.PathLike[str],
  path: str | None = None,
  *,
  width: str | None = None,
  l0: str | None = None,
  affine: bool | None = None,
  num_layers: int | None = None,
  dtype: Any = "float32",
  revision: str | None = None,
  cache_dir: str | os.PathLike[str] | None = None,
  token: str | bool | None = None,
) -> TranscoderSet:
  """Loads one Gemma Scope 2 transcoder per layer as a `TranscoderSet`.

  Args:
    source: ``"tiny"``, a local ``transcoder_all`` folder, or a Hugging Face
      repo id (with ``path``, ``width``, ``l0`` and ``num_layers``).
    path: The family folder in the repo (``transcoder_all``), or the family
      and variant (``transcoder_all/width_16k_l0_small[_affine]``) instead of
      ``width``/``l0``/``affine``.
    width: Width label (``16k``). l0: L0 label (``small``/``big``).
    affine: The ``_affine`` variant.
    num_layers: Layers to fetch from the Hub (``layer_0`` .. ``n-1``).
    dtype: Weight storage dtype.
    revision: Hub revision. cache_dir: Hub cache. token: Hub token.

  Raises:
    SAEError: Missing layers, ambiguous variants, bad files.
  """
  variant = _variant(width, l0, affine)
  if path is not None:
    family, _, last = path.strip("/").rpartition("/")
    if (
      last.startswith("width_") and variant is None
    ):  # "transcoder_all/width_16k_l0_small"
      path, variant = family, last
    if variant is None or num_layers is None:
      raise SAEError("From the Hub pass width=, l0= and num_layers=.")
    rel = path.strip("/")
    tcs = [
      load_sae(
        source,
        f"{rel}/layer_{i}_{variant}",
        dtype=dtype,
        revision=revision,
        cache_dir=cache_dir,
        token=token,
      )
      for i in range(num_layers)
    ]
    return TranscoderSet.of(tcs, source=f"{source}:{rel}/{variant}")
  if str(source) == assets.TINY_NAME:
    root, where = assets.tiny_transcoders_dir(), "tiny transcoders"
  else:
    root = pathlib.Path(source).expanduser()
    where = str(root)
  folders = _local_transcoder_folders(root, variant, where)
  tcs = [load_sae(f, family="transcoder", dtype=dtype) for f in folders]
  return TranscoderSet.of(tcs, source=where)
