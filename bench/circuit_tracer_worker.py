"""circuit-tracer's attribution graph on a local model folder (runs in *its* venv).

Not part of gemma_surgery (imports torch and circuit_tracer only); started by
`bench/circuit_tracer_parity.py` with the Python of a virtual environment
holding ``circuit-tracer`` 0.5 (and ``nnsight<0.8``: 0.8 removed the
``nnsight.intervention.tracing`` module circuit-tracer 0.5 imports)::

  python bench/circuit_tracer_worker.py --model DIR --transcoders DIR \
      --tokens '[2, 17, ...]' --out graph.npz

``--transcoders`` is a Gemma Scope 2 ``transcoder_all`` folder (one
``layer_L_*`` subfolder per layer) or, with ``--clt``, a CLT folder
(``params_layer_L.safetensors``). Uses the nnsight backend (the only one
circuit-tracer 0.5 offers for Gemma 3), float32, on the CPU.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import time

import numpy as np
import torch
from circuit_tracer.attribution.attribute import attribute
from circuit_tracer.replacement_model.replacement_model_nnsight import (
  NNSightReplacementModel,
)
from circuit_tracer.transcoder.cross_layer_transcoder import load_gemma_scope_2_clt
from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
from transformers import AutoModelForCausalLM

IN_HOOK, OUT_HOOK = "mlp.hook_in", "hook_mlp_out"


def load_dictionary(folder: pathlib.Path, clt: bool):
  cpu = torch.device("cpu")
  if clt:
    paths = {}
    for path in folder.iterdir():
      match = re.match(r"params_layer_(\d+)\.safetensors$", path.name)
      if match:
        paths[int(match.group(1))] = str(path)
    # circuit-tracer 0.5 reads layers range(max(paths)): one key past the
    # last layer makes it read them all.
    paths[len(paths)] = ""
    return load_gemma_scope_2_clt(
      paths, IN_HOOK, OUT_HOOK, scan="clt", device=cpu, dtype=torch.float32
    )
  layers = {}
  for path in folder.iterdir():
    match = re.match(r"layer_(\d+)_", path.name)
    if match:
      layers[int(match.group(1))] = str(path / "params.safetensors")
  return load_transcoder_set(
    layers,
    scan="transcoders",
    feature_input_hook=IN_HOOK,
    feature_output_hook=OUT_HOOK,
    device=cpu,
    special_load_fn="gemma-scope-2",
  )


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--model", required=True)
  parser.add_argument("--transcoders", required=True)
  parser.add_argument("--clt", action="store_true")
  parser.add_argument("--tokens", required=True, help="JSON list of ids (BOS first)")
  parser.add_argument("--max-n-logits", type=int, default=10)
  parser.add_argument("--desired-logit-prob", type=float, default=0.95)
  parser.add_argument("--out", required=True)
  args = parser.parse_args()
  torch.set_grad_enabled(True)
  dictionary = load_dictionary(pathlib.Path(args.transcoders), args.clt)
  model = NNSightReplacementModel.from_pretrained_and_transcoders(
    args.model, dictionary, device="cpu", dtype=torch.float32
  )
  tokens = torch.tensor(json.loads(args.tokens), dtype=torch.long)
  times = []
  for _ in range(2):  # The second call is the steady-state time.
    start = time.perf_counter()
    graph = attribute(
      tokens,
      model,
      max_n_logits=args.max_n_logits,
      desired_logit_prob=args.desired_logit_prob,
      batch_size=256,
    )
    times.append(time.perf_counter() - start)
  hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
  with torch.no_grad():
    logits = hf(tokens[None]).logits[0].float().numpy()
  np.savez(
    args.out,
    tokens=graph.input_tokens.cpu().numpy(),
    active_features=graph.active_features.cpu().numpy(),
    selected_features=graph.selected_features.cpu().numpy(),
    activation_values=graph.activation_values.float().cpu().numpy(),
    adjacency=graph.adjacency_matrix.float().cpu().numpy(),
    logit_ids=np.array([t.vocab_idx for t in graph.logit_targets]),
    logit_probs=graph.logit_probabilities.float().cpu().numpy(),
    seconds=np.array(times),
    hf_logits=logits,
  )


if __name__ == "__main__":
  main()
