"""Train the embedded "gemma-surgery tiny" model: tokenizer + Gemma 3 LM.

Stage 1 of 2 (stage 2, the SAE and the manifest: ``train_tiny_sae.py``).
Fully seeded and offline; the corpus recipe is in ``tiny_corpus.py``.

1. A SentencePiece BPE tokenizer (`VOCAB` pieces, byte fallback, Gemma
   special ids pad=0 eos=1 bos=2 unk=3, ``<start_of_turn>``=4,
   ``<end_of_turn>``=5, bytes at 6..261) trained on the training documents.
2. A 4-layer Gemma 3 architecture model (QK-norm, local/global layers with a
   sliding window, GQA, tied embeddings, pre/post norms) built with
   `gemma_surgery.build_model` and trained with AdamW on its Penzai forward
   pass (parameters unbound with ``pz.unbind_params`` and trained as a
   pytree). Each batch has `TEXT_ROWS` packed text rows and `SYNTH_ROWS`
   synthetic repeated-span rows.
3. Saved in the Hugging Face layout (``config.json`` + ``model.safetensors``
   + ``tokenizer.model``) and reloaded through `gemma_surgery.load` to check
   the round trip.

Usage (about 20 minutes on 2 CPU cores)::

  nice python scripts/train_tiny.py [--out gemma_surgery/assets/tiny]
"""

from __future__ import annotations

import argparse
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
import tiny_corpus
import tiny_eval
from penzai import pz
from safetensors.numpy import save_file

from gemma_surgery import assets
from gemma_surgery.config import GemmaConfig
from gemma_surgery.loading import api
from gemma_surgery.model import build
from gemma_surgery.tokenizer import GemmaTokenizer

VOCAB = 2048
SEQ = 128
TEXT_ROWS, SYNTH_ROWS = 12, 8
STEPS = 2400
LR, WARMUP, WEIGHT_DECAY = 3e-3, 100, 0.01
SEED = 0
HELDOUT_CHARS = 150_000
FIRST_ORDINARY_ID = 262  # After 6 special pieces and 256 byte pieces.

CONFIG = GemmaConfig(
  family="gemma3",
  num_layers=4,
  embedding_dim=128,
  num_heads=4,
  num_kv_heads=2,
  head_dim=32,
  mlp_hidden_dim=512,
  vocab_size=VOCAB,
  attention_types=("local", "global", "local", "global"),
  sliding_window=32,
  # With QK-norm the largest attention logit is head_dim / sqrt(scalar):
  # 4 gives 16, as Gemma 3 1B's (256 / sqrt(256)); head_dim (32) would cap
  # it at 5.7, and induction heads did not form in that model.
  query_pre_attn_scalar=4,
  rope_global_base=1_000_000.0,
  rope_local_base=10_000.0,
  use_qk_norm=True,
  use_post_attn_norm=True,
  use_post_ffw_norm=True,
  parameter_dtype="float32",
)
DEFAULT_OUT = (
  pathlib.Path(__file__).resolve().parent.parent / "gemma_surgery/assets/tiny"
)


def train_tokenizer(docs: list[str]) -> bytes:
  """SentencePiece BPE on the training documents' non-blank lines."""
  lines = (line for doc in docs for line in doc.splitlines() if line.strip())
  writer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=lines,
    model_writer=writer,
    model_type="bpe",
    vocab_size=VOCAB,
    character_coverage=1.0,
    byte_fallback=True,
    pad_id=0,
    eos_id=1,
    bos_id=2,
    unk_id=3,
    pad_piece="<pad>",
    eos_piece="<eos>",
    bos_piece="<bos>",
    unk_piece="<unk>",
    user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    normalization_rule_name="identity",
    add_dummy_prefix=False,
    remove_extra_whitespaces=False,
    split_digits=True,
    allow_whitespace_only_pieces=True,
    max_sentence_length=16384,
    num_threads=1,
    input_sentence_size=0,
    shuffle_input_sentence=False,
    minloglevel=2,
  )
  return writer.getvalue()


def hf_config_json(config: GemmaConfig) -> dict:
  """The Hugging Face ``config.json`` (transformers-5 schema)."""
  kinds = {"local": "sliding_attention", "global": "full_attention"}
  return {
    "architectures": ["Gemma3ForCausalLM"],
    "model_type": "gemma3_text",
    "_comment": (
      "gemma-surgery tiny: trained by the gemma_surgery project; not a Google model"
    ),
    "hidden_size": config.embedding_dim,
    "intermediate_size": config.mlp_hidden_dim,
    "num_hidden_layers": config.num_layers,
    "num_attention_heads": config.num_heads,
    "num_key_value_heads": config.num_kv_heads,
    "head_dim": config.head_dim,
    "vocab_size": config.vocab_size,
    "layer_types": [kinds[k] for k in config.attention_types],
    "sliding_window": config.sliding_window,
    "query_pre_attn_scalar": config.query_pre_attn_scalar,
    "rope_parameters": {
      "full_attention": {"rope_type": "default", "rope_theta": config.rope_global_base},
      "sliding_attention": {
        "rope_type": "default",
        "rope_theta": config.rope_local_base,
      },
    },
    "rms_norm_eps": config.rms_norm_eps,
    "hidden_activation": "gelu_pytorch_tanh",
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "tie_word_embeddings": True,
    "max_position_embeddings": 4 * SEQ,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "dtype": "float32",
  }


