"""Every Python block of README.md runs, in order, on the embedded model.

The blocks run in one fresh process, sharing one namespace as a reader
pasting them top to bottom would. A block that needs what CI has not (the
network and real weights, several processes) starts with a marker comment
``# needs: <what>``; the markers are checked against a fixed list, so a block
cannot opt out silently.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

from helpers.paths import ROOT

README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```\n", README, re.S)
MARKERS = ("# needs: network", "# needs: several processes")

RUNNER = """
import json, sys, traceback
blocks = json.loads(sys.stdin.read())
namespace = {"__name__": "__readme__"}
for i, block in enumerate(blocks):
  try:
    exec(compile(block, f"README block {i + 1}", "exec"), namespace)
  except Exception:
    print(f"@@FAILED {i + 1}"); traceback.print_exc(); sys.exit(1)
print("@@OK")
"""


def _runnable() -> list[str]:
  return [b for b in BLOCKS if not b.startswith(MARKERS)]


def test_every_marker_is_a_known_one():
  marked = [b.splitlines()[0] for b in BLOCKS if b.startswith("# needs")]
  assert all(line.startswith(MARKERS) for line in marked), marked
  # Most of the README runs: only the hub-loading and multi-host blocks wait.
  assert len(marked) <= 2 and len(_runnable()) >= 9


def test_the_readme_blocks_run_in_order(tmp_path):
  (tmp_path / "tests").symlink_to(ROOT / "tests")  # "tests/fixtures/..." paths
  out = subprocess.run(
    [sys.executable, "-c", RUNNER],
    input=json.dumps(_runnable()),
    cwd=tmp_path,  # the blocks' relative paths: fixtures are linked below
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert "@@OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
