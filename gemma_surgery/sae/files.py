"""Reading and writing SAE parameter files (Gemma Scope ``.npz``, ``.safetensors``).

Both formats hold five float arrays; the canonical (lowercase) names and
shapes are::

  w_enc [d_in, F]   b_enc [F]   threshold [F]
  w_dec [F, d_out]  b_dec [d_out]
  w_skip [d_in, d_out]   (affine transcoders only)

Gemma Scope 1 ``params.npz`` files use ``W_enc``/``W_dec`` (its transcoders
use lowercase ``w_enc``…); Gemma Scope 2 ``params.safetensors`` use lowercase
names and ``affine_skip_connection`` for the skip. Pickled npz entries are
never loaded (``allow_pickle=False``).
"""

from __future__ import annotations

import contextlib
import json
import pathlib
import zipfile
from collections.abc import Iterator
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from gemma_surgery import atomic
from gemma_surgery.errors import SAEError
from gemma_surgery.host import to_numpy
from gemma_surgery.loading.placement import LazyArray
from gemma_surgery.sae.autoencoders import AutoEncoder

REQUIRED = ("w_enc", "w_dec", "b_enc", "b_dec", "threshold")
OPTIONAL = ("w_skip",)
# Names found in released files -> canonical names.
_ALIASES = {
  "w_enc": "w_enc",
  "W_enc": "w_enc",
  "w_dec": "w_dec",
  "W_dec": "w_dec",
  "b_enc": "b_enc",
  "b_dec": "b_dec",
  "threshold": "threshold",
  "affine_skip_connection": "w_skip",
  "w_skip": "w_skip",
  "W_skip": "w_skip",
}


def read_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads every array of an ``.npz`` file without unpickling anything.

  Raises:
    SAEError: Missing file, not an npz, or pickled / object entries.
  """
  if not path.is_file():
    raise SAEError(f"SAE file {str(path)!r} does not exist.")
  with path.open("rb") as f:
    magic = f.read(4)
  if magic != b"PK\x03\x04":  # Not a zip: a pickle (protocol 2+) or garbage.
    what = "a pickle" if magic[:1] == b"\x80" else "not an npz (zip) archive"
    raise SAEError(
      f"Cannot read {str(path)!r}: it is {what}. Pickles are never loaded (they"
      " can run arbitrary code); Gemma Scope npz files hold plain float arrays."
    )
  try:
    data = np.load(path, allow_pickle=False)
    with data:
      return {name: data[name] for name in data.files}
  except SAEError:
    raise
  except ValueError as e:
    if "pickle" in str(e).lower():
      raise SAEError(
        f"{str(path)!r} contains pickled (object) data, which is never loaded"
        " (it can run arbitrary code). Gemma Scope npz files hold plain float"
        " arrays; re-save the arrays with np.savez."
      ) from e
    raise SAEError(f"Cannot read {str(path)!r} as an npz archive: {e}") from e
  except (OSError, zipfile.BadZipFile, EOFError) as e:
    raise SAEError(f"Cannot read {str(path)!r} as an npz archive: {e}") from e


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Reads a ``.safetensors`` file as numpy arrays.

  Raises:
    SAEError: Missing or unreadable file.
  """
  if not path.is_file():
    raise SAEError(f"SAE file {str(path)!r} does not exist.")
  from safetensors.numpy import load_file  # Light, but only needed here.

  try:
    return load_file(str(path))
  except Exception as e:  # safetensors raises its own SafetensorError.
    raise SAEError(f"Cannot read {str(path)!r} as safetensors: {e}") from e


def _read_slice(tensor: Any, index: tuple, path: pathlib.Path, name: str) -> np.ndarray:
  """``tensor[index]`` of an open safetensors slice (tests count the calls)."""
  import safetensors

  try:
    return tensor[index]
  except safetensors.SafetensorError as e:
    raise SAEError(f"Cannot read {name!r} from {str(path)!r}: {e}") from e


@contextlib.contextmanager
def open_safetensors(path: pathlib.Path) -> Iterator[dict[str, Any]]:
  """A ``.safetensors`` file's tensors as `LazyArray` s, while it is open.

  Only the header is parsed; each ``LazyArray.read(index)`` reads just that
  slice (``safe_open(...).get_slice``), so a process placing an SAE on a mesh
  reads only its devices' shards.

  Raises:
    SAEError: Missing or unreadable file, or a dtype safetensors can't map.
  """
  import ml_dtypes  # noqa: F401  (registers bfloat16 with numpy)
  import safetensors

  if not path.is_file():
    raise SAEError(f"SAE file {str(path)!r} does not exist.")
  dtypes = {"F64": np.float64, "F32": np.float32, "F16": np.float16}
  dtypes["BF16"] = ml_dtypes.bfloat16
  try:
    with safetensors.safe_open(str(path), framework="numpy") as f:
      lazy = {}
      for name in f.keys():
        tensor = f.get_slice(name)
        stored = tensor.get_dtype()
        if stored not in dtypes:
          raise SAEError(
            f"{str(path)!r}: {name} has dtype {stored}; SAE arrays must be floats."
          )

        def read(index, tensor=tensor, name=name):
          return _read_slice(tensor, index, path, name)

        shape = tuple(int(n) for n in tensor.get_shape())
        lazy[name] = LazyArray(shape=shape, dtype=np.dtype(dtypes[stored]), read=read)
      yield lazy
  except safetensors.SafetensorError as e:
    raise SAEError(f"Cannot read {str(path)!r} as safetensors: {e}") from e


