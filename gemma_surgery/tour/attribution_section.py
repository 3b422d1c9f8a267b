"""The attribution section of the tour: attribution patching beside the exact
activation-patching sweeps of the section before it, and how well they agree."""

from __future__ import annotations

from typing import Any

import numpy as np

from gemma_surgery import analysis


def _normalized(effects: np.ndarray, clean: float, corrupted: float) -> np.ndarray:
  span = clean - corrupted
  return effects / span if span else effects


def attribution_section(ctx: Any) -> None:
  """Adds AtP estimates of every sweep in ``ctx.sweeps`` and their agreement."""
  ctx.report.heading("Attribution patching")
  if not ctx.sweeps or ctx.patching_pair is None:
    ctx.report.text("(No activation-patching sweeps to compare with.)")
    return
  clean, corrupted, metric = ctx.patching_pair
  ctx.report.text(
    "The same sweeps estimated from one clean forward and one corrupted"
    " forward and backward pass (AtP:"
    " (clean − corrupted activation) · gradient of the metric on the corrupted"
    " run), beside the exact sweeps above. Agreement: Spearman rank"
    " correlation, and how many of the exact top 5 are in AtP's top 10."
  )
  rows = []
  for (site, by), exact in ctx.sweeps.items():
    est = analysis.attribution_patching(
      ctx.model, clean, corrupted, metric, site=site, by=by, layers=exact.layers
    )
    agree = est.agreement(exact)
    cols = (
      ctx.piece_list(clean) if by == "position" else list(range(exact.scores.shape[1]))
    )
    ctx.heatmap(
      f"attribution_{site.replace('.', '_')}",
      _normalized(est.effects, exact.clean, exact.corrupted),
      f"AtP: {site} by {by} (Spearman {agree['spearman']:.2f} vs exact,"
      f" top-5 recall {agree['top_k_recall']:.0%})",
      row_labels=est.layers,
      col_labels=cols,
      col_title=by,
      value_label="estimated restored (normalised)",
    )
    rows.append(
      f"{site:<12} by {by:<9} Spearman {agree['spearman']:.3f}  top-5 in top-10"
      f" {agree['top_k_recall']:.0%}  mean |error| {agree['mean_abs_error']:.3f}"
    )
  ctx.report.heading("Agreement with the exact sweeps", 3)
  ctx.report.code("\n".join(rows))
