"""Every file the library writes survives a write that fails halfway.

`helpers.partial_writes` (its own process: it lowers ``RLIMIT_FSIZE``, so
writes fail with ``EFBIG`` after 4 KiB, like a full disk) writes each kind of
output once, then again with bigger content that can't fit. A failed write
must raise, leave the previous files byte for byte, and leave no temporary
file. The ``control`` kind (a plain ``Path.write_bytes``) shows the limit does
cut a non-atomic write halfway, so these tests can fail.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from helpers.paths import TESTS

import gemma_surgery

resource = pytest.importorskip("resource")  # POSIX only

KINDS = ("report", "html_view", "png", "sae", "hf")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
  out = tmp_path_factory.mktemp("partial_writes")
  env = dict(os.environ)
  package_root = pathlib.Path(gemma_surgery.__file__).parents[1]
  env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(package_root)])
  env["JAX_PLATFORMS"] = "cpu"
  done = subprocess.run(
    [sys.executable, "-m", "helpers.partial_writes", str(out)],
    capture_output=True,
    text=True,
    env=env,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_size_limit_cuts_a_plain_write_halfway(results):
  control = results["control"]
  assert "File too large" in control["error"]
  assert control["after"]["plain.bin"] != control["before"]["plain.bin"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_failed_write_keeps_the_previous_files_and_no_temporary(results, kind):
  result = results[kind]
  assert result["error"] is not None and "File too large" in result["error"]
  if kind != "hf":  # save_hf only writes into an absent or empty folder
    assert result["before"], "the previous version was written"
  assert result["after"] == result["before"]  # same names, same bytes
