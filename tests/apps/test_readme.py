"""The README documents the code that exists."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

from helpers.paths import ROOT

import gemma_surgery
from gemma_surgery import assets as gs_assets
from gemma_surgery.surgery import sites

README = (ROOT / "README.md").read_text()


def test_site_table_matches_the_code():
  for site, axes, tl_name, doc in sites.sites_table():
    row = f"| `{site}` | {axes} | `{tl_name}` | {doc} |"
    assert row in README, f"README site table is missing or stale: {row}"


def test_public_api_names_are_documented():
  missing = [
    name
    for name in gemma_surgery.__all__
    if not name.endswith("Error") and f"`{name}" not in README
  ]
  assert not missing, f"undocumented public names: {missing}"


def test_embedded_model_table_is_the_manifests():
  sys.path.insert(0, str(ROOT / "scripts"))
  import readme_embedded

  rows = readme_embedded.table_rows()
  table = "\n".join(rows)
  assert table in README, "README's embedded-model table is stale: run" + (
    " scripts/readme_embedded.py"
  )
  # Negative control: a changed number is noticed.
  manifest = copy.deepcopy(gs_assets.manifest())
  manifest["metrics"]["heldout_loss"] += 1.0
  assert "\n".join(readme_embedded.table_rows(manifest)) not in README


def test_the_quickstart_runs_verbatim_and_steering_shows():
  start = README.index("## Quickstart")
  begin = README.index("```python\n", start) + len("```python\n")
  body = README[begin : README.index("```\n", begin)]
  assert len(body.strip().splitlines()) <= 15
  # The block runs as written; the lines after it only report what it made.
  check = (
    "\nimport json\n"
    "texts = [gs.generate(m, ['The default value is'], max_new_tokens=12,"
    " tokenizer=tok).text[0] for m in (model, steered)]\n"
    "print('@@' + json.dumps(texts))\n"
  )
  out = subprocess.run(
    [sys.executable, "-c", body + check],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  assert "'embedding': 256" in lines[0] and "'latents': 1024" in lines[1]
  base, steered = json.loads(out.stdout.split("@@")[-1])
  assert base.strip() and base != steered, (base, steered)


def test_the_cli_synopsis_is_the_parsers():
  from gemma_surgery import cli

  lines = cli.synopsis()
  assert "\n".join(lines) in README, "run cli.synopsis() into the README"
  flags = ("--max-new-tokens", "--dtype", "--tokenizer", "--k", "--init-timeout")
  assert all(flag in README for flag in flags)
