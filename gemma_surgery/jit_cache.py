"""A persistent JAX compilation cache, on by default, opt-out.

Compiling the fused generation loop or a jitted forward takes seconds even
for the embedded model; with JAX's persistent compilation cache the second
process that runs the same program loads it from disk instead. `gs.load`
calls `enable` once, so a notebook's first ``generate`` after a restart is
fast, unless:

* ``GEMMA_SURGERY_COMPILATION_CACHE=0`` (or ``off``/``false``/``no``) is set:
  nothing is changed;
* the user configured ``jax_compilation_cache_dir`` already: it is kept.

``GEMMA_SURGERY_COMPILATION_CACHE=/some/dir`` picks the folder; the default
is ``$XDG_CACHE_HOME/gemma_surgery/jax`` (``~/.cache/gemma_surgery/jax``).
Nothing happens at import time.
"""

from __future__ import annotations

import os
import pathlib
import warnings

import jax

ENV = "GEMMA_SURGERY_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no")


def default_dir() -> pathlib.Path:
  """``$XDG_CACHE_HOME/gemma_surgery/jax`` (``~/.cache/...`` by default)."""
  base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
  return pathlib.Path(base) / "gemma_surgery" / "jax"


def current_dir() -> str | None:
  """The folder JAX's persistent compilation cache uses now, if any."""
  return jax.config.jax_compilation_cache_dir or None


def enable(path: str | os.PathLike | None = None) -> str | None:
  """Turns on JAX's persistent compilation cache (see the module doc).

  Args:
    path: The cache folder; default `ENV`'s value or `default_dir`.

  Returns:
    The folder in use, or None when the cache stays off (opted out, or the
    folder cannot be created).
  """
  setting = os.environ.get(ENV, "").strip()
  if setting.lower() in _OFF:
    return None
  if current_dir() is not None:
    return current_dir()
  folder = pathlib.Path(path or setting or default_dir())
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    if path or setting:  # A folder the user chose: say why it is not used.
      warnings.warn(
        f"No compilation cache: cannot create {str(folder)!r} ({e}).", stacklevel=2
      )
    return None  # A read-only home: run without the cache.
  jax.config.update("jax_compilation_cache_dir", str(folder))
  # Cache every program: the small ones are most of a notebook's start-up.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return str(folder)