def hf_tensors(values: dict, axes: dict, config: GemmaConfig) -> dict[str, np.ndarray]:
  """Trained Penzai parameters -> Hugging Face tensors (``1 + w`` undone)."""
  n, k = config.num_heads, config.num_kv_heads
  d, h = config.embedding_dim, config.head_dim

  heads = (*build.head_axes(config)[0], *build.head_axes(config)[1])
  kv_heads = tuple(build.head_axes(config)[0])
  orders = {
    "query": (*heads, "embedding", "projection"),
    "key": (*kv_heads, "embedding", "projection"),
    "value": (*kv_heads, "embedding", "projection"),
    "output": (*heads, "projection", "embedding"),
    "gating_linear": ("embedding", "neurons"),
    "value_linear": ("embedding", "neurons"),
    "out_linear": ("neurons", "embedding"),
    "embedder": ("vocabulary", "embedding"),
  }

  def get(label: str) -> np.ndarray:
    full = f"transformer/{label}"
    key = label.split("/")[-1].split(".")[0]
    order = orders.get(key, axes[full])
    named = pz.nx.wrap(jnp.asarray(values[full])).tag(*axes[full])
    return np.asarray(named.unwrap(*order), np.float32)

  out = {
    "model.embed_tokens.weight": get("embedder.embeddings"),
    "model.norm.weight": get("final_norm/scale.weights") - 1.0,
  }
  norms = {
    "pre_attention_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm",
    "pre_ffw_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
  }
  for i in range(config.num_layers):
    b, p = f"block_{i}", f"model.layers.{i}"
    for ours, theirs in norms.items():
      out[f"{p}.{theirs}.weight"] = get(f"{b}/{ours}/scale.weights") - 1.0
    q = get(f"{b}/attention/query.weights").reshape(n, d, h)
    out[f"{p}.self_attn.q_proj.weight"] = q.transpose(0, 2, 1).reshape(n * h, d)
    for name, proj in (("key", "k_proj"), ("value", "v_proj")):
      kv = get(f"{b}/attention/{name}.weights").reshape(k, d, h)
      out[f"{p}.self_attn.{proj}.weight"] = kv.transpose(0, 2, 1).reshape(k * h, d)
    o = get(f"{b}/attention/output.weights").reshape(n, h, d)
    out[f"{p}.self_attn.o_proj.weight"] = o.transpose(2, 0, 1).reshape(d, n * h)
    out[f"{p}.self_attn.q_norm.weight"] = (
      get(f"{b}/attention/query_norm/scale.weights") - 1.0
    )
    out[f"{p}.self_attn.k_norm.weight"] = (
      get(f"{b}/attention/key_norm/scale.weights") - 1.0
    )
    out[f"{p}.mlp.gate_proj.weight"] = get(f"{b}/mlp/gating_linear.weights").T
    out[f"{p}.mlp.up_proj.weight"] = get(f"{b}/mlp/value_linear.weights").T
    out[f"{p}.mlp.down_proj.weight"] = get(f"{b}/mlp/out_linear.weights").T
  return {name: np.ascontiguousarray(arr) for name, arr in sorted(out.items())}


def bind(unbound, axes: dict, values: dict):
  """The Penzai model with ``values`` (label → array) bound to its slots."""
  return pz.bind_variables(
    unbound,
    [
      pz.ParameterValue(value=pz.nx.wrap(v).tag(*axes[label]), label=label)
      for label, v in values.items()
    ],
  )


def make_loss(unbound, axes: dict):
  """Mean next-token NLL ``[batch, seq + 1]`` ids -> scalar, Penzai forward."""

  def loss_fn(values: dict, tokens: jax.Array) -> jax.Array:
    bound = bind(unbound, axes, values)
    inputs = pz.nx.wrap(tokens[:, :-1]).tag("batch", "seq")
    logits = bound(inputs).unwrap("batch", "seq", "vocabulary").astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

  return loss_fn


