"""Atomic file writes: a failed write never leaves a half-written file.

Every file the library writes (HTML reports and views, PNGs, SAE exports and
their ``config.json``) goes through `atomic_paths`: the bytes go to a hidden
temporary file in the target's folder, are flushed to disk, and only a complete
file replaces the target (``os.replace``, atomic on POSIX and Windows). When
writing fails halfway (disk full, quota, an exception), the previous file at the
target, if any, is untouched and the temporary file is removed::

    with atomic_paths(folder / "params.safetensors") as (tmp,):
      save_file(arrays, str(tmp))

    atomic.write_text(path, html)
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import secrets
import stat
from collections.abc import Iterator

_TEMP_SUFFIX = ".partial"


def _target(path: str | os.PathLike) -> pathlib.Path:
  """The file to replace: a symlink's destination (the link stays a link)."""
  path = pathlib.Path(path)
  return pathlib.Path(os.path.realpath(path)) if path.is_symlink() else path


def _create_temp(target: pathlib.Path) -> pathlib.Path:
  """A new empty file beside ``target``, with the target's mode if it exists
  (else the default mode the umask gives a new file)."""
  while True:
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}{_TEMP_SUFFIX}")
    try:
      fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
      continue
    os.close(fd)
    try:
      if target.exists():
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode))
    except BaseException:
      tmp.unlink(missing_ok=True)
      raise
    return tmp


def _fsync(path: pathlib.Path, flags: int = os.O_RDWR) -> None:
  """Flushes a file (opened read-write: Windows can't sync a read-only fd)."""
  fd = os.open(path, flags)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _fsync_folder(folder: pathlib.Path) -> None:
  """Makes the renames durable where the OS allows (POSIX; not Windows)."""
  with contextlib.suppress(OSError):
    _fsync(folder, os.O_RDONLY)


@contextlib.contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[pathlib.Path]]:
  """Temporary paths to write; each replaces its target when the block succeeds.

  Args:
    *paths: The target files (their folders must exist).

  Yields:
    One temporary path per target, in the same folder, already created empty.
    Write each completely (by name: any writer that takes a path works).

  On an exception in the block, or while flushing, no target is touched and
  every temporary file is removed. The targets are replaced one after the
  other at the very end, so a group (e.g. weights + config) is only replaced
  once every member is complete.
  """
  targets = [_target(p) for p in paths]
  temps: list[pathlib.Path] = []
  try:
    for target in targets:
      temps.append(_create_temp(target))
    yield list(temps)
    for tmp in temps:
      _fsync(tmp)
    for tmp, target in zip(temps, targets, strict=True):
      os.replace(tmp, target)
  except BaseException:
    for tmp in temps:
      tmp.unlink(missing_ok=True)  # already gone once replaced
    raise
  for folder in {target.parent for target in targets}:
    _fsync_folder(folder)


def write_bytes(path: str | os.PathLike, data: bytes) -> pathlib.Path:
  """Writes ``data`` to ``path`` atomically (see `atomic_paths`); returns it."""
  with atomic_paths(path) as (tmp,), open(tmp, "wb") as f:
    f.write(data)
  return pathlib.Path(path)


def write_text(
  path: str | os.PathLike, text: str, encoding: str = "utf-8"
) -> pathlib.Path:
  """Writes ``text`` to ``path`` atomically (see `atomic_paths`); returns it."""
  return write_bytes(path, text.encode(encoding))
