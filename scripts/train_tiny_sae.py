"""Train the embedded model's ``resid_post`` SAE, evaluate, write the manifest.

Stage 2 of 2 (after ``train_tiny.py``, which wrote the model, tokenizer,
``heldout.json`` and the model half of ``manifest.json``):

1. Captures ``resid_post`` at layer `LAYER` (the middle of the 4 blocks) with
   `gemma_surgery.capture` on `SAE_ROWS` seeded training rows, dropping the
   BOS position (Gemma Scope SAEs are not trained on BOS either).
2. Trains a `WIDTH`-latent JumpReLU SAE with
   `gemma_surgery.sae.train_jumprelu_sae` and saves it in the Gemma Scope 2
   layout (``sae/resid_post/layer_L_width_W_l0_X/params.safetensors`` +
   ``config.json``), then reloads it with ``load_sae``.
3. Measures the model (held-out loss vs. unigram entropy, induction scores,
   induction-head ablation) and the SAE (L0, explained variance, dead
   latents, CE of the splice vs. zero-ablation) on held-out text.
4. Writes ``manifest.json``: recipe, seeds, hyperparameters, metrics and the
   SHA-256 of every shipped file.

Usage::

  nice python scripts/train_tiny_sae.py [--out gemma_surgery/assets/tiny]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import time

import numpy as np
import tiny_corpus
import tiny_eval

import gemma_surgery as gs
from gemma_surgery import assets

LAYER = 1
WIDTH = 512
SAE_ROWS = 2048
SEED = 0
SAE_HPARAMS = dict(
  steps=3000,
  batch_size=2048,
  sparsity_coefficient=3e-3,
  sparsity_warmup_steps=1000,
  learning_rate=1e-3,
  lr_warmup_steps=100,
  bandwidth=0.01,
  initial_threshold=0.01,
  init_b_dec_to_mean=True,
)
EVAL_ROWS = 64
DEFAULT_OUT = pathlib.Path(__file__).resolve().parents[1] / "gemma_surgery/assets/tiny"


def capture_rows(model, rows: np.ndarray, batch: int = 32) -> np.ndarray:
  """``[rows·seq, d]`` resid_post activations, BOS position dropped."""
  patched, acts = gs.capture(model, "resid_post", LAYER)
  fwd = gs.jit_forward(patched)
  out = []
  for i in range(0, len(rows), batch):
    fwd(tiny_eval.named(rows[i : i + batch, :-1]))
    x = np.asarray(acts["resid_post", LAYER].unwrap("batch", "seq", "embedding"))
    out.append(x[:, 1:].reshape(-1, x.shape[-1]))
  return np.concatenate(out)


def sae_metrics(lm, sae, rows: np.ndarray) -> dict:
  tokens = tiny_eval.named(rows[:, :-1])
  mask = gs.sae.metrics.token_mask(rows[:, :-1])
  patched, acts = gs.capture(lm.model, "resid_post", LAYER)
  clean_logits = gs.jit_forward(patched)(tokens)
  x = acts["resid_post", LAYER]
  feats = sae.encode(x)
  spliced = gs.jit_forward(gs.sae.splice_sae(lm.model, sae))(tokens)
  ablated_model = gs.interventions.ablate(lm.model, "resid_post", LAYER)
  ablated = gs.jit_forward(ablated_model)(tokens)
  m = gs.sae.metrics
  ce = {
    name: m.cross_entropy(logits, rows[:, :-1], mask)
    for name, logits in (
      ("clean", clean_logits),
      ("spliced", spliced),
      ("zero", ablated),
    )
  }
  density = m.feature_density(feats, mask)
  return dict(
    l0=m.l0(feats, mask),
    explained_variance=m.explained_variance(x, sae(x), mask),
    dead_fraction=m.dead_fraction(density),
    ce_clean=ce["clean"],
    ce_spliced=ce["spliced"],
    ce_zero_ablated=ce["zero"],
    splice_ce_increase_over_zero_ablation=(ce["spliced"] - ce["clean"])
    / (ce["zero"] - ce["clean"]),
    eval_rows=int(len(rows)),
  )


def model_metrics(lm, heldout_rows: np.ndarray) -> dict:
  loss = float(tiny_eval.nll(lm.model, heldout_rows).mean())
  unigram = tiny_eval.unigram_entropy(heldout_rows, lm.config.vocab_size)
  tokens = tiny_eval.induction_tokens(lm.config.vocab_size)
  scores = tiny_eval.induction_scores(lm.model, tokens)
  layer, head = np.unravel_index(np.argmax(scores), scores.shape)
  low_layer, low_head = np.unravel_index(np.argmin(scores), scores.shape)
  base = tiny_eval.second_repeat_loss(lm.model, tokens)
  ko = gs.interventions.knock_out_heads
  best = tiny_eval.second_repeat_loss(ko(lm.model, int(layer), [int(head)]), tokens)
  control = tiny_eval.second_repeat_loss(
    ko(lm.model, int(low_layer), [int(low_head)]), tokens
  )
  return dict(
    heldout_loss=loss,
    heldout_unigram_entropy=unigram,
    loss_ratio=loss / unigram,
    heldout_tokens=int(heldout_rows[:, 1:].size),
    induction_scores=np.round(scores, 4).tolist(),
    best_induction_head=[int(layer), int(head)],
    second_repeat_loss=base,
    second_repeat_loss_best_head_knocked_out=best,
    control_head=[int(low_layer), int(low_head)],
    second_repeat_loss_control_head_knocked_out=control,
  )


def l0_label(l0: float) -> str:
  """Gemma Scope 2's L0 bucket nearest to ``l0``."""
  centers = {"small": 15.0, "medium": 45.0, "big": 120.0}
  return min(centers, key=lambda k: abs(np.log(l0 / centers[k])))


