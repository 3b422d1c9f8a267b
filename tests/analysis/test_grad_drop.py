"""AtP*'s GradDrop vs the exact patching sweep (by magnitude) and its own
algebra: the node's own layer contributes its whole AtP, layers below it none."""

from __future__ import annotations

import functools

import numpy as np
from test_attribution import _tiny

from gemma_surgery.analysis import attribution, patching


@functools.cache
def _runs(site: str, by: str):
  model, clean, bad, metric = _tiny()
  exact = patching.patching_sweep(
    model, clean, bad, metric, site=site, by=by, progress=False
  )
  atp = attribution.attribution_patching(model, clean, bad, metric, site=site, by=by)
  gd = attribution.attribution_patching(
    model, clean, bad, metric, site=site, by=by, method="graddrop"
  )
  return exact, atp, gd


def test_graddrop_ranks_magnitudes_no_worse_than_atp():
  """On tiny induction mlp.out by position: GradDrop ranks |exact| about as
  well as |AtP| (no cancellation to repair here: not worse by > 0.05), and
  finds the exact top 5. Control: shuffled estimates rank badly."""
  exact, atp, gd = _runs("mlp.out", "position")
  assert np.all(gd.effects >= 0)
  true = np.abs(exact.scores - exact.corrupted).reshape(-1)
  rho_gd = gd.agreement(exact)["spearman"]  # compares with |exact|
  rho_atp = attribution.spearman(true, np.abs(atp.effects).reshape(-1))
  print("graddrop", gd.agreement(exact), "atp |.|", rho_atp)
  assert rho_gd >= rho_atp - 0.05
  assert gd.agreement(exact)["top_k_recall"] >= 0.8
  shuffled = np.random.default_rng(0).permutation(gd.effects.reshape(-1))
  assert attribution.spearman(true, shuffled) < 0.5


def test_graddrop_own_layer_term():
  """At a sublayer output, dropping its own layer removes its whole AtP, so
  (L − 1) · GD >= |AtP|, with equality at the last layer (no later paths)."""
  _, atp, gd = _runs("mlp.out", "position")
  scaled = gd.effects * (len(gd.layers) - 1)
  assert np.all(scaled >= np.abs(atp.effects) - 1e-4)
  np.testing.assert_allclose(scaled[-1], np.abs(atp.effects[-1]), rtol=1e-4, atol=1e-5)
  assert np.any(scaled[:-1] > np.abs(atp.effects[:-1]) + 1e-3)  # later paths count