def canonical_arrays(arrays: dict[str, np.ndarray], where: str) -> dict:
  """Renames to canonical names and checks the set of keys.

  Raises:
    SAEError: Missing, unknown or duplicated keys (lists found vs expected).
  """
  out: dict[str, np.ndarray] = {}
  unknown = []
  for key, value in arrays.items():
    name = _ALIASES.get(key)
    if name is None:
      unknown.append(key)
      continue
    if name in out:
      raise SAEError(f"{where}: two arrays map to {name!r} (found {sorted(arrays)}).")
    out[name] = value
  missing = [k for k in REQUIRED if k not in out]
  if missing or unknown:
    raise SAEError(
      f"{where}: unexpected SAE keys. Found {sorted(arrays)}; expected"
      f" W_enc/w_enc, W_dec/w_dec, b_enc, b_dec, threshold (and optionally"
      f" affine_skip_connection). Missing: {missing}; unknown: {sorted(unknown)}."
    )
  for key, value in out.items():
    if value.dtype.kind != "f":
      raise SAEError(
        f"{where}: {key} has dtype {value.dtype}; SAE arrays must be floats."
      )
  return out


def check_arrays(arrays: dict[str, np.ndarray], where: str) -> tuple[int, int, int]:
  """Checks that shapes are consistent; returns ``(d_in, width, d_out)``.

  Raises:
    SAEError: Wrong ranks or inconsistent sizes, naming every shape.
  """
  shapes = {k: tuple(v.shape) for k, v in arrays.items()}
  expected_rank = {"w_enc": 2, "w_dec": 2, "w_skip": 2}
  for key, shape in shapes.items():
    if len(shape) != expected_rank.get(key, 1):
      raise SAEError(
        f"{where}: {key} has shape {shape}, expected rank"
        f" {expected_rank.get(key, 1)}. Shapes: {shapes}."
      )
  d_in, width = shapes["w_enc"]
  d_out = shapes["w_dec"][1]
  expected = {
    "w_enc": (d_in, width),
    "w_dec": (width, d_out),
    "b_enc": (width,),
    "b_dec": (d_out,),
    "threshold": (width,),
    "w_skip": (d_in, d_out),
  }
  bad = {k: s for k, s in shapes.items() if s != expected[k]}
  if bad:
    want = {k: expected[k] for k in shapes}
    raise SAEError(
      f"{where}: inconsistent SAE shapes {bad}; with w_enc {shapes['w_enc']}"
      f" and w_dec {shapes['w_dec']} (d_in={d_in}, width={width},"
      f" d_out={d_out}) expected {want}."
    )
  return d_in, width, d_out


def save_gemma_scope_2(
  sae: AutoEncoder, folder: Any, *, l0: str, model_name: str
) -> None:
  """Writes ``params.safetensors`` + ``config.json`` in the Gemma Scope 2 layout.

  Args:
    sae: The SAE or transcoder (a transcoder's ``info.hook_out`` names its
      output hook; an affine one also writes ``affine_skip_connection``).
    folder: Output folder, conventionally ``<family>/layer_L_width_W_l0_X``
      (e.g. ``resid_post/layer_1_width_512_l0_medium``).
    l0: The L0 label written to ``config.json`` (``small``/``medium``/``big``).
    model_name: The model it was trained on.

  Both files are written atomically, as a pair (`gemma_surgery.atomic`): if
  writing fails, an SAE already in ``folder`` stays complete and unchanged.
  """
  folder = pathlib.Path(folder)
  folder.mkdir(parents=True, exist_ok=True)
  arrays = {
    name: np.ascontiguousarray(
      to_numpy(getattr(sae, attr).value.unwrap(*axes), np.float32)
    )
    for name, attr, axes in (
      ("w_enc", "w_enc", ("embedding", "latents")),
      ("w_dec", "w_dec", ("latents", "embedding")),
      ("b_enc", "b_enc", ("latents",)),
      ("b_dec", "b_dec", ("embedding",)),
    )
  }
  arrays["threshold"] = to_numpy(
    sae.activation.threshold.value.unwrap("latents"), np.float32
  )
  skip = getattr(sae, "w_skip", None)
  if skip is not None:
    arrays["affine_skip_connection"] = np.ascontiguousarray(
      to_numpy(skip.value.unwrap("embedding", "embedding_out"), np.float32)
    )
  transcoder = sae.info.family == "transcoder"
  config = dict(
    hf_hook_point_in=sae.info.hook_in,
    hf_hook_point_out=(sae.info.hook_out if transcoder else None) or sae.info.hook_in,
    width=sae.info.width,
    l0=l0,
    model_name=model_name,
    architecture="jump_relu",
    affine_connection=skip is not None,
    type="transcoder" if transcoder else "sae",
  )
  targets = (folder / "params.safetensors", folder / "config.json")
  with atomic.atomic_paths(*targets) as (params_tmp, config_tmp):
    save_file(arrays, str(params_tmp))
    config_tmp.write_text(json.dumps(config, indent=2) + "\n")