def file_hashes(out: pathlib.Path) -> dict[str, dict]:
  files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != assets.MANIFEST)
  return {
    p.relative_to(out).as_posix(): dict(
      sha256=hashlib.sha256(p.read_bytes()).hexdigest(), bytes=p.stat().st_size
    )
    for p in files
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  parser.add_argument("--rows", type=int, default=SAE_ROWS)
  parser.add_argument("--steps", type=int, default=SAE_HPARAMS["steps"])
  args = parser.parse_args()
  out, t0 = args.out, time.time()
  lm = gs.load(out, dtype="float32", progress=False)
  train_docs, _ = tiny_corpus.split(tiny_corpus.documents())
  train_rows = assets.pack_documents(
    lm.tokenizer.encode(train_docs, add_bos=False), 128
  )
  pick = np.random.default_rng(SEED).permutation(len(train_rows))[: args.rows]
  acts = capture_rows(lm.model, train_rows[np.sort(pick)])
  print(f"{acts.shape} activations in {time.time() - t0:.0f}s", flush=True)
  hparams = {**SAE_HPARAMS, "steps": args.steps}
  log: list[dict] = []
  sae = gs.sae.train_jumprelu_sae(
    acts,
    width=WIDTH,
    site="resid_post",
    layer=LAYER,
    source="gemma-surgery-tiny",
    seed=SEED,
    on_log=lambda e: (log.append(e), print(json.dumps(e), flush=True)),
    log_every=250,
    **hparams,
  )
  heldout_docs = json.loads((out / "heldout.json").read_text())["documents"]
  heldout_rows = assets.pack_documents(
    lm.tokenizer.encode(heldout_docs, add_bos=False), 128
  )
  metrics = sae_metrics(lm, sae, heldout_rows[:EVAL_ROWS])
  shutil.rmtree(out / "sae", ignore_errors=True)
  label = l0_label(metrics["l0"])
  folder = out / "sae/resid_post" / f"layer_{LAYER}_width_{WIDTH}_l0_{label}"
  gs.sae.save_gemma_scope_2(sae, folder, l0=label, model_name="gemma-surgery tiny")
  again = sae_metrics(lm, gs.sae.load_sae(folder), heldout_rows[:EVAL_ROWS])
  assert abs(again["l0"] - metrics["l0"]) < 1e-4, (again, metrics)
  manifest = json.loads((out / assets.MANIFEST).read_text())
  manifest["model"]["metrics"] = model_metrics(lm, heldout_rows)
  manifest["sae"] = dict(
    site="resid_post",
    layer=LAYER,
    width=WIDTH,
    folder=folder.relative_to(out).as_posix(),
    activations=dict(
      rows=args.rows, tokens=int(acts.shape[0]), seed=SEED, bos="dropped"
    ),
    hyperparameters=hparams,
    log=log,
    metrics=metrics,
    seconds=round(time.time() - t0, 1),
  )
  manifest["files"] = file_hashes(out)
  (out / assets.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
  print(json.dumps({"model": manifest["model"]["metrics"], "sae": metrics}, indent=1))


if __name__ == "__main__":
  main()
