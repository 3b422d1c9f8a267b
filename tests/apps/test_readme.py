"""The README documents the code that exists."""

from __future__ import annotations

from helpers.paths import ROOT

import gemma_surgery
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
