"""The tour (an app): every analysis of the tutorials on one model, one report.

`run_tour` writes a self-contained ``report.html`` plus PNGs; the
``gemma-surgery tour`` command calls it. `induction_patching_prompts` builds
the clean/corrupted prompt pair its patching section uses.
"""

from gemma_surgery.tour.run import (
  DEFAULT_PROMPT,
  TourContext,
  check_out,
  induction_patching_prompts,
  run_tour,
)

__all__ = [
  "DEFAULT_PROMPT",
  "TourContext",
  "check_out",
  "induction_patching_prompts",
  "run_tour",
]
