"""The README documents the code that exists."""

from __future__ import annotations

import copy
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
