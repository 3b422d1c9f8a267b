"""Quick reachability probe so that hub downloads fail fast without network.

The hub libraries retry and wait on long timeouts when there is no network;
`probe` answers in a couple of seconds at most: a DNS lookup (run in a
daemon thread, since `getaddrinfo` has no timeout of its own) and a TCP
connect to the host, or to the HTTP(S) proxy configured for it in the
environment (`https_proxy`, `no_proxy`, ...). Nothing here runs at import.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import urllib.parse

DEFAULT_TIMEOUT_S = 2.5
SKIP_PROBE_ENV = "GEMMA_SURGERY_SKIP_NETWORK_PROBE"


class Unreachable(OSError):
  """The probed host could not be resolved or connected to in time."""


def _target(url: str) -> tuple[str, int, str]:
  """Returns `(host, port, description)` to connect to for `url`."""
  # Lazy: urllib.request pulls in http.client and ssl.
  from urllib import request as urllib_request

  parts = urllib.parse.urlsplit(url)
  if not parts.hostname:
    raise Unreachable(f"cannot probe {url!r}: no host name in the URL")
  scheme = parts.scheme or "https"
  default_port = 443 if scheme == "https" else 80
  host, port = parts.hostname, parts.port or default_port
  proxies = urllib_request.getproxies()
  proxy = proxies.get(scheme) or proxies.get("all")
  if proxy and not urllib_request.proxy_bypass(host):
    pparts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if pparts.hostname:
      pport = pparts.port or (443 if pparts.scheme == "https" else 80)
      return pparts.hostname, pport, f"{host} (via proxy {pparts.hostname}:{pport})"
  return host, port, f"{host}:{port}"


def _resolve(host: str, port: int, timeout: float) -> list[tuple]:
  result: dict[str, object] = {}

  def run() -> None:
    try:
      result["addrs"] = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except Exception as e:  # noqa: BLE001 - handed to the calling thread.
      result["error"] = e

  thread = threading.Thread(target=run, name="gemma-surgery-dns", daemon=True)
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    raise Unreachable(f"DNS lookup of {host} got no answer within {timeout:.1f} s")
  error = result.get("error")
  if isinstance(error, (OSError, UnicodeError)):
    raise Unreachable(f"cannot resolve {host}: {error}") from error
  if error is not None:
    raise error  # type: ignore[misc]
  return result["addrs"]  # type: ignore[return-value]


def probe(url: str, *, timeout: float = DEFAULT_TIMEOUT_S) -> None:
  """Checks that the host of `url` accepts TCP connections.

  Skipped (returns at once) when the environment variable
  `GEMMA_SURGERY_SKIP_NETWORK_PROBE` is `1`/`true`, for networks where a
  direct TCP check is not representative.

  Args:
    url: An `http(s)://host[:port]/...` URL.
    timeout: Total time budget in seconds for DNS and connect.

  Raises:
    Unreachable: If the host (or its proxy) cannot be resolved or connected
      to within `timeout`.
  """
  if os.environ.get(SKIP_PROBE_ENV, "").strip().lower() in {"1", "true", "yes"}:
    return
  deadline = time.monotonic() + timeout
  host, port, what = _target(url)
  addrs = _resolve(host, port, timeout)
  last_error: OSError | None = None
  for family, kind, proto, _, addr in addrs:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
      break
    try:
      with socket.socket(family, kind, proto) as sock:
        sock.settimeout(remaining)
        sock.connect(addr)
      return
    except OSError as e:
      last_error = e
  reason = last_error if last_error is not None else "timed out"
  raise Unreachable(f"cannot connect to {what}: {reason}")
