"""Writing BENCHMARKS.md tables from `bench/run_all.py` results.

The results file (JSON) holds ``meta`` (date, versions, CPU count, command,
the load rule) and ``benchmarks``: per benchmark its ``command``, load record
(``load_before``, ``load_during`` 1-minute load averages, ``other_cpu``: the
CPU cores used by processes other than the benchmark while it ran, from
/proc/stat) and ``loaded`` flag, and its ``figures``.

`update_markdown` replaces the text between ``<!-- bench:begin NAME -->`` and
``<!-- bench:end NAME -->`` in BENCHMARKS.md with `render_benchmark`'s table
(``NAME`` = ``run`` for the run's header), and adds missing blocks to a
section at the top; everything outside the markers is left as it is. No
number in these blocks is typed by hand.
"""

from __future__ import annotations

import re
from typing import Any

SECTION = "## One-command results (`bench/run_all.py`)"
_BLOCK = re.compile(
  r"<!-- bench:begin (?P<name>[\w.-]+) -->\n.*?<!-- bench:end (?P=name) -->",
  re.DOTALL,
)


def _format(value: Any, unit: str) -> str:
  if isinstance(value, bool):
    return "yes" if value else "**no**"
  if isinstance(value, float):
    text = f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
  else:
    text = str(value)
  if unit == "x":
    return f"{text}×"
  if unit == "%":
    return f"{text} %"
  return f"{text} {unit}".strip()


def _load_line(bench: dict) -> str:
  parts = []
  if bench.get("load_before") is not None:
    parts.append(f"load average {bench['load_before']:.2f} before")
  during = bench.get("load_during")
  if during:
    parts.append(f"{min(during):.2f}–{max(during):.2f} during")
  if bench.get("other_cpu") is not None:
    parts.append(f"other processes used {bench['other_cpu']:.2f} cores")
  status = (
    "**measured under load: not a clean figure**" if bench.get("loaded") else "quiet"
  )
  return f"{status} ({', '.join(parts)})" if parts else status


def render_benchmark(name: str, bench: dict) -> str:
  """The Markdown block of one benchmark (without markers)."""
  when = f" ({bench['date']})" if bench.get("date") else ""
  lines = [
    f"`{bench.get('command', name)}`{when} — {_load_line(bench)},"
    f" {bench['seconds']:.0f} s",
    "",
  ]
  if bench.get("error"):
    lines.append(f"**failed**: `{bench['error']}`")
    return "\n".join(lines)
  tag = " (loaded)" if bench.get("loaded") else ""
  lines += ["| figure | value | goal |", "|---|---|---|"]
  for fig in bench["figures"]:
    label = fig["label"] + (f" — {fig['note']}" if fig.get("note") else "")
    label = label.replace("|", "\\|")
    value = _format(fig["value"], fig.get("unit", ""))
    lines.append(f"| {label} | {value}{tag} | {fig.get('goal') or ''} |")
  return "\n".join(lines)


def render_run(meta: dict) -> str:
  """The header block: when, where, with what, and the load rule."""
  return "\n".join(
    [
      f"Latest run {meta['date']} with `{meta['command']}`: jax {meta['jax']},"
      f" penzai {meta['penzai']}, Python {meta['python']}, {meta['cpus']} CPUs"
      f" ({meta['platform']}).",
      "",
      f"Load rule: {meta['load_rule']}",
    ]
  )


def blocks(results: dict) -> dict[str, str]:
  """Block name → Markdown, the run header first."""
  out = {"run": render_run(results["meta"])}
  for name, bench in results["benchmarks"].items():
    out[name] = render_benchmark(name, bench)
  return out


def update_markdown(text: str, results: dict) -> str:
  """``text`` with every result block replaced (or added under `SECTION`)."""
  rendered = blocks(results)
  present = set()

  def replace(match: re.Match) -> str:
    name = match.group("name")
    if name not in rendered:
      return match.group(0)
    present.add(name)
    return _wrap(name, rendered[name])

  text = _BLOCK.sub(replace, text)
  missing = [name for name in rendered if name not in present]
  if not missing:
    return text
  added = "\n\n".join(_wrap(name, rendered[name]) for name in missing)
  if SECTION in text:
    head, tail = text.split(SECTION, 1)
    return f"{head}{SECTION}\n\n{added}\n{tail}"
  first, _, rest = text.partition("\n## ")
  rest = f"\n## {rest}" if rest else ""
  return f"{first.rstrip()}\n\n{SECTION}\n\n{added}\n{rest}"


def _wrap(name: str, body: str) -> str:
  return f"<!-- bench:begin {name} -->\n{body}\n<!-- bench:end {name} -->"
