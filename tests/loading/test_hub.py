"""Offline tests of gemma_surgery.loading.hub (no test touches the network)."""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys
import threading
import time

import pytest
from helpers.paths import ROOT

from gemma_surgery.errors import HubError
from gemma_surgery.loading import hub, hub_kaggle, netprobe

KAGGLE_HANDLE = "google/gemma-3/flax/gemma3-1b"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

_CLEARED_ENV = (
  "HF_HUB_CACHE",
  "HUGGINGFACE_HUB_CACHE",
  "HF_HUB_OFFLINE",
  "TRANSFORMERS_OFFLINE",
  "HF_ENDPOINT",
  "HF_TOKEN",
  "XDG_CACHE_HOME",
  "KAGGLE_USERNAME",
  "KAGGLE_KEY",
  "KAGGLE_API_TOKEN",
  "KAGGLE_KERNEL_RUN_TYPE",
  "KAGGLE_DATA_PROXY_URL",
  "http_proxy",
  "https_proxy",
  "all_proxy",
  "no_proxy",
  "HTTP_PROXY",
  "HTTPS_PROXY",
  "ALL_PROXY",
  "NO_PROXY",
  netprobe.SKIP_PROBE_ENV,
)


@pytest.fixture(autouse=True)
def isolated_env(tmp_path, monkeypatch):
  """Empty caches, no credentials, no proxies: every test starts hermetic."""
  for name in _CLEARED_ENV:
    monkeypatch.delenv(name, raising=False)
  home = tmp_path / "home"
  home.mkdir()
  monkeypatch.setenv("HOME", str(home))
  monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle_config"))
  monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub"))
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  config = sys.modules.get("kagglehub.config")
  if config is not None:
    monkeypatch.setattr(config, "_kaggle_credentials", None, raising=False)
  return tmp_path


@pytest.fixture
def no_sockets(monkeypatch):
  """Makes any DNS lookup or connection attempt fail the test."""

  def boom(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args!r}")

  monkeypatch.setattr(socket, "getaddrinfo", boom)
  monkeypatch.setattr(socket, "create_connection", boom)
  monkeypatch.setattr(socket.socket, "connect", boom)
  monkeypatch.setattr(socket.socket, "connect_ex", boom)


