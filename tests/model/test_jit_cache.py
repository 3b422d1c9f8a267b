"""The persistent compilation cache: on after `gs.load`, opt-out, user's wins."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers.paths import ROOT

PROBE = """
import json, time, jax
import gemma_surgery as gs
before = jax.config.jax_compilation_cache_dir
lm = gs.load("tiny", progress=False)
t = time.perf_counter()
gs.generate(lm.model, ["def f"], max_new_tokens=4, tokenizer=lm.tokenizer)
print(json.dumps({"before": before, "after": jax.config.jax_compilation_cache_dir,
                  "generate_s": time.perf_counter() - t}))
"""


def _probe(env_value: str | None, tmp_path, extra: str = "") -> dict:
  env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "xdg"))
  env.pop("GEMMA_SURGERY_COMPILATION_CACHE", None)
  if env_value is not None:
    env["GEMMA_SURGERY_COMPILATION_CACHE"] = env_value
  out = subprocess.run(
    [sys.executable, "-c", extra + PROBE],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_load_turns_the_cache_on_and_a_second_process_uses_it(tmp_path):
  first = _probe(None, tmp_path)
  folder = tmp_path / "xdg" / "gemma_surgery" / "jax"
  assert first["before"] is None and first["after"] == str(folder)
  written = {p.name for p in folder.iterdir()}
  assert written, "nothing was cached"
  second = _probe(None, tmp_path)
  # The second process compiles nothing new: the cache holds every program.
  assert {p.name for p in folder.iterdir()} == written
  assert second["generate_s"] < first["generate_s"]


@pytest.mark.parametrize("value", ["0", "off"])
def test_the_cache_can_be_turned_off(tmp_path, value):
  result = _probe(value, tmp_path)
  assert result["after"] is None
  assert not (tmp_path / "xdg").exists()


def test_a_folder_the_user_chose_wins(tmp_path):
  mine = tmp_path / "mine"
  extra = f"import jax; jax.config.update('jax_compilation_cache_dir', {str(mine)!r})\n"
  result = _probe(str(tmp_path / "other"), tmp_path, extra)
  assert result["after"] == str(mine)
  assert not (tmp_path / "other").exists()


def test_a_chosen_folder_that_cannot_be_made_is_a_warning(tmp_path, monkeypatch):
  from gemma_surgery import jit_cache

  blocker = tmp_path / "a_file"
  blocker.write_text("")
  monkeypatch.setenv(jit_cache.ENV, str(blocker / "cache"))
  assert jit_cache.current_dir() is None  # the tests run without a cache
  with pytest.warns(UserWarning, match="a_file"):
    assert jit_cache.enable() is None
  assert jit_cache.current_dir() is None
