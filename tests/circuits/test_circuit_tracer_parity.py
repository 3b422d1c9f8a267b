"""Our attribution graph vs circuit-tracer 0.5's on the embedded model.

Runs only where ``CIRCUIT_TRACER_PYTHON`` names the Python of a virtual
environment with circuit-tracer 0.5 and ``nnsight<0.8`` (see
`bench/circuit_tracer_parity.py`); circuit-tracer needs torch, which ours does
not, so it runs in a subprocess (`bench/circuit_tracer_worker.py`) on the
embedded model's Hugging Face files and shipped Gemma Scope 2 transcoders.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers.paths import ROOT

import gemma_surgery as gs
from gemma_surgery import assets
from gemma_surgery.host import to_numpy

CT_PYTHON = os.environ.get("CIRCUIT_TRACER_PYTHON")
pytestmark = pytest.mark.skipif(
  not CT_PYTHON, reason="CIRCUIT_TRACER_PYTHON (a circuit-tracer venv) is not set"
)
sys.path.insert(0, str(ROOT / "bench"))
from circuit_tracer_parity import compare  # noqa: E402  (bench/ is not a package)


@pytest.mark.parametrize("kind", ["transcoders", "clt"])
def test_graphs_agree_with_circuit_tracer(tmp_path, kind):
  lm = gs.load("tiny")
  ids = [2, *lm.tokenizer.encode("x = value; y = x; x = value; y =")]
  tokens = gs.named_tokens([ids])
  if kind == "clt":
    dictionary, folder, flag = gs.sae.load_clt("tiny"), assets.tiny_clt_dir(), ["--clt"]
  else:
    dictionary, folder, flag = (
      gs.sae.load_transcoders("tiny"),
      assets.tiny_transcoders_dir(),
      [],
    )
  out = tmp_path / "graph.npz"
  worker = ROOT / "bench" / "circuit_tracer_worker.py"
  command = [CT_PYTHON, str(worker), "--model", str(assets.tiny_dir())]
  command += ["--transcoders", str(folder), *flag, "--tokens", json.dumps(ids)]
  subprocess.run([*command, "--out", str(out)], check=True, capture_output=True)
  theirs = dict(np.load(out))
  ours = gs.circuits.attribute(lm.model, dictionary, tokens, progress=False)
  logits = to_numpy(lm.model(tokens).unwrap("batch", "seq", "vocabulary"))[0]
  np.testing.assert_allclose(theirs["hf_logits"], logits, atol=1e-3)
  got = compare(ours, theirs, dictionary.num_layers)
  assert got["jaccard"] == 1.0 and got["logits_agree"]
  assert got["activation_diff"] < 1e-4
  assert got["corr_matched"] > 0.9999 and got["rel_matched"] < 1e-3
  # The two documented convention differences, measured rather than assumed:
  d = lm.model.metadata.embedding_dim
  assert got["token_ratio"] == pytest.approx(d**-0.5, rel=1e-3)
  assert got["max_theirs_bos_error"] == 0.0 < got["max_ours_bos_error"]
  # Negative control: all edges together do not agree.
  assert got["corr_all"] < 0.99
