"""`gemma_surgery.atomic`: complete files replace their targets, or nothing does."""

from __future__ import annotations

import os
import stat

import pytest

from gemma_surgery import atomic


def _names(folder) -> list[str]:
  return sorted(p.name for p in folder.iterdir())


def test_write_replaces_the_file_and_keeps_its_mode(tmp_path):
  target = tmp_path / "a.html"
  target.write_text("old")
  target.chmod(0o640)
  assert atomic.write_text(target, "new ✓") == target
  assert target.read_text(encoding="utf-8") == "new ✓"
  assert stat.S_IMODE(target.stat().st_mode) == 0o640
  assert _names(tmp_path) == ["a.html"]


def test_a_new_file_gets_the_usual_mode(tmp_path):
  (tmp_path / "plain").write_bytes(b"x")  # mode from the umask
  atomic.write_bytes(tmp_path / "atomic", b"x")
  modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
  assert modes["atomic"] == modes["plain"]


def test_an_error_halfway_keeps_the_old_file_and_no_temporary(tmp_path):
  target = tmp_path / "report.html"
  target.write_text("complete old report")
  with pytest.raises(RuntimeError, match="disk full"):
    with atomic.atomic_paths(target) as (tmp,):
      with open(tmp, "w") as f:
        f.write("half of the new rep")
      raise RuntimeError("disk full")
  assert target.read_text() == "complete old report"
  assert _names(tmp_path) == ["report.html"]


def test_a_group_is_replaced_only_when_every_member_is_complete(tmp_path):
  params, config = tmp_path / "params.safetensors", tmp_path / "config.json"
  params.write_bytes(b"old params")
  config.write_text("old config")
  with pytest.raises(OSError):
    with atomic.atomic_paths(params, config) as (params_tmp, config_tmp):
      params_tmp.write_bytes(b"new params")  # complete
      raise OSError(28, "No space left on device")  # while writing the config
  assert params.read_bytes() == b"old params" and config.read_text() == "old config"
  assert _names(tmp_path) == ["config.json", "params.safetensors"]
  with atomic.atomic_paths(params, config) as (params_tmp, config_tmp):
    params_tmp.write_bytes(b"new params")
    config_tmp.write_text("new config")
  assert params.read_bytes() == b"new params" and config.read_text() == "new config"


def test_a_symlinked_target_stays_a_link(tmp_path):
  real = tmp_path / "real.png"
  real.write_bytes(b"old")
  link = tmp_path / "link.png"
  os.symlink(real, link)
  atomic.write_bytes(link, b"new")
  assert link.is_symlink() and real.read_bytes() == b"new"
  assert _names(tmp_path) == ["link.png", "real.png"]


def test_a_missing_folder_is_an_error_and_writes_nothing(tmp_path):
  with pytest.raises(FileNotFoundError):
    atomic.write_text(tmp_path / "absent" / "x.html", "x")
  assert _names(tmp_path) == []