def train_model(train_rows: np.ndarray, heldout_rows: np.ndarray, steps: int) -> tuple:
  """Trains the LM; returns ``(values, axes, log)``."""
  model = build.build_model(CONFIG, jax.random.key(SEED))
  unbound, params = pz.unbind_params(model, freeze=True)
  axes = {p.label: tuple(p.value.named_shape) for p in params}
  values = {p.label: p.value.unwrap(*axes[p.label]) for p in params}
  loss_fn = make_loss(unbound, axes)
  warmup = min(WARMUP, steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(0.0, LR, warmup, steps, LR * 0.1)
  opt = optax.chain(
    optax.clip_by_global_norm(1.0),
    optax.adamw(
      schedule,
      b1=0.9,
      b2=0.95,
      weight_decay=WEIGHT_DECAY,
      mask=lambda tree: jax.tree.map(lambda x: x.ndim >= 2, tree),
    ),
  )
  state = opt.init(values)

  @jax.jit
  def step(values, state, tokens):
    loss, grads = jax.value_and_grad(loss_fn)(values, tokens)
    updates, state = opt.update(grads, state, values)
    return optax.apply_updates(values, updates), state, loss

  eval_fn = jax.jit(loss_fn)
  probe = tiny_eval.induction_tokens(VOCAB)
  rng = np.random.default_rng(SEED)
  order, cursor, log, recent = rng.permutation(len(train_rows)), 0, [], []
  start = time.time()
  for i in range(1, steps + 1):
    if cursor + TEXT_ROWS > len(order):
      order, cursor = rng.permutation(len(train_rows)), 0
    text = train_rows[order[cursor : cursor + TEXT_ROWS]]
    cursor += TEXT_ROWS
    synth = tiny_corpus.induction_rows(rng, SYNTH_ROWS, SEQ, FIRST_ORDINARY_ID, VOCAB)
    values, state, loss = step(values, state, np.concatenate([text, synth]))
    recent.append(float(loss))
    if i % 50 == 0 or i == steps:
      entry = dict(
        step=i, train_loss=float(np.mean(recent)), seconds=time.time() - start
      )
      if i % 250 == 0 or i == steps:
        entry["heldout_loss"] = float(eval_fn(values, heldout_rows[:32]))
        entry["best_induction_score"] = float(
          tiny_eval.induction_scores(bind(unbound, axes, values), probe).max()
        )
      log.append(entry)
      recent = []
      print(json.dumps(entry), flush=True)
  return values, axes, log


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  parser.add_argument("--steps", type=int, default=STEPS)
  args = parser.parse_args()
  out = args.out
  out.mkdir(parents=True, exist_ok=True)
  t0 = time.time()
  train_docs, heldout_docs = tiny_corpus.split(tiny_corpus.documents())
  print(
    f"{len(train_docs)} training / {len(heldout_docs)} held-out documents", flush=True
  )
  (out / "tokenizer.model").write_bytes(train_tokenizer(train_docs))
  tok = GemmaTokenizer.from_file(out / "tokenizer.model")
  kept, total = [], 0
  for doc in heldout_docs:
    if total >= HELDOUT_CHARS:
      break
    kept.append(doc)
    total += len(doc)
  heldout_json = {"recipe": tiny_corpus.recipe(), "documents": kept}
  (out / "heldout.json").write_text(json.dumps(heldout_json, indent=0) + "\n")
  train_rows = assets.pack_documents(tok.encode(train_docs, add_bos=False), SEQ)
  heldout_rows = assets.pack_documents(tok.encode(kept, add_bos=False), SEQ)
  print(
    f"{train_rows.shape[0]} training rows, {heldout_rows.shape[0]} held-out rows",
    flush=True,
  )
  values, axes, log = train_model(train_rows, heldout_rows, args.steps)
  (out / "config.json").write_text(json.dumps(hf_config_json(CONFIG), indent=2) + "\n")
  save_file(
    hf_tensors(values, axes, CONFIG), str(out / "model.safetensors"), {"format": "pt"}
  )
  # Round trip through the public loader.
  loaded = api.load(out, dtype="float32", progress=False)
  tokens = pz.nx.wrap(jnp.asarray(heldout_rows[:4, :-1])).tag("batch", "seq")
  unbound, _ = pz.unbind_params(
    build.build_model(CONFIG, jax.random.key(SEED)), freeze=True
  )
  reloaded = float(make_loss(unbound, axes)(values, heldout_rows[:4]))
  logits = loaded.model(tokens).unwrap("batch", "seq", "vocabulary")
  logp = jax.nn.log_softmax(logits, -1)
  via_loader = float(
    -jnp.mean(jnp.take_along_axis(logp, heldout_rows[:4, 1:, None], -1))
  )
  assert abs(reloaded - via_loader) < 1e-4, (reloaded, via_loader)
  model_section = dict(
    config=CONFIG.to_dict(),
    parameters=CONFIG.num_parameters(),
    tokenizer=dict(type="sentencepiece bpe", vocab_size=VOCAB, byte_fallback=True),
    training=dict(
      seed=SEED,
      steps=args.steps,
      seq_len=SEQ,
      text_rows=TEXT_ROWS,
      synthetic_rows=SYNTH_ROWS,
      optimizer="adamw b1=0.9 b2=0.95, clip 1.0, warmup-cosine to 0.1x",
      lr=LR,
      warmup=WARMUP,
      weight_decay=WEIGHT_DECAY,
      training_rows=int(train_rows.shape[0]),
      heldout_rows=int(heldout_rows.shape[0]),
      log=log,
      seconds=round(time.time() - t0, 1),
    ),
    corpus=tiny_corpus.recipe(),
    jax=jax.__version__,
    python=sys.version.split()[0],
  )
  manifest = {"name": "gemma-surgery tiny", "model": model_section}
  (out / assets.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
  print(f"done in {time.time() - t0:.0f}s; held-out loss {via_loader:.3f}", flush=True)


if __name__ == "__main__":
  main()