@pytest.fixture
def unresolvable(monkeypatch):
  """Every DNS lookup fails, like on a machine without network."""

  def fail(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  monkeypatch.setattr(socket, "getaddrinfo", fail)


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _make_hf_cache(hub_dir: pathlib.Path, repo: str = "org/name") -> pathlib.Path:
  folder = hub_dir / ("models--" + repo.replace("/", "--"))
  (folder / "refs").mkdir(parents=True)
  (folder / "refs" / "main").write_text(COMMIT)
  snapshot = folder / "snapshots" / COMMIT
  snapshot.mkdir(parents=True)
  (snapshot / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
  return snapshot


def _make_kaggle_cache(root: pathlib.Path, version: int) -> pathlib.Path:
  variation_dir = root / "models" / KAGGLE_HANDLE
  model_dir = variation_dir / str(version)
  model_dir.mkdir(parents=True)
  (model_dir / "tokenizer.model").write_bytes(b"x")
  (variation_dir / f"{version}.complete").touch()
  return model_dir


def _fix_hints(message: str) -> None:
  assert "gemma_surgery.load(" in message
  assert "local" in message


# Import ------------------------------------------------------------------


def test_import_touches_no_network_and_no_hub_library():
  code = (
    "import socket, sys\n"
    "def boom(*a, **k):\n"
    "  raise RuntimeError('network touched at import')\n"
    "class NoSocket(socket.socket):\n"
    "  __init__ = boom\n"
    "socket.socket = NoSocket\n"
    "socket.create_connection = boom\n"
    "socket.getaddrinfo = boom\n"
    "import gemma_surgery.loading.hub\n"
    "bad = {'kagglehub', 'huggingface_hub'} & set(sys.modules)\n"
    "assert not bad, bad\n"
  )
  root = ROOT
  result = subprocess.run(
    [sys.executable, "-c", code],
    cwd=root,
    capture_output=True,
    text=True,
    timeout=60,
    check=False,
  )
  assert result.returncode == 0, result.stderr


# Hugging Face ------------------------------------------------------------


def test_hf_unreachable_fails_fast(monkeypatch):
  monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
  start = time.monotonic()
  with pytest.raises(HubError) as info:
    hub.download_hf("google/gemma-3-1b-pt")
  assert time.monotonic() - start < 8
  msg = str(info.value)
  _fix_hints(msg)
  assert "unreachable" in msg
  assert "huggingface-cli login" in msg and "HF_TOKEN" in msg
  assert "https://huggingface.co/google/gemma-3-1b-pt" in msg
  assert isinstance(info.value.__cause__, OSError)


def test_hf_dns_blackhole_is_cut_short(monkeypatch):
  release = threading.Event()

  def hang(*args, **kwargs):
    release.wait(30)
    raise socket.gaierror("released")

  monkeypatch.setattr(socket, "getaddrinfo", hang)
  start = time.monotonic()
  try:
    with pytest.raises(HubError, match="no answer"):
      hub.download_hf("google/gemma-3-1b-pt")
  finally:
    release.set()
  assert time.monotonic() - start < 8


def test_hf_cache_hit_needs_no_network(isolated_env, no_sockets):
  snapshot = _make_hf_cache(isolated_env / "hf_home" / "hub")
  path = hub.download_hf("org/name")
  assert path == snapshot.resolve()
  assert hub.download_hf("org/name", allow_patterns="*.json") == path
  assert hub.download_hf("org/name", revision=COMMIT) == path


def test_hf_cache_dir_argument_and_hf_hub_cache(isolated_env, no_sockets, monkeypatch):
  custom = isolated_env / "custom_cache"
  snapshot = _make_hf_cache(custom)
  assert hub.download_hf("org/name", cache_dir=custom) == snapshot.resolve()
  monkeypatch.setenv("HF_HUB_CACHE", str(custom))
  assert hub.download_hf("org/name") == snapshot.resolve()


def test_hf_offline_mode(isolated_env, monkeypatch):
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(netprobe, "probe", _must_not_be_called)
  with pytest.raises(HubError, match="HF_HUB_OFFLINE") as info:
    hub.download_hf("org/name")
  _fix_hints(str(info.value))
  snapshot = _make_hf_cache(isolated_env / "hf_home" / "hub")
  assert hub.download_hf("org/name") == snapshot.resolve()


def test_hf_invalid_repo_id():
  with pytest.raises(HubError, match="invalid Hugging Face repo id"):
    hub.download_hf("not a/valid/repo id")


def _must_not_be_called(*args, **kwargs):
  raise AssertionError("must not be called")


def _hf_http_error(cls_name: str, status: int):
  import httpx2
  from huggingface_hub import errors

  request = httpx2.Request("GET", "https://huggingface.co/api/models/x")
  response = httpx2.Response(status, request=request)
  return getattr(errors, cls_name)(f"{status} error", response=response)


@pytest.mark.parametrize(
  ("cls_name", "status", "expected"),
  [
    ("GatedRepoError", 403, "is gated"),
    ("RepositoryNotFoundError", 404, "not found"),
    ("HfHubHTTPError", 500, "HTTP 500"),
  ],
)
def test_hf_errors_are_mapped(monkeypatch, cls_name, status, expected):
  pytest.importorskip("httpx2")
  import huggingface_hub
  from huggingface_hub import errors

  original = _hf_http_error(cls_name, status)

  def fake_snapshot_download(repo_id, *, local_files_only=False, **kwargs):
    if local_files_only:
      raise errors.LocalEntryNotFoundError("not cached")
    raise original

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
  monkeypatch.setattr(netprobe, "probe", lambda url, **kw: None)
  with pytest.raises(HubError, match=expected) as info:
    hub.download_hf("google/gemma-3-1b-pt")
  assert info.value.__cause__ is original
  assert "HF_TOKEN" in str(info.value)


def test_hf_transport_errors_are_mapped(monkeypatch):
  httpx2 = pytest.importorskip("httpx2")
  import huggingface_hub
  from huggingface_hub import errors

  original = httpx2.ConnectError("connection reset")

  def fake(repo_id, *, local_files_only=False, **kwargs):
    if local_files_only:
      raise errors.LocalEntryNotFoundError("not cached")
    raise original

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
  monkeypatch.setattr(netprobe, "probe", lambda url, **kw: None)
  with pytest.raises(HubError, match="network") as info:
    hub.download_hf("org/name")
  assert info.value.__cause__ is original


def test_hf_unknown_errors_propagate(monkeypatch):
  import huggingface_hub
  from huggingface_hub import errors

  def fake(repo_id, *, local_files_only=False, **kwargs):
    if local_files_only:
      raise errors.LocalEntryNotFoundError("not cached")
    raise KeyError("bug")

  monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
  monkeypatch.setattr(netprobe, "probe", lambda url, **kw: None)
  with pytest.raises(KeyError):
    hub.download_hf("org/name")


# Kaggle ------------------------------------------------------------------


def test_kaggle_missing_credentials_is_immediate(monkeypatch):
  monkeypatch.setattr(netprobe, "probe", _must_not_be_called)
  monkeypatch.setattr(hub_kaggle, "call_kagglehub", _must_not_be_called)
  start = time.monotonic()
  with pytest.raises(HubError, match="missing Kaggle credentials") as info:
    hub.download_kaggle(KAGGLE_HANDLE + "/1")
  assert time.monotonic() - start < 1
  msg = str(info.value)
  _fix_hints(msg)
  assert "kaggle.json" in msg and "KAGGLE_USERNAME" in msg
  assert "https://www.kaggle.com/models/google/gemma-3" in msg


@pytest.mark.parametrize("where", ["config_dir", "home", "env"])
def test_kaggle_credentials_are_found(isolated_env, monkeypatch, unresolvable, where):
  if where == "env":
    monkeypatch.setenv("KAGGLE_USERNAME", "me")
    monkeypatch.setenv("KAGGLE_KEY", "secret")
  else:
    folder = (
      pathlib.Path(os.environ["KAGGLE_CONFIG_DIR"])
      if where == "config_dir"
      else isolated_env / "home" / ".kaggle"
    )
    folder.mkdir(parents=True)
    (folder / "kaggle.json").write_text('{"username": "me", "key": "k"}')
  monkeypatch.setattr(hub_kaggle, "call_kagglehub", _must_not_be_called)
  with pytest.raises(HubError, match="unreachable"):
    hub.download_kaggle(KAGGLE_HANDLE)


def test_kaggle_unreachable_fails_fast(monkeypatch, unresolvable):
  monkeypatch.setenv("KAGGLE_USERNAME", "me")
  monkeypatch.setenv("KAGGLE_KEY", "secret")
  monkeypatch.setattr(hub_kaggle, "call_kagglehub", _must_not_be_called)
  start = time.monotonic()
  with pytest.raises(HubError) as info:
    hub.download_kaggle(KAGGLE_HANDLE + "/2")
  assert time.monotonic() - start < 8
  msg = str(info.value)
  _fix_hints(msg)
  assert "unreachable" in msg and "kaggle.json" in msg
  assert isinstance(info.value.__cause__, OSError)


def test_kaggle_versioned_cache_hit_needs_no_network(isolated_env, no_sockets):
  model_dir = _make_kaggle_cache(isolated_env / "kagglehub", version=3)
  assert hub.download_kaggle(KAGGLE_HANDLE + "/3") == model_dir


def test_kaggle_cache_layout_matches_kagglehub(isolated_env, no_sockets):
  """Our cache check agrees with the installed kagglehub, run offline."""
  kagglehub = pytest.importorskip("kagglehub")
  from kagglehub.cache import Cache
  from kagglehub.handle import parse_model_handle

  model_dir = _make_kaggle_cache(isolated_env / "kagglehub", version=3)
  handle = KAGGLE_HANDLE + "/3"
  assert Cache().load_from_cache(parse_model_handle(handle)) == str(model_dir)
  assert kagglehub.model_download(handle) == str(model_dir)


def test_kaggle_cache_dir_argument(isolated_env, no_sockets):
  custom = isolated_env / "elsewhere"
  model_dir = _make_kaggle_cache(custom, version=1)
  assert hub.download_kaggle(KAGGLE_HANDLE + "/1", cache_dir=custom) == model_dir


def test_kaggle_incomplete_or_unversioned_cache_is_not_used(isolated_env, monkeypatch):
  model_dir = _make_kaggle_cache(isolated_env / "kagglehub", version=1)
  monkeypatch.setattr(netprobe, "probe", _must_not_be_called)
  with pytest.raises(HubError, match="missing Kaggle credentials"):
    hub.download_kaggle(KAGGLE_HANDLE)  # Unversioned: needs the API.
  (model_dir.parent / "1.complete").unlink()
  with pytest.raises(HubError, match="missing Kaggle credentials"):
    hub.download_kaggle(KAGGLE_HANDLE + "/1")  # No completion marker.


def test_kaggle_offline_unversioned_suggests_cached_versions(
  isolated_env, monkeypatch, unresolvable
):
  _make_kaggle_cache(isolated_env / "kagglehub", version=2)
  monkeypatch.setenv("KAGGLE_API_TOKEN", "token")
  with pytest.raises(HubError, match=f"{KAGGLE_HANDLE}/2"):
    hub.download_kaggle(KAGGLE_HANDLE)


@pytest.mark.parametrize(
  "handle", ["google/gemma-3", "a/b/c/d/e/f", "a/b/c/d/x", "a//c/d"]
)
def test_kaggle_bad_handle(handle):
  with pytest.raises(HubError, match="invalid Kaggle model handle"):
    hub.download_kaggle(handle)


def _requests_http_error(status: int):
  import requests

  response = requests.Response()
  response.status_code = status
  return requests.HTTPError(f"{status} Client Error", response=response)


@pytest.mark.parametrize(
  ("make_error", "expected"),
  [
    (lambda: _requests_http_error(403), "access denied"),
    (lambda: _requests_http_error(404), "not found"),
    (lambda: __import__("requests").ConnectionError("refused"), "network"),
    (lambda: ValueError("Invalid Kaggle credentials file"), "credentials file"),
    (lambda: PermissionError("cache not writable"), "I/O error"),
  ],
)
def test_kaggle_errors_are_mapped(isolated_env, monkeypatch, make_error, expected):
  kagglehub = pytest.importorskip("kagglehub")
  custom = isolated_env / "custom_kaggle_cache"
  original = make_error()
  seen_cache = []

  def fake_model_download(handle, *args, **kwargs):
    seen_cache.append(os.environ.get("KAGGLEHUB_CACHE"))
    raise original

  monkeypatch.setenv("KAGGLE_USERNAME", "me")
  monkeypatch.setenv("KAGGLE_KEY", "secret")
  monkeypatch.setattr(netprobe, "probe", lambda url, **kw: None)
  monkeypatch.setattr(kagglehub, "model_download", fake_model_download)
  before = os.environ["KAGGLEHUB_CACHE"]
  with pytest.raises(HubError, match=expected) as info:
    hub.download_kaggle(KAGGLE_HANDLE + "/1", cache_dir=custom)
  assert info.value.__cause__ is original
  assert seen_cache == [str(custom)]
  assert os.environ["KAGGLEHUB_CACHE"] == before
