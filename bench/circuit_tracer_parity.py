"""Our attribution graphs vs circuit-tracer's, on the embedded model.

The embedded model's files (`gemma_surgery/assets/tiny`: the Hugging Face
export, ``Gemma3ForCausalLM``) and its shipped Gemma Scope 2 transcoders /
CLT are read by both. circuit-tracer runs in its own virtual environment
(torch; it cannot share ours), through `circuit_tracer_worker.py`; point
``--ct-python`` (or ``CIRCUIT_TRACER_PYTHON``) at that environment's Python::

  python -m venv /tmp/ct && /tmp/ct/bin/pip install torch circuit-tracer==0.5.0 \
      'nnsight<0.8'
  python bench/circuit_tracer_parity.py --ct-python /tmp/ct/bin/python

A third case, ``mid`` (skip it with ``--no-mid``), is the mid-size Gemma 3
(`configs.MID3`: 8 layers, d_model 512, vocabulary 32 000; random weights)
with a random transcoder of width 2048 per layer (threshold 2.8: a few
features per token and layer), both written to a temporary folder in the
Hugging Face and Gemma Scope 2 layouts and read back by both libraries.

Prompt: BOS + 32 random ordinary tokens + the first 31 again (64 tokens, as
`circuits.py`). Both graphs use every active feature and the top logits
(p ≥ 0.95, at most 10). Reported, per dictionary: the transformers logits
vs ours; feature-node overlap (Jaccard of (layer, pos, latent) sets) and
the largest activation difference on shared nodes; whether the logit nodes
agree; on the edges between shared nodes, the Pearson correlation and the
largest difference relative to the largest |edge|; and each library's graph
time (first call / second call, same prompt, same process).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import record
from circuits import random_transcoders
from configs import MID3

import gemma_surgery as gs
from gemma_surgery import assets
from gemma_surgery.host import to_numpy
from gemma_surgery.loading import save_hf

HERE = pathlib.Path(__file__).resolve().parent


def prompt(seed: int, vocab: int, first: int = 262):
  """BOS + 32 random ordinary tokens + their first 31 (as `circuits.py`)."""
  span = np.random.default_rng(seed).integers(first, vocab, 32).tolist()
  return gs.named_tokens([[2, *span, *span[:31]]])


def _node_keys(features, layers, n_pos, logit_ids) -> list[tuple]:
  """Node identities in graph order: features, errors, tokens, logits."""
  keys = [("f", int(a), int(b), int(c)) for a, b, c in features]
  keys += [("e", layer, pos) for layer in range(layers) for pos in range(n_pos)]
  keys += [("t", pos) for pos in range(n_pos)]
  keys += [("l", int(i)) for i in logit_ids]
  return keys


def _agreement(a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
  """Pearson r over edges nonzero in either, max |a − b| / max |a|, count."""
  nonzero = (np.abs(a) > 1e-7) | (np.abs(b) > 1e-7)
  if nonzero.sum() < 3 or min(a[nonzero].std(), b[nonzero].std()) == 0:
    rel = float(np.abs(a - b).max(initial=0.0) / max(np.abs(a).max(initial=0), 1e-12))
    return float("nan"), rel, int(nonzero.sum())
  corr = float(np.corrcoef(a[nonzero], b[nonzero])[0, 1])
  return (
    corr,
    float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)),
    int(nonzero.sum()),
  )


def compare(ours, theirs: dict, layers: int) -> dict:
  """Overlap and edge agreement of two graphs (see the module doc).

  Edges are compared on the nodes both graphs hold, all together and split
  by source: "matched" sources (features, and error nodes after BOS) follow
  the same definition in both; circuit-tracer zeroes the BOS error vectors
  and writes token nodes with the unscaled embedding rows (Gemma multiplies
  them by sqrt(d_model)), so those are reported apart.
  """
  n_pos = ours.n_pos
  their_feats = theirs["active_features"][theirs["selected_features"]]
  a_keys = _node_keys(ours.features, layers, n_pos, ours.logit_ids)
  b_keys = _node_keys(their_feats, layers, n_pos, theirs["logit_ids"])
  a_feat = {k for k in a_keys if k[0] == "f"}
  b_feat = {k for k in b_keys if k[0] == "f"}
  b_index = {k: i for i, k in enumerate(b_keys)}
  shared = [(i, b_index[k], k) for i, k in enumerate(a_keys) if k in b_index]
  ia = np.array([i for i, _, _ in shared])
  ib = np.array([j for _, j, _ in shared])
  is_feat = np.array([k[0] == "f" for _, _, k in shared])
  act_diff = np.abs(
    ours.activations[ia[is_feat]] - theirs["activation_values"][ib[is_feat]]
  )
  a_adj = np.asarray(ours.adjacency, np.float64)[np.ix_(ia, ia)]
  b_adj = np.asarray(theirs["adjacency"], np.float64)[np.ix_(ib, ib)]
  kinds = {
    "matched": [k[0] == "f" or (k[0] == "e" and k[2] > 0) for _, _, k in shared],
    "bos_error": [k[0] == "e" and k[2] == 0 for _, _, k in shared],
    "token": [k[0] == "t" for _, _, k in shared],
  }
  out = {
    "jaccard": len(a_feat & b_feat) / max(1, len(a_feat | b_feat)),
    "ours_features": len(a_feat),
    "their_features": len(b_feat),
    "activation_diff": float(act_diff.max(initial=0.0)),
    "logits_agree": list(ours.logit_ids) == list(theirs["logit_ids"]),
  }
  out["corr_all"], out["rel_all"], out["edges_all"] = _agreement(
    a_adj.ravel(), b_adj.ravel()
  )
  for kind, cols in kinds.items():
    cols = np.array(cols)
    a, b = a_adj[:, cols].ravel(), b_adj[:, cols].ravel()
    out[f"corr_{kind}"], out[f"rel_{kind}"], out[f"edges_{kind}"] = _agreement(a, b)
    out[f"max_ours_{kind}"] = float(np.abs(a).max(initial=0.0))
    out[f"max_theirs_{kind}"] = float(np.abs(b).max(initial=0.0))
  a, b = a_adj[:, np.array(kinds["token"])].ravel(), b_adj[:, np.array(kinds["token"])]
  b = b.ravel()
  big = np.abs(a) > 1e-4
  out["token_ratio"] = float(np.median(b[big] / a[big])) if big.any() else float("nan")
  return out


def mid_case(tmp: pathlib.Path) -> tuple:
  """``(name, model, dictionary, model dir, transcoder dir, flags, vocab)`` of
  the mid-size Gemma 3 + random transcoders, written to ``tmp``."""
  model = gs.build_model(MID3, init_base_rng=jax.random.key(0))
  model_dir = save_hf(
    model, tmp / "model", tokenizer_model=assets.tiny_dir() / "tokenizer.model"
  )
  d, n = MID3.embedding_dim, MID3.num_layers
  folder = tmp / "transcoder_all"
  for tc in random_transcoders(d, n, 2048, threshold=2.8).transcoders:
    layer = tc.info.layer
    gs.sae.save_gemma_scope_2(
      tc, folder / f"layer_{layer}_width_2048_l0_small", l0="small", model_name="mid3"
    )
  loaded = gs.load(str(model_dir), dtype="float32").model
  return ("mid", loaded, gs.sae.load_transcoders(folder), model_dir, folder, [], 32_000)


def ours_graph(model, dictionary, tokens):
  times = []
  for _ in range(2):
    start = time.perf_counter()
    graph = gs.circuits.attribute(model, dictionary, tokens, progress=False)
    times.append(time.perf_counter() - start)
  return graph, times


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "--ct-python", default=os.environ.get("CIRCUIT_TRACER_PYTHON"), help="its venv"
  )
  parser.add_argument(
    "--no-mid", action="store_true", help="skip the mid-size Gemma 3 case"
  )
  record.add_arguments(parser)
  args = parser.parse_args()
  rec = record.Recorder.from_args("circuit_tracer", args)
  if not args.ct_python:
    print("circuit-tracer not run: pass --ct-python (see the module doc).")
    rec.figure("ran", "circuit-tracer available (--ct-python)", False)
    rec.save()
    return
  lm = gs.load("tiny")
  tiny = assets.tiny_dir()
  cases = [
    (
      "transcoders",
      lm.model,
      gs.sae.load_transcoders("tiny"),
      tiny,
      assets.tiny_transcoders_dir(),
      [],
      4096,
    ),
    (
      "clt",
      lm.model,
      gs.sae.load_clt("tiny"),
      tiny,
      assets.tiny_clt_dir(),
      ["--clt"],
      4096,
    ),
  ]
  scratch = tempfile.TemporaryDirectory()
  if not args.no_mid:
    cases.append(mid_case(pathlib.Path(scratch.name)))
  for name, model, dictionary, model_dir, folder, flag, vocab in cases:
    tokens = prompt(0, vocab)
    ids = [int(i) for i in to_numpy(tokens.unwrap("batch", "seq"))[0]]
    logits = to_numpy(model(tokens).unwrap("batch", "seq", "vocabulary"), np.float64)
    with tempfile.TemporaryDirectory() as tmp:
      out = pathlib.Path(tmp) / "graph.npz"
      command = [args.ct_python, str(HERE / "circuit_tracer_worker.py")]
      command += ["--model", str(model_dir), "--transcoders", str(folder), *flag]
      command += ["--tokens", json.dumps(ids), "--out", str(out)]
      subprocess.run(command, check=True)
      theirs = dict(np.load(out))
    graph, ours_t = ours_graph(model, dictionary, tokens)
    result = compare(graph, theirs, dictionary.num_layers)
    hf_diff = float(np.abs(theirs["hf_logits"] - logits[0]).max())
    print(f"{name}: {result}; transformers vs ours logits max |diff| {hf_diff:.2e}")
    print(
      f"  graph time ours {ours_t[0]:.2f}s / {ours_t[1]:.2f}s,"
      f" circuit-tracer {theirs['seconds'][0]:.2f}s / {theirs['seconds'][1]:.2f}s"
    )
    rec.figure(f"{name}_hf_logits", f"{name}: transformers vs our logits", hf_diff)
    rec.figure(
      f"{name}_jaccard", f"{name}: feature-node overlap (Jaccard)", result["jaccard"]
    )
    rec.figure(
      f"{name}_act", f"{name}: max activation diff (shared)", result["activation_diff"]
    )
    rec.figure(f"{name}_logits", f"{name}: same logit nodes", result["logits_agree"])
    rec.figure(
      f"{name}_corr",
      f"{name}: edge correlation, feature and non-BOS error sources",
      result["corr_matched"],
    )
    rec.figure(
      f"{name}_rel",
      f"{name}: max edge diff / max edge, those sources",
      result["rel_matched"],
    )
    rec.figure(f"{name}_corr_all", f"{name}: edge correlation, all", result["corr_all"])
    rec.figure(
      f"{name}_token_ratio",
      f"{name}: token edges, circuit-tracer / ours (median)",
      result["token_ratio"],
      note="Gemma scales embeddings by sqrt(d_model); circuit-tracer's token"
      " nodes use the unscaled rows",
    )
    rec.figure(
      f"{name}_bos_err",
      f"{name}: largest circuit-tracer edge from a BOS error node",
      result["max_theirs_bos_error"],
      note="circuit-tracer zeroes the BOS error vectors; ours keep them",
    )
    for who, seconds in (("ours", ours_t), ("ct", list(theirs["seconds"]))):
      rec.figure(f"{name}_{who}_first", f"{name}: {who} graph, first", seconds[0], "s")
      rec.figure(f"{name}_{who}_again", f"{name}: {who} graph, again", seconds[1], "s")
  scratch.cleanup()
  rec.save()
  sys.stdout.flush()


if __name__ == "__main__":
  main()
