"""Train the embedded default model: tokenizer + small Gemma 3 architecture LM.

Run: ``python scripts/tiny/train_model.py OUT_DIR`` (then
``scripts/tiny/train_sae.py`` and ``scripts/tiny/manifest.py``; see
``scripts/tiny/README.md``). Writes ``OUT_DIR/model`` (HF format:
config.json, model.safetensors, tokenizer.model) and ``OUT_DIR/train_log.json``.

Recipe:
* corpus: `corpus.documents()` (CPython docstrings); held-out split kept apart;
* tokenizer: SentencePiece unigram, vocab `VOCAB`, byte fallback, Gemma ids
  pad=0 eos=1 bos=2 unk=3, one thread (deterministic);
* data: documents tokenized with BOS + text + EOS, concatenated and cut into
  `SEQ`-token rows; a share `INDUCTION_SHARE` of each batch is synthetic
  ``[BOS, r, r]`` rows of random tokens repeated, so induction heads form;
* model: `CONFIG` (Gemma 3: QK-norm, local + global layers, GQA, tied
  embeddings) from `gemma_surgery.build_model`, AdamW with warmup + cosine
  decay, `STEPS` steps of `BATCH` rows, seed `SEED`, float32.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import sentencepiece as spm
from penzai import pz

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import corpus  # noqa: E402

import gemma_surgery as gs  # noqa: E402
from gemma_surgery.loading.hf_export import save_hf  # noqa: E402

SEED = 0
VOCAB = 2048
SEQ = 128
BATCH = 32
STEPS = int(__import__("os").environ.get("TINY_STEPS", 1600))
LR = 3e-3
WARMUP = min(100, STEPS // 4)
INDUCTION_SHARE = 0.25
CONFIG = dataclasses.replace(
  gs.preset("gemma3_1b"),
  num_layers=4,
  embedding_dim=128,
  num_heads=4,
  num_kv_heads=2,
  head_dim=32,
  mlp_hidden_dim=512,
  vocab_size=VOCAB,
  attention_types=("local", "global", "local", "global"),
  sliding_window=64,
  query_pre_attn_scalar=32,
)


def train_tokenizer(docs: list[str], path: pathlib.Path) -> spm.SentencePieceProcessor:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(docs),
    model_writer=model,
    vocab_size=VOCAB,
    model_type="unigram",
    byte_fallback=True,
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    num_threads=1,
    seed_sentencepiece_size=200_000,
    max_sentence_length=20_000,
    split_digits=True,
    remove_extra_whitespaces=False,
    normalization_rule_name="identity",
    minloglevel=2,
  )
  path.write_bytes(model.getvalue())
  return spm.SentencePieceProcessor(model_proto=model.getvalue())


def token_rows(sp: spm.SentencePieceProcessor, docs: list[str]) -> np.ndarray:
  stream = []
  for ids in sp.encode(docs):
    stream += [2, *ids, 1]
  n = len(stream) // SEQ
  return np.asarray(stream[: n * SEQ], np.int32).reshape(n, SEQ)


def induction_rows(rng: np.random.Generator, n: int) -> np.ndarray:
  half = (SEQ - 1) // 2
  rows = np.zeros((n, SEQ), np.int32)
  for i in range(n):
    length = int(rng.integers(8, half + 1))
    r = rng.integers(4, VOCAB, length)
    seq = np.concatenate([[2], r, r])
    filler = rng.integers(4, VOCAB, SEQ - len(seq))
    rows[i] = np.concatenate([seq, filler])[:SEQ]
  return rows


def _loss(params, unbound, tokens):
  model = pz.bind_variables(unbound, params)
  logits = model(pz.nx.wrap(tokens).tag("batch", "seq"))
  logits = logits.unwrap("batch", "seq", "vocabulary")[:, :-1]
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
  return nll.mean()


def main(out: pathlib.Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  start = time.time()
  train_docs, heldout_docs = corpus.documents()
  sp = train_tokenizer(train_docs, out / "tokenizer.model")
  rows = token_rows(sp, train_docs)
  print(f"corpus: {len(train_docs)} docs, {rows.size} tokens in {len(rows)} rows")
  model = gs.build_model(CONFIG, jax.random.key(SEED))
  unbound, params = pz.unbind_params(model, freeze=True)
  schedule = optax.warmup_cosine_decay_schedule(0.0, LR, WARMUP, STEPS, LR / 10)
  optimizer = optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.01)
  )
  state = optimizer.init(params)

  @jax.jit
  def step(params, state, tokens):
    loss, grads = jax.value_and_grad(_loss)(params, unbound, tokens)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(SEED)
  n_induction = int(BATCH * INDUCTION_SHARE)
  log = []
  for i in range(STEPS):
    batch = rows[rng.integers(0, len(rows), BATCH - n_induction)]
    batch = np.concatenate([batch, induction_rows(rng, n_induction)])
    params, state, loss = step(params, state, jnp.asarray(batch))
    if i % 50 == 0 or i == STEPS - 1:
      log.append({"step": i, "loss": float(loss), "seconds": time.time() - start})
      print(log[-1], flush=True)
  trained = pz.bind_variables(unbound, [p.unfreeze_as_copy() for p in params])
  save_hf(trained, out / "model", tokenizer_model=out / "tokenizer.model")
  (out / "tokenizer.model").unlink()
  (out / "train_log.json").write_text(
    json.dumps(
      {
        "config": CONFIG.to_dict(),
        "seed": SEED,
        "steps": STEPS,
        "batch": BATCH,
        "seq": SEQ,
        "lr": LR,
        "warmup": WARMUP,
        "induction_share": INDUCTION_SHARE,
        "train_tokens": int(rows.size),
        "log": log,
        "python": sys.version.split()[0],
      },
      indent=1,
    )
  )


if __name__ == "__main__":
  main(pathlib.Path(sys.argv[1]))
