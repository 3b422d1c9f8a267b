"""Kaggle side of `gemma_surgery.loading.hub` (kagglehub 1.0 specifics).

Handle parsing, the kagglehub cache layout, the credentials check and the
mapping of kagglehub's exceptions to `HubError`. kagglehub is imported only
inside `call_kagglehub`.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import sys
import threading
from collections.abc import Iterator

from gemma_surgery.errors import HubError

_env_lock = threading.Lock()

LOCAL_HINT = (
  "pass a local checkpoint directory to gemma_surgery.load(...) instead of a hub id"
)


def kaggle_fix(page: str) -> str:
  return (
    f"To fix: {LOCAL_HINT}; or connect to the network and set up Kaggle "
    "credentials (~/.kaggle/kaggle.json, or $KAGGLE_CONFIG_DIR/kaggle.json, "
    "or the KAGGLE_USERNAME and KAGGLE_KEY environment variables, or "
    "KAGGLE_API_TOKEN) and accept "
    f"the Gemma license on the model page {page}"
  )


def parse_handle(handle: str) -> tuple[list[str], int | None]:
  """`(owner, model, framework, variation)` and the version (None if absent)."""
  parts = handle.strip("/").split("/")
  if len(parts) not in (4, 5) or not all(parts):
    raise HubError(
      f"invalid Kaggle model handle {handle!r}: expected "
      "'owner/model/framework/variation' or "
      "'owner/model/framework/variation/version', e.g. "
      "'google/gemma-3/flax/gemma3-1b/1'"
    )
  if len(parts) == 4:
    return parts, None
  try:
    version = int(parts[4])
  except ValueError:
    raise HubError(
      f"invalid Kaggle model handle {handle!r}: version {parts[4]!r} is not an integer"
    ) from None
  return parts[:4], version if version > 0 else None


def cache_root(cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
  """kagglehub's cache root, reading $KAGGLEHUB_CACHE at call time."""
  if cache_dir is not None:
    return pathlib.Path(cache_dir).expanduser()
  env = os.environ.get("KAGGLEHUB_CACHE")
  if env:
    return pathlib.Path(env).expanduser()
  return pathlib.Path.home() / ".cache" / "kagglehub"


def cached_versions(root: pathlib.Path, parts: list[str]) -> list[int]:
  """Versions with a complete copy in the cache (kagglehub's layout).

  kagglehub 1.0 stores `models/<owner>/<model>/<framework>/<variation>/<N>/`
  and marks it complete with the file `.../<variation>/<N>.complete`.
  """
  base = root.joinpath("models", *parts)
  if not base.is_dir():
    return []
  versions = []
  for marker in base.glob("*.complete"):
    if marker.stem.isdigit() and (base / marker.stem).is_dir():
      versions.append(int(marker.stem))
  return sorted(versions)


def credentials_present() -> bool:
  """Whether kagglehub will find credentials (env vars, files or login())."""
  env = os.environ
  if env.get("KAGGLE_USERNAME") and env.get("KAGGLE_KEY"):
    return True
  if env.get("KAGGLE_API_TOKEN"):
    return True
  config_dir = env.get("KAGGLE_CONFIG_DIR")
  folders = [pathlib.Path(config_dir)] if config_dir else []
  folders.append(pathlib.Path.home() / ".kaggle")
  names = ("kaggle.json", "access_token", "access_token.txt")
  if any((folder / name).is_file() for folder in folders for name in names):
    return True
  config = sys.modules.get("kagglehub.config")  # Set by kagglehub.login().
  return getattr(config, "_kaggle_credentials", None) is not None


def in_managed_notebook() -> bool:
  """Kaggle/Colab notebooks: kagglehub authenticates and mirrors by itself."""
  kaggle = bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) and bool(
    os.environ.get("KAGGLE_DATA_PROXY_URL")
  )
  return kaggle or "google.colab" in sys.modules


@contextlib.contextmanager
def kagglehub_cache_env(root: pathlib.Path | None) -> Iterator[None]:
  """Points kagglehub at `root` (it only reads $KAGGLEHUB_CACHE)."""
  if root is None:
    yield
    return
  with _env_lock:
    old = os.environ.get("KAGGLEHUB_CACHE")
    os.environ["KAGGLEHUB_CACHE"] = str(root)
    try:
      yield
    finally:
      if old is None:
        os.environ.pop("KAGGLEHUB_CACHE", None)
      else:
        os.environ["KAGGLEHUB_CACHE"] = old


def describe_http(e: OSError) -> str:
  """Short reason for an OSError (requests HTTP/connection error or disk)."""
  status = getattr(getattr(e, "response", None), "status_code", None)
  if status in (401, 403):
    return (
      f"access denied (HTTP {status}): wrong credentials, or the license is "
      "not accepted"
    )
  if status == 404:
    return "not found (HTTP 404): check the handle"
  if status is not None:
    return f"HTTP error {status}"
  if any(
    cls.__module__.startswith(("requests", "urllib3"))
    and cls.__name__ in {"ConnectionError", "Timeout"}
    for cls in type(e).__mro__
  ):
    return "network error (Kaggle could not be reached)"
  return "I/O error"


def call_kagglehub(handle: str, page: str, root: pathlib.Path | None) -> pathlib.Path:
  """`kagglehub.model_download(handle)` with errors mapped to HubError."""
  try:
    # Imported here, not at module level: importing hub stays offline & light.
    import kagglehub
    from kagglehub import exceptions as kh_errors
  except ImportError as e:
    raise HubError(
      f"kagglehub is not installed (pip install kagglehub). {LOCAL_HINT}"
    ) from e

  def classes(*names: str) -> tuple[type[BaseException], ...]:
    return tuple(getattr(kh_errors, n) for n in names if hasattr(kh_errors, n))

  auth_errors = classes("UnauthenticatedError", "CredentialError")
  other_errors = classes("BackendError", "NotFoundError", "DataCorruptionError")
  try:
    with kagglehub_cache_env(root):
      return pathlib.Path(kagglehub.model_download(handle))
  except auth_errors as e:
    raise HubError(
      f"Kaggle refused the credentials for {handle!r}: {e}. " + kaggle_fix(page)
    ) from e
  except other_errors as e:
    raise HubError(
      f"Kaggle download of {handle!r} failed: {type(e).__name__}: {e}. "
      + kaggle_fix(page)
    ) from e
  except OSError as e:  # requests' HTTP/connection errors are OSErrors.
    raise HubError(
      f"Kaggle download of {handle!r} failed, {describe_http(e)}: {e}. "
      + kaggle_fix(page)
    ) from e
  except ValueError as e:  # e.g. malformed kaggle.json.
    raise HubError(
      f"Kaggle download of {handle!r} failed: {e}. " + kaggle_fix(page)
    ) from e
