"""`load_sae`: Gemma Scope 1 and 2 SAEs and transcoders, local or from the Hub.

    sae = load_sae("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")
    sae = load_sae("google/gemma-scope-2-1b-pt", "resid_post/layer_13_width_16k_l0_big")
    sae = load_sae("/data/saes/layer_20/width_16k/average_l0_71", family="res")
    sae = load_sae("tiny")   # the embedded model's resid_post SAE, offline

The file format decides the release: ``params.npz`` is Gemma Scope 1,
``params.safetensors`` (+ optional ``config.json``) is Gemma Scope 2. Where the
SAE reads is parsed from the repo name, the path and the config (see
`gemma_surgery.sae.hookpoints`); ``family=`` / ``layer=`` override it.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any

from jax.sharding import Mesh

from gemma_surgery import assets
from gemma_surgery.errors import SAEError
from gemma_surgery.loading import hub, placement
from gemma_surgery.model.parameters import Target
from gemma_surgery.parallel import sharding
from gemma_surgery.sae import files, hookpoints
from gemma_surgery.sae.autoencoders import (
  AXES,
  AutoEncoder,
  SAEInfo,
  Transcoder,
  storage_dtype,
  weight_dtype,
)
from gemma_surgery.sae.shard import shard_sae

_FILES = ("params.npz", "params.safetensors")


def _hf_folder(
  repo_id: str, path: str, revision: str | None, cache_dir: Any, token: Any
) -> tuple[pathlib.Path, pathlib.Path | None, str]:
  """Downloads just the SAE's folder; returns ``(folder, file, relative)``."""
  rel = path.strip("/")
  file_name = None
  if rel.endswith((".npz", ".safetensors", ".json")):
    rel, _, file_name = rel.rpartition("/")
  patterns = [f"{rel}/*"] if rel else ["*"]
  snapshot = hub.download_hf(
    repo_id,
    revision=revision,
    allow_patterns=patterns,
    cache_dir=cache_dir,
    token=token,
  )
  folder = snapshot / rel
  if file_name and not file_name.endswith(".json"):
    return folder, folder / file_name, rel
  return folder, None, rel


def _find_file(folder: pathlib.Path, where: str) -> pathlib.Path:
  found = [folder / name for name in _FILES if (folder / name).is_file()]
  if len(found) == 1:
    return found[0]
  if not folder.is_dir():
    raise SAEError(f"{where}: no such SAE folder {str(folder)!r}.")
  listing = sorted(p.name for p in folder.iterdir())
  raise SAEError(
    f"{where}: expected exactly one of {_FILES} in {str(folder)!r}; found {listing}."
  )


def _read_config(folder: pathlib.Path, where: str) -> dict | None:
  path = folder / "config.json"
  if not path.is_file():
    return None
  try:
    config = json.loads(path.read_text())
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SAEError(f"{where}: unreadable config.json: {e}") from e
  if not isinstance(config, dict):
    raise SAEError(f"{where}: config.json is not a JSON object.")
  return config


