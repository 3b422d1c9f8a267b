"""A tiny headless-Chromium driver for tests: the DevTools protocol over a pipe.

Chromium started with `--remote-debugging-pipe` reads DevTools protocol
commands (JSON, each ending in a NUL byte) from file descriptor 3 and writes
replies and events to descriptor 4. That needs no websocket library, no
driver binary and no network port. bash wires the pipe ends onto fds 3 and 4
before exec'ing Chromium. Only what the tests use is implemented.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from typing import Any

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_chromium() -> str | None:
  """The Chromium executable: `$CHROMIUM`, else the first one on PATH."""
  env = os.environ.get("CHROMIUM")
  if env:
    return env
  for name in CANDIDATES:
    path = shutil.which(name)
    if path:
      return path
  return None


def _move_above_9(fd: int) -> int:
  high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
  os.close(fd)
  return high


class BrowserError(RuntimeError):
  pass


class Browser:
  """One headless Chromium process, driven through the DevTools pipe."""

  def __init__(self, executable: str, timeout: float = 30.0):
    self.timeout = timeout
    self._profile = tempfile.TemporaryDirectory(prefix="gsv-chromium-")
    to_chrome_r, self._to_chrome = os.pipe()
    self._from_chrome, from_chrome_w = os.pipe()
    # The child's ends move to fds >= 10, so mapping them onto 3 and 4 below
    # cannot clobber one with the other.
    to_chrome_r = _move_above_9(to_chrome_r)
    from_chrome_w = _move_above_9(from_chrome_w)

    # bash maps our pipe ends to Chromium's fds 3 (commands) and 4 (replies)
    # and execs it: no Python runs between fork and exec (JAX is threaded).
    wire = f'exec "$0" "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}'
    args = [
      shutil.which("bash") or "/bin/bash",
      "-c",
      wire,
      executable,
      "--headless",
      "--no-sandbox",  # CI runs as root
      "--disable-gpu",
      "--disable-dev-shm-usage",
      "--no-first-run",
      "--no-default-browser-check",
      "--disable-extensions",
      "--disable-background-networking",
      "--remote-debugging-pipe",
      f"--user-data-dir={self._profile.name}",
      "--window-size=1280,900",
      "about:blank",
    ]
    self._proc = subprocess.Popen(
      args,
      pass_fds=(to_chrome_r, from_chrome_w),
      stdin=subprocess.DEVNULL,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL,
    )
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    self._buf = b""
    self._next_id = 0
    self.events: list[dict[str, Any]] = []
    self.version = self.call("Browser.getVersion")["product"]

  def _send(self, method: str, params: dict | None, session: str | None) -> int:
    self._next_id += 1
    msg: dict[str, Any] = {
      "id": self._next_id,
      "method": method,
      "params": params or {},
    }
    if session:
      msg["sessionId"] = session
    os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
    return self._next_id

  def _recv(self, deadline: float) -> dict[str, Any]:
    while b"\0" not in self._buf:
      left = deadline - time.monotonic()
      if left <= 0:
        raise BrowserError("timed out waiting for Chromium")
      ready, _, _ = select.select([self._from_chrome], [], [], left)
      if ready:
        chunk = os.read(self._from_chrome, 1 << 20)
        if not chunk:
          raise BrowserError(f"Chromium exited (code {self._proc.poll()})")
        self._buf += chunk
    msg, _, self._buf = self._buf.partition(b"\0")
    return json.loads(msg)

  def call(self, method: str, params: dict | None = None, session: str | None = None):
    """Sends a command and returns its result (events seen meanwhile are kept)."""
    i = self._send(method, params, session)
    deadline = time.monotonic() + self.timeout
    while True:
      msg = self._recv(deadline)
      if msg.get("id") == i:
        if "error" in msg:
          raise BrowserError(f"{method}: {msg['error']}")
        return msg.get("result", {})
      self.events.append(msg)

  def wait_event(self, method: str, session: str | None = None) -> dict[str, Any]:
    """Waits for (and returns) the next event `method` (maybe one already seen)."""
    for k, ev in enumerate(self.events):
      if ev.get("method") == method and ev.get("sessionId") == session:
        return self.events.pop(k)
    deadline = time.monotonic() + self.timeout
    while True:
      msg = self._recv(deadline)
      if msg.get("method") == method and msg.get("sessionId") == session:
        return msg
      self.events.append(msg)

  def open(self, url: str) -> Page:
    """Opens `url` in a new tab and waits for its load event."""
    target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})[
      "sessionId"
    ]
    page = Page(self, session)
    for domain in ("Page", "Runtime", "Log", "Network"):
      self.call(f"{domain}.enable", session=session)
    self.call("Page.navigate", {"url": url}, session)
    self.wait_event("Page.loadEventFired", session)
    return page

  def close(self) -> None:
    try:
      self.call("Browser.close")
    except (BrowserError, OSError):
      pass
    try:
      self._proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._proc.kill()
      self._proc.wait()
    os.close(self._to_chrome)
    os.close(self._from_chrome)
    self._profile.cleanup()


class Page:
  """A tab: evaluate JavaScript, click and hover with real input events."""

  def __init__(self, browser: Browser, session: str):
    self.browser = browser
    self.session = session

  def eval(self, expression: str) -> Any:
    """Evaluates a JavaScript expression (awaiting promises) and returns its value."""
    res = self.browser.call(
      "Runtime.evaluate",
      {"expression": expression, "returnByValue": True, "awaitPromise": True},
      self.session,
    )
    if "exceptionDetails" in res:
      raise BrowserError(f"JavaScript error: {res['exceptionDetails']}")
    return res["result"].get("value")

  def center(self, selector: str) -> tuple[float, float]:
    """Viewport coordinates of the centre of the first element matching selector."""
    box = self.eval(
      f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
      " if (!e) return null; e.scrollIntoView({block: 'center'});"
      " const r = e.getBoundingClientRect();"
      " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
    )
    if box is None:
      raise BrowserError(f"no element matches {selector!r}")
    return box[0], box[1]

  def mouse(self, kind: str, x: float, y: float, **extra: Any) -> None:
    params = {"type": kind, "x": x, "y": y, **extra}
    self.browser.call("Input.dispatchMouseEvent", params, self.session)

  def hover(self, selector: str) -> None:
    """Moves the mouse onto the element (real mouse-move events)."""
    x, y = self.center(selector)
    self.mouse("mouseMoved", x, y)

  def click(self, selector: str) -> None:
    """Clicks the element with the left button (real press and release)."""
    x, y = self.center(selector)
    self.mouse("mouseMoved", x, y)
    self.mouse("mousePressed", x, y, button="left", clickCount=1)
    self.mouse("mouseReleased", x, y, button="left", clickCount=1)

  def wait_for(self, expression: str, timeout: float = 10.0) -> Any:
    """Polls a JavaScript expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
      value = self.eval(expression)
      if value:
        return value
      if time.monotonic() > deadline:
        raise BrowserError(f"timed out waiting for: {expression}")
      time.sleep(0.05)

  def problems(self) -> list[str]:
    """Console errors/warnings, uncaught exceptions and log errors seen so far."""
    self.eval("0")  # flush events that arrived before now
    out = []
    for ev in self.browser.events:
      if ev.get("sessionId") != self.session:
        continue
      method, params = ev.get("method"), ev.get("params", {})
      if method == "Runtime.exceptionThrown":
        out.append(f"exception: {params['exceptionDetails']}")
      elif method == "Runtime.consoleAPICalled" and params.get("type") in (
        "error",
        "warning",
        "assert",
      ):
        out.append(f"console.{params['type']}: {params.get('args')}")
      elif method == "Log.entryAdded" and params["entry"].get("level") in (
        "error",
        "warning",
      ):
        out.append(f"log: {params['entry']}")
    return out

  def requested_urls(self) -> list[str]:
    """Every URL the page requested (navigation included)."""
    self.eval("0")
    return [
      ev["params"]["request"]["url"]
      for ev in self.browser.events
      if ev.get("sessionId") == self.session
      and ev.get("method") == "Network.requestWillBeSent"
    ]
