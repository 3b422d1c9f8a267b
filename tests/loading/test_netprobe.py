"""Tests of the fail-fast reachability probe (local sockets only)."""

from __future__ import annotations

import socket
import time

import pytest

from gemma_surgery.loading import netprobe

_PROXY_VARS = (
  "http_proxy",
  "https_proxy",
  "all_proxy",
  "no_proxy",
  "HTTP_PROXY",
  "HTTPS_PROXY",
  "ALL_PROXY",
  "NO_PROXY",
)


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch):
  for name in (*_PROXY_VARS, netprobe.SKIP_PROBE_ENV):
    monkeypatch.delenv(name, raising=False)


@pytest.fixture
def listener():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    yield server.getsockname()[1]


def _closed_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_probe_reaches_listening_port(listener):
  netprobe.probe(f"http://127.0.0.1:{listener}/api")


def test_probe_refused_port_raises_quickly():
  start = time.monotonic()
  with pytest.raises(netprobe.Unreachable, match="cannot connect"):
    netprobe.probe(f"http://127.0.0.1:{_closed_port()}")
  assert time.monotonic() - start < 3


def test_probe_unresolvable_host(monkeypatch):
  def fail(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

  monkeypatch.setattr(socket, "getaddrinfo", fail)
  with pytest.raises(netprobe.Unreachable, match="cannot resolve example.org"):
    netprobe.probe("https://example.org")


def test_probe_goes_through_configured_proxy(monkeypatch, listener):
  monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{listener}")
  netprobe.probe("https://host.invalid")  # Only the proxy is contacted.
  monkeypatch.setenv("no_proxy", "host.invalid")
  with pytest.raises(netprobe.Unreachable):
    netprobe.probe("https://host.invalid", timeout=1.0)


def test_probe_skip_env(monkeypatch):
  monkeypatch.setenv(netprobe.SKIP_PROBE_ENV, "1")
  netprobe.probe(f"http://127.0.0.1:{_closed_port()}")


def test_probe_rejects_url_without_host():
  with pytest.raises(netprobe.Unreachable, match="no host"):
    netprobe.probe("not a url")
