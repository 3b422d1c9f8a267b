"""Download Gemma checkpoints from Kaggle or Hugging Face, failing fast offline.

`download_kaggle` wraps `kagglehub.model_download`; `download_hf` wraps
`huggingface_hub.snapshot_download`. Both:

* use the libraries' own caches (`KAGGLEHUB_CACHE`; `HF_HUB_CACHE` /
  `HF_HOME`, read at call time) or `cache_dir`, and show the libraries' tqdm
  progress bars (`HF_HUB_DISABLE_PROGRESS_BARS=1` silences Hugging Face's);
* return a complete cached copy without any network access;
* otherwise probe the hub host for at most ~2.5 s before calling the library
  (set `GEMMA_SURGERY_SKIP_NETWORK_PROBE=1` to skip the probe), so a machine
  without network gets a `HubError` in seconds instead of retries;
* raise `HubError` (with the library's exception chained) saying what failed
  and how to fix it.

Files only ever land in the libraries' caches, which download to temporary
`.incomplete` files and mark completion themselves; nothing is copied into
user directories. The hub libraries are imported inside the functions:
importing this module touches neither them nor the network.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from collections.abc import Sequence

from gemma_surgery.errors import HubError
from gemma_surgery.loading import hub_kaggle as _kaggle
from gemma_surgery.loading import netprobe

logger = logging.getLogger(__name__)

_KAGGLE_HOST = "https://api.kaggle.com"
_HF_DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "true", "yes", "on", "t"}
_HTTP_LIBS = {"httpx", "httpx2", "httpcore", "httpcore2"}


# Kaggle ------------------------------------------------------------------


def download_kaggle(
  handle: str, *, cache_dir: str | os.PathLike[str] | None = None
) -> pathlib.Path:
  """Downloads (or finds in the cache) a Kaggle model.

  Args:
    handle: `owner/model/framework/variation[/version]`, e.g.
      `'google/gemma-3/flax/gemma3-1b/1'`. Only versioned handles can be
      served from the cache without network: kagglehub asks the API for the
      latest version of an unversioned handle.
    cache_dir: kagglehub cache root; defaults to `$KAGGLEHUB_CACHE` or
      `~/.cache/kagglehub`. (Applied by setting `KAGGLEHUB_CACHE` for the
      duration of the call, under a lock.)

  Returns:
    The directory holding the model files.

  Raises:
    HubError: If the handle is malformed, credentials are missing, the
      network is unreachable, access is denied, or the download fails.
  """
  parts, version = _kaggle.parse_handle(handle)
  page = f"https://www.kaggle.com/models/{parts[0]}/{parts[1]}"
  root = _kaggle.cache_root(cache_dir)
  cached = _kaggle.cached_versions(root, parts)
  if version is not None and version in cached:
    path = root.joinpath("models", *parts, str(version))
    logger.info("Using cached Kaggle model %s at %s", handle, path)
    return path
  managed = _kaggle.in_managed_notebook()
  if not managed and not _kaggle.credentials_present():
    raise HubError(
      f"missing Kaggle credentials: cannot download {handle!r} (Gemma models "
      "are gated, anonymous downloads are refused). " + _kaggle.kaggle_fix(page)
    )
  if not managed:
    try:
      netprobe.probe(_KAGGLE_HOST)
    except netprobe.Unreachable as e:
      hint = ""
      if version is None and cached:
        hint = (
          f" Cached complete versions: {cached}; use a versioned handle such "
          f"as {'/'.join(parts)}/{cached[-1]} to load one offline."
        )
      raise HubError(
        f"cannot download Kaggle model {handle!r}: the Kaggle API is "
        f"unreachable ({e}).{hint} " + _kaggle.kaggle_fix(page)
      ) from e
  override = None if cache_dir is None else root
  return _kaggle.call_kagglehub(handle, page, override)


# Hugging Face ------------------------------------------------------------


def _hf_fix(repo_id: str) -> str:
  return (
    f"To fix: {_kaggle.LOCAL_HINT}; or connect to the network and set up "
    "Hugging Face credentials (`huggingface-cli login`, or the HF_TOKEN "
    "environment variable) and accept the gated repo's license at "
    f"https://huggingface.co/{repo_id}"
  )


def _hf_cache_dir(cache_dir: str | os.PathLike[str] | None) -> pathlib.Path:
  """Hub cache dir from the environment *now* (huggingface_hub reads it once)."""
  if cache_dir is not None:
    return pathlib.Path(cache_dir).expanduser()
  env = os.environ
  explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
  if explicit:
    return pathlib.Path(os.path.expandvars(explicit)).expanduser()
  home = env.get("HF_HOME") or os.path.join(
    env.get("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"
  )
  return pathlib.Path(os.path.expandvars(home)).expanduser() / "hub"


def _hf_offline() -> bool:
  env = os.environ
  flag = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
  if flag.strip().lower() in _TRUE:
    return True
  constants = sys.modules.get("huggingface_hub.constants")
  return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _hf_endpoint() -> str:
  return (os.environ.get("HF_ENDPOINT") or _HF_DEFAULT_ENDPOINT).rstrip("/")


def download_hf(
  repo_id: str,
  *,
  revision: str | None = None,
  allow_patterns: str | Sequence[str] | None = None,
  cache_dir: str | os.PathLike[str] | None = None,
  token: str | bool | None = None,
) -> pathlib.Path:
  """Downloads (or finds in the cache) a Hugging Face model snapshot.

  A cached snapshot for `revision` is returned first, without contacting the
  Hub (so a cached branch like `main` is not refreshed; with
  huggingface_hub >= 2 the cached file listing is used to reject partial
  snapshots).

  Args:
    repo_id: e.g. `'google/gemma-3-1b-pt'`.
    revision: Branch, tag or commit hash (default `main`).
    allow_patterns: Glob(s) of files to fetch, e.g. `['*.json',
      '*.safetensors']`.
    cache_dir: Hub cache directory; defaults to `$HF_HUB_CACHE` or
      `$HF_HOME/hub` (`~/.cache/huggingface/hub`).
    token: Access token; `None` uses the stored login / `HF_TOKEN`.

  Returns:
    The snapshot directory.

  Raises:
    HubError: If the snapshot is not cached and offline mode is on, the Hub
      is unreachable, the repo is gated / missing / private, or the download
      fails.
  """
  try:
    # Imported here, not at module level: importing hub stays offline & light.
    import huggingface_hub
    from huggingface_hub import errors as hf_errors
  except ImportError as e:
    raise HubError(
      f"huggingface_hub is not installed (pip install huggingface_hub). "
      f"{_kaggle.LOCAL_HINT}"
    ) from e
  cache = _hf_cache_dir(cache_dir)
  patterns = [allow_patterns] if isinstance(allow_patterns, str) else allow_patterns
  common = {
    "revision": revision,
    "allow_patterns": None if patterns is None else list(patterns),
    "cache_dir": str(cache),
  }
  try:
    path = huggingface_hub.snapshot_download(repo_id, local_files_only=True, **common)
    logger.info("Using cached Hugging Face snapshot %s at %s", repo_id, path)
    return pathlib.Path(path)
  except hf_errors.LocalEntryNotFoundError as e:
    local_miss: Exception = e
  except ValueError as e:  # HFValidationError: malformed repo id / revision.
    raise HubError(f"invalid Hugging Face repo id {repo_id!r}: {e}") from e
  where = f"{repo_id!r} (revision {revision or 'main'})"
  if _hf_offline():
    raise HubError(
      f"{where} has no complete snapshot in the Hugging Face cache "
      f"{str(cache)!r} and offline mode is on (HF_HUB_OFFLINE). Unset "
      "HF_HUB_OFFLINE to download. " + _hf_fix(repo_id)
    ) from local_miss
  endpoint = _hf_endpoint()
  try:
    netprobe.probe(endpoint)
  except netprobe.Unreachable as e:
    raise HubError(
      f"cannot download {where}: no complete snapshot in the cache "
      f"{str(cache)!r} and the Hub ({endpoint}) is unreachable ({e}). "
      + _hf_fix(repo_id)
    ) from e
  try:
    return pathlib.Path(
      huggingface_hub.snapshot_download(repo_id, token=token, **common)
    )
  except Exception as e:
    mapped = _map_hf_error(e, where, repo_id, hf_errors)
    if mapped is None:
      raise
    raise mapped from e


def _map_hf_error(
  e: Exception, where: str, repo_id: str, hf_errors: object
) -> HubError | None:
  """HubError for known download failures; None for anything else."""
  fix = _hf_fix(repo_id)

  def err(name: str) -> type | tuple:
    return getattr(hf_errors, name, ())

  if isinstance(e, err("GatedRepoError")):
    return HubError(
      f"{where} is gated: you are not logged in or have not accepted its "
      f"license ({e}). " + fix
    )
  if isinstance(e, err("RepositoryNotFoundError")):
    return HubError(
      f"{where} was not found, or it is private and the token has no access "
      f"({e}). Check the repo id. " + fix
    )
  if isinstance(e, err("RevisionNotFoundError")):
    return HubError(f"revision not found for {where}: {e}")
  if isinstance(e, err("LocalEntryNotFoundError")):
    return HubError(
      f"cannot download {where}: the Hub could not be reached and no cached "
      f"copy exists ({e}). " + fix
    )
  if isinstance(e, err("HfHubHTTPError")):
    status = getattr(getattr(e, "response", None), "status_code", "?")
    return HubError(
      f"Hugging Face download of {where} failed (HTTP {status}): {e}. " + fix
    )
  if _is_connection_error(e) or isinstance(e, OSError):
    return HubError(
      f"Hugging Face download of {where} failed, network or disk error "
      f"({type(e).__name__}: {e}). " + fix
    )
  return None


def _is_connection_error(e: Exception) -> bool:
  """httpx/httpx2/requests transport errors (without importing them)."""
  names = {"TransportError", "ConnectError", "TimeoutException"}
  return any(
    cls.__module__.split(".")[0] in _HTTP_LIBS and cls.__name__ in names
    for cls in type(e).__mro__
  )