def load_sae(
  source: str | os.PathLike[str],
  path: str | None = None,
  *,
  family: str | None = None,
  layer: int | None = None,
  dtype: Any = "float32",
  name: str | None = None,
  revision: str | None = None,
  cache_dir: str | os.PathLike[str] | None = None,
  token: str | bool | None = None,
  mesh: Mesh | None = None,
  sharding_rules: sharding.Rules | None = None,
) -> AutoEncoder:
  """Loads a Gemma Scope SAE or transcoder.

  Args:
    source: A Hugging Face repo id (with ``path``), or a local SAE folder or
      ``params.npz`` / ``params.safetensors`` file (without ``path``), or
      ``"tiny"``: the ``resid_post`` SAE shipped with the embedded model
      (`gemma_surgery.assets`; never downloaded).
    path: The SAE's folder (or file) inside the repo; only that folder is
      downloaded (Hugging Face cache, progress bar, offline-first; see
      `gemma_surgery.loading.hub.download_hf`).
    family: ``"res"``, ``"mlp"``, ``"att"`` or ``"transcoder"``, overriding
      what the names and config say (needed for local folders whose path
      doesn't name the repo).
    layer: Overrides the layer parsed from the path or config.
    dtype: Storage dtype of the weights: ``"float32"`` (``"fp32"``,
      ``"f32"``), ``"bfloat16"`` (``"bf16"``) or ``"float16"`` (``"fp16"``,
      ``"f16"``), or the numpy/jax dtype; θ stays float32 and the SAE always
      computes in float32.
    name: Parameter label prefix (default: the source); SAEs spliced into one
      model need distinct names.
    revision: Hub branch, tag or commit.
    cache_dir: Hub cache directory.
    token: Hub token.
    mesh: Place the SAE on this mesh (which may span several processes):
      ``latents`` along `sharding.SAE_RULES` (the ``model`` axis). From a
      ``.safetensors`` file each process reads only its devices' slices; a
      ``.npz`` is read whole, then sharded (`shard_sae`).
    sharding_rules: Axis-name rules instead of `sharding.SAE_RULES`.

  Returns:
    An `AutoEncoder` (``res``/``mlp``/``att``) or `Transcoder`, whose
    ``info`` says where it reads and writes.

  Raises:
    SAEError: Missing file, pickled npz, wrong keys or shapes, unknown site,
      a ``dtype`` that is not one of the float dtypes above.
    HubError: The download failed.
  """
  dtype = weight_dtype(dtype)  # before any download
  if path is None and isinstance(source, str) and source == assets.TINY_NAME:
    source = assets.tiny_sae_dir()
  if path is not None:
    repo_id = str(source)
    folder, file, rel = _hf_folder(repo_id, path, revision, cache_dir, token)
    where = f"{repo_id}:{rel}"
    text = f"{repo_id}/{rel}"
  else:
    local = pathlib.Path(source).expanduser()
    if not local.exists():
      raise SAEError(
        f"SAE {str(source)!r} is not a local file or folder; for a Hugging Face"
        " repo pass the SAE's path too: load_sae(repo_id, 'layer_20/width_16k/"
        "average_l0_71')."
      )
    folder, file = (local.parent, local) if local.is_file() else (local, None)
    where = str(folder)
    # abspath, not resolve(): Hugging Face cache files are symlinks to blobs.
    text = os.path.abspath(local).replace(os.sep, "/")
  file = file or _find_file(folder, where)
  rules = sharding.SAE_RULES if sharding_rules is None else sharding_rules
  if file.suffix == ".safetensors" and mesh is not None:
    with files.open_safetensors(file) as lazy:
      arrays, info, cls = _describe(lazy, file, folder, text, where, family, layer)
      arrays = {
        key: placement.place(
          Target(key, AXES[key]), source, mesh, storage_dtype(key, dtype), rules
        )
        for key, source in arrays.items()
      }
    return cls.from_arrays(arrays, info, dtype=dtype, name=name)
  if file.suffix == ".npz":
    raw = files.read_npz(file)
  elif file.suffix == ".safetensors":
    raw = files.read_safetensors(file)
  else:
    raise SAEError(f"{where}: {file.name!r} is neither .npz nor .safetensors.")
  arrays, info, cls = _describe(raw, file, folder, text, where, family, layer)
  sae = cls.from_arrays(arrays, info, dtype=dtype, name=name)
  if mesh is not None:
    sae = shard_sae(sae, mesh, rules)
  return sae


def _describe(
  raw: dict,
  file: pathlib.Path,
  folder: pathlib.Path,
  text: str,
  where: str,
  family: str | None,
  layer: int | None,
) -> tuple[dict, SAEInfo, type[AutoEncoder]]:
  """Canonical arrays (numpy or lazy), checked, with their `SAEInfo` and class."""
  release = hookpoints.GS1 if file.suffix == ".npz" else hookpoints.GS2
  arrays = files.canonical_arrays(raw, where)
  d_in, width, d_out = files.check_arrays(arrays, where)
  config = None
  if release == hookpoints.GS1:
    loc = hookpoints.locate_gs1(text, where, family=family, layer=layer)
  else:
    config = _read_config(folder, where)
    loc = hookpoints.locate_gs2(
      folder.name, folder.parent.name, config, where, family=family, layer=layer
    )
  _check_metadata(arrays, loc, config, where, width, d_in, d_out)
  info = SAEInfo(
    family=loc.family,
    layer=loc.layer,
    site=loc.site,
    d_in=d_in,
    width=width,
    out_site=loc.out_site,
    d_out=d_out,
    source=where,
    release=loc.release,
    l0=loc.l0,
    neuronpedia=loc.neuronpedia,
    hook_in=loc.hook_in,
    hook_out=loc.hook_out,
  )
  return arrays, info, Transcoder if loc.family == "transcoder" else AutoEncoder


def _check_metadata(
  arrays: dict,
  loc: hookpoints.Location,
  config: dict | None,
  where: str,
  width: int,
  d_in: int,
  d_out: int,
) -> None:
  """Cross-checks arrays against the family and config.json."""
  has_skip = "w_skip" in arrays
  if has_skip and loc.family != "transcoder":
    raise SAEError(
      f"{where}: has an affine skip connection but reads as a {loc.family!r}"
      " SAE; only transcoders have one (pass family='transcoder')."
    )
  if loc.affine and not has_skip:
    raise SAEError(
      f"{where}: is marked affine but has no affine_skip_connection array;"
      f" found {sorted(arrays)}."
    )
  if loc.family != "transcoder" and d_out != d_in:
    raise SAEError(
      f"{where}: an SAE reconstructs its input, but w_enc reads {d_in} and"
      f" w_dec writes {d_out} dimensions."
    )
  config_width = (config or {}).get("width", (config or {}).get("d_sae"))
  if isinstance(config_width, int) and config_width != width:
    raise SAEError(
      f"{where}: config.json says width {config_width} but the arrays have"
      f" {width} latents."
    )
