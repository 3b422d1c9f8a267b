"""Train the embedded model's transcoders (one per layer) and a small CLT.

Runs on a CPU in minutes, from the package alone: the data are the shipped
held-out documents (``gs.assets.heldout_texts()``, packed into rows of
`SEQ` tokens) plus `SYNTH_ROWS` synthetic induction rows (a random span of
ordinary tokens repeated to fill the row, so that induction features exist).
``mlp.in`` / ``mlp.out`` of every layer are captured (BOS dropped), scaled to
unit mean squared norm per layer, and split 90/10 into train / eval tokens.

* Transcoders: per layer, JumpReLU (Gemma Scope recipe: straight-through
  pseudo-derivatives with a rectangle kernel, L0 penalty warmed up, Adam
  b1=0), width `TC_WIDTH`, reading ``mlp.in`` and predicting ``mlp.out``.
* CLT: an encoder per layer and decoders to every later layer, trained
  jointly (summed MSE of all layers + the L0 penalty), width `CLT_WIDTH`.

The normalization scales are folded into the weights, so the files read raw
activations. Written in the Gemma Scope 2 layouts into ``--out`` (default:
the package's ``gemma_surgery/assets/tiny``)::

  transcoder_all/layer_L_width_W_l0_small/{params.safetensors, config.json}
  clt/width_W_l0_small/{params_layer_L.safetensors, config.json}

and ``manifest.json`` gains a ``circuits`` section (recipe, seeds, eval
fraction of variance unexplained and L0 per layer) and the new files'
SHA-256. Usage::

  python scripts/train_embedded_transcoders.py            # ~25 min on 2 busy CPUs
  python scripts/train_embedded_transcoders.py --steps 50 --out /tmp/t  # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

import gemma_surgery as gs
from gemma_surgery.sae.autoencoders import SAEInfo, Transcoder
from gemma_surgery.sae.clt import CLTInfo, CrossLayerTranscoder
from gemma_surgery.sae.clt_files import (
  load_clt,
  load_transcoders,
  save_clt_gemma_scope_2,
)
from gemma_surgery.sae.train import jumprelu, step

SEED = 0
SEQ = 128
SYNTH_ROWS = 96
MIN_SPAN, MAX_SPAN = 6, 32
FIRST_ORDINARY_ID = 262
TC_WIDTH = 384
CLT_WIDTH = 96
BATCH = 1024
LR = 1e-3
THETA_LR = 1e-2  # log θ moves faster: short CPU runs must reach a low L0.
BANDWIDTH = 1e-2  # ε of the rectangle kernel (normalized units).
THETA0 = 0.05
TC_LAMBDA = 8e-3  # λ: L0 penalty per token and layer, normalized units.
CLT_LAMBDA = 8e-3
L0_LABEL = "small"
MODEL_NAME = "gemma-surgery-tiny"


def rows(tok, rng: np.random.Generator) -> np.ndarray:
  docs = tok.encode(gs.assets.heldout_texts(), add_bos=False)
  text = gs.assets.pack_documents(docs, SEQ - 1)
  synth = np.zeros((SYNTH_ROWS, SEQ), np.int32)
  synth[:, 0] = 2
  vocab = 4096  # gs.load("tiny").config.vocab_size (checked in main)
  for r in range(SYNTH_ROWS):
    span = int(np.exp(rng.uniform(np.log(MIN_SPAN), np.log(MAX_SPAN))))
    piece = rng.integers(FIRST_ORDINARY_ID, vocab, span)
    synth[r, 1:] = np.resize(piece, SEQ - 1)
  return np.concatenate([text, synth])


def activations(model, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``[L, tokens, d]`` mlp.in and mlp.out (BOS dropped)."""
  patched, acts = gs.capture(model, ["mlp.in", "mlp.out"])
  forward = gs.jit_forward(patched)
  n = gs.surgery.sites.num_layers(model)
  ins, outs = [], []
  for start in tqdm(range(0, len(data), 16), desc="activations"):
    forward(gs.named_tokens(data[start : start + 16].tolist()))
    ins.append(
      [
        np.asarray(acts["mlp.in", i].unwrap("batch", "seq", "embedding"))[:, 1:]
        for i in range(n)
      ]
    )
    outs.append(
      [
        np.asarray(acts["mlp.out", i].unwrap("batch", "seq", "embedding"))[:, 1:]
        for i in range(n)
      ]
    )
  x = np.stack(
    [
      np.concatenate([b[i] for b in ins]).reshape(-1, ins[0][0].shape[-1])
      for i in range(n)
    ]
  )
  y = np.stack(
    [
      np.concatenate([b[i] for b in outs]).reshape(-1, outs[0][0].shape[-1])
      for i in range(n)
    ]
  )
  return x.astype(np.float32), y.astype(np.float32)


def init(key, n: int, d: int, width: int, clt: bool) -> dict:
  k1, k2 = jax.random.split(key)
  w_enc = jax.random.normal(k1, (n, d, width)) / np.sqrt(d)
  shape = (n, width, n, d) if clt else (n, width, d)
  w_dec = jax.random.normal(k2, shape) * (0.1 / np.sqrt(width))
  return dict(
    w_enc=w_enc,
    b_enc=jnp.zeros((n, width)),
    log_theta=jnp.full((n, width), np.log(THETA0)),
    w_dec=w_dec,
    b_dec=jnp.zeros((n, d)),
  )


def forward(p: dict, x: jax.Array, clt: bool, causal: jax.Array) -> tuple:
  """``x [L, B, d]`` -> (prediction ``[L, B, d]``, L0 per layer)."""
  theta = jnp.exp(p["log_theta"])
  z = jnp.einsum("lbd,ldf->lbf", x, p["w_enc"]) + p["b_enc"][:, None]
  # Per layer (the pseudo-derivatives of sae.train expect a {latents} θ).
  f = jax.vmap(lambda zl, tl: jumprelu(zl, tl, BANDWIDTH))(z, theta)
  on = jax.vmap(lambda zl, tl: step(zl, tl, BANDWIDTH))(z, theta)
  l0 = jnp.mean(jnp.sum(on, -1), -1)
  if clt:
    w = p["w_dec"] * causal[:, None, :, None]  # source l -> target k >= l only
    y = jnp.einsum("lbf,lfkd->kbd", f, w)
  else:
    y = jnp.einsum("lbf,lfd->lbd", f, p["w_dec"])
  return y + p["b_dec"][:, None], l0


def train(x, y, width: int, clt: bool, steps: int, lam: float, seed: int) -> tuple:
  n, tokens, d = x.shape
  params = init(jax.random.key(seed), n, d, width, clt)
  labels = {k: ("theta" if k == "log_theta" else "rest") for k in params}
  opt = optax.multi_transform(
    {
      "rest": optax.adam(optax.linear_schedule(0.0, LR, 200), b1=0.0, b2=0.999),
      "theta": optax.adam(optax.linear_schedule(0.0, THETA_LR, 200), b1=0.0, b2=0.999),
    },
    labels,
  )
  state = opt.init(params)
  causal = jnp.asarray(np.triu(np.ones((n, n))), jnp.float32)

  @jax.jit
  def update(p, state, xb, yb, lam_now):
    def loss_fn(p):
      pred, l0 = forward(p, xb, clt, causal)
      mse = jnp.mean(jnp.sum((yb - pred) ** 2, -1), -1)
      return jnp.sum(mse) + lam_now * jnp.sum(l0), (mse, l0)

    (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
    updates, state = opt.update(g, state, p)
    return optax.apply_updates(p, updates), state, aux

  rng = np.random.default_rng(seed)
  bar = tqdm(range(steps), desc="CLT" if clt else "transcoders")
  for i in bar:
    idx = rng.integers(0, tokens, BATCH)
    lam_now = lam * min(1.0, (i + 1) / (steps // 5 + 1))
    params, state, (mse, l0) = update(params, state, x[:, idx], y[:, idx], lam_now)
    if (i + 1) % 200 == 0:
      bar.set_postfix(mse=f"{float(mse.mean()):.3f}", l0=f"{float(l0.mean()):.1f}")
  return params, causal


def folded(params, sx: np.ndarray, sy: np.ndarray, clt: bool) -> dict:
  """Raw-activation weights: x_n = x·sx, y = y_n / sy."""
  p = {k: np.asarray(v, np.float32) for k, v in params.items()}
  out = dict(
    w_enc=p["w_enc"] * sx[:, None, None],
    b_enc=p["b_enc"],
    threshold=np.exp(p["log_theta"]).astype(np.float32),
    b_dec=p["b_dec"] / sy[:, None],
  )
  if clt:
    n = len(sx)
    mask = np.triu(np.ones((n, n), np.float32))[:, None, :, None]
    out["w_dec"] = p["w_dec"] * mask / sy[None, None, :, None]
  else:
    out["w_dec"] = p["w_dec"] / sy[:, None, None]
  return out


def sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=gs.assets.TINY_DIR)
  parser.add_argument("--steps", type=int, default=2000)
  parser.add_argument("--clt-steps", type=int, default=2000)
  parser.add_argument("--only", choices=("transcoders", "clt"), default=None)
  parser.add_argument(
    "--reuse", action="store_true", help="evaluate files already in --out, no training"
  )
  parser.add_argument(
    "--cache", type=pathlib.Path, default=None, help="reuse captured activations (.npz)"
  )
  args = parser.parse_args()
  start = time.time()
  lm = gs.load("tiny")
  model, tok = lm.model, lm.tokenizer
  rng = np.random.default_rng(SEED)
  data = rows(tok, rng)
  if args.cache is not None and args.cache.is_file():
    with np.load(args.cache) as saved:
      x, y = saved["x"], saved["y"]
  else:
    x, y = activations(model, data)
    if args.cache is not None:
      np.savez(args.cache, x=x, y=y)
  n, tokens, d = x.shape
  sx = 1.0 / np.sqrt((x.astype(np.float64) ** 2).sum(-1).mean(-1))
  sy = 1.0 / np.sqrt((y.astype(np.float64) ** 2).sum(-1).mean(-1))
  xn, yn = (
    x * sx[:, None, None].astype(np.float32),
    y * sy[:, None, None].astype(np.float32),
  )
  perm = rng.permutation(tokens)
  cut = int(0.9 * tokens)
  tr, ev = perm[:cut], perm[cut:]
  report = dict(
    seed=SEED,
    data=dict(
      text_rows=int(len(data) - SYNTH_ROWS),
      synthetic_rows=SYNTH_ROWS,
      seq=SEQ,
      tokens=int(tokens),
      train_tokens=int(cut),
    ),
    recipe=dict(
      batch=BATCH,
      lr=LR,
      theta_lr=THETA_LR,
      bandwidth=BANDWIDTH,
      theta0=THETA0,
      adam_b1=0.0,
    ),
  )
  out = pathlib.Path(args.out)
  for clt, width, steps, lam in (
    (False, TC_WIDTH, args.steps, TC_LAMBDA),
    (True, CLT_WIDTH, args.clt_steps, CLT_LAMBDA),
  ):
    if args.only is not None and args.only != ("clt" if clt else "transcoders"):
      continue
    if clt:
      folder = out / "clt" / f"width_{width}_l0_{L0_LABEL}"
    else:
      folder = out / "transcoder_all"
    if not (args.reuse and folder.is_dir()):
      params, _ = train(xn[:, tr], yn[:, tr], width, clt, steps, lam, SEED)
      write(folded(params, sx, sy, clt), folder, clt, n, d, width)
    # Evaluated from the written files, on raw activations (FVU and L0 do
    # not depend on the normalization), which also checks the folding.
    metrics = evaluate_files(folder, clt, x[:, ev], y[:, ev])
    report["clt" if clt else "transcoders"] = dict(
      width=width, steps=steps, sparsity_coefficient=lam, eval=metrics
    )
    print("clt" if clt else "transcoders", metrics)
  if not args.reuse:
    report["minutes"] = round((time.time() - start) / 60, 2)
  manifest_path = out / "manifest.json"
  if manifest_path.is_file():
    manifest = json.loads(manifest_path.read_text())
    old = manifest.get("circuits", {})
    manifest["circuits"] = {**old, **report}
    for path in sorted((out / "transcoder_all").rglob("*")) + sorted(
      (out / "clt").rglob("*")
    ):
      if path.is_file():
        rel = path.relative_to(out).as_posix()
        manifest["files"][rel] = dict(sha256=sha256(path), bytes=path.stat().st_size)
    gs.atomic.write_text(manifest_path, json.dumps(manifest, indent=1) + "\n")
  print(json.dumps(report, indent=1))


def write(arrays: dict, folder: pathlib.Path, clt: bool, n: int, d: int, width: int):
  if clt:
    info = CLTInfo(num_layers=n, d_model=d, width=width, source="tiny-clt")
    clt_layer = CrossLayerTranscoder.from_arrays(arrays, info)
    save_clt_gemma_scope_2(clt_layer, folder, l0=L0_LABEL, model_name=MODEL_NAME)
    return
  for i in range(n):
    sub = folder / f"layer_{i}_width_{width}_l0_{L0_LABEL}"
    write_transcoder({k: v[i] for k, v in arrays.items()}, sub, i, width)


def evaluate_files(
  folder: pathlib.Path, clt: bool, x: np.ndarray, y: np.ndarray
) -> dict:
  """FVU and L0 per layer of the written dictionary on raw activations."""
  from penzai import pz

  dictionary = (load_clt if clt else load_transcoders)(folder)
  n = x.shape[0]
  named = pz.nx.wrap(jnp.asarray(x)).tag("layer", "tokens", "embedding")
  pred = np.asarray(dictionary(named).unwrap("layer", "tokens", "embedding"))
  l0 = [
    float(
      np.mean(
        np.sum(
          np.asarray(
            dictionary.encode_layer(i, named[{"layer": i}]).unwrap("tokens", "latents")
          )
          > 0,
          -1,
        )
      )
    )
    for i in range(n)
  ]
  resid = ((y - pred) ** 2).sum(-1).mean(-1)
  var = ((y - y.mean(1, keepdims=True)) ** 2).sum(-1).mean(-1)
  return dict(
    fvu=[round(float(v), 4) for v in resid / var], l0=[round(v, 2) for v in l0]
  )


def write_transcoder(
  arrays: dict, folder: pathlib.Path, layer: int, width: int
) -> None:
  info = SAEInfo(
    family="transcoder",
    layer=layer,
    site="mlp.in",
    out_site="mlp.out",
    d_in=arrays["w_enc"].shape[0],
    width=width,
    d_out=arrays["w_dec"].shape[1],
    source=f"tiny-transcoder-{layer}",
    hook_in=f"model.layers.{layer}.pre_feedforward_layernorm.output",
    hook_out=f"model.layers.{layer}.post_feedforward_layernorm.output",
  )
  tc = Transcoder.from_arrays(arrays, info)
  gs.sae.files.save_gemma_scope_2(tc, folder, l0=L0_LABEL, model_name=MODEL_NAME)


if __name__ == "__main__":
  main()
