"""The SAE section of the tour (`gemma_surgery.tour`): features, metrics,
headlines, max-activating examples, steering, Neuronpedia."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from gemma_surgery import viz
from gemma_surgery.generation import generate, named_tokens
from gemma_surgery.host import to_numpy
from gemma_surgery.sae import metrics, splice_sae
from gemma_surgery.surgery import capture, jit_forward, steer
from gemma_surgery.surgery.interventions import ablate

TEXTS = (
  "Return a new list containing all items from the iterable in ascending order.",
  "Open the file and return a stream. Raise OSError upon failure.",
  "The default encoding is platform dependent, but any text encoding can be used.",
  "If the optional argument is given, it is used as the initial value.",
  "This function is deprecated since version 3.2; use the new one instead.",
  "Create a new dictionary with keys from the iterable and values set to value.",
)


def _features(model: Any, sae: Any, ids: np.ndarray) -> tuple[np.ndarray, Any, Any]:
  """``[batch, seq, latents]`` features, the site activation and its logits."""
  spliced, feats = splice_sae(model, sae, use_error_term=True, capture_features=True)
  captured, acts = capture(spliced, sae.info.site, [sae.info.layer])
  logits = jit_forward(captured)(named_tokens(ids))
  f = to_numpy(feats.value().unwrap("batch", "seq", "latents"))
  return f, acts[sae.info.site, sae.info.layer], logits


def sae_section(ctx: Any) -> None:
  """Adds the SAE views for ``ctx.sae`` to the tour report."""
  sae, tok, model = ctx.sae, ctx.lm.tokenizer, ctx.model
  info = sae.info
  ctx.report.heading(f"Sparse autoencoder: {info.site} of layer {info.layer}")
  ctx.report.code(f"{info}")
  f, _, _ = _features(model, sae, ctx.ids)
  order = np.argsort(-f[0], axis=-1, kind="stable")[:, :5]
  values = np.take_along_axis(f[0], order, -1)
  ctx.report.add(
    viz.feature_strip(ctx.pieces, order, values, title=None),
    heading="Top features per token",
  )
  rows = [tok.encode(t, add_bos=True) for t in TEXTS]
  width = min(map(len, rows))
  batch = np.asarray([r[:width] for r in rows], np.int32)
  fb, x, _ = _features(model, sae, batch)
  x_hat = sae.decode(sae.encode(x))
  clean = jit_forward(model)(named_tokens(batch))
  recon = jit_forward(splice_sae(model, sae))(named_tokens(batch))
  zeroed = jit_forward(ablate(model, info.site, info.layer))(named_tokens(batch))
  summary = metrics.summarize(
    x,
    x_hat,
    fb,
    metrics.token_mask(batch),
    clean_logits=clean,
    spliced_logits=recon,
    ablated_logits=zeroed,
    tokens=batch,
  )
  ctx.report.heading("Reconstruction on a few texts", 3)
  fields = dataclasses.asdict(summary)
  ctx.report.code("\n".join(f"{k:>26}: {v}" for k, v in fields.items()))
  feature = int(np.argmax(f[0, 1:].max(axis=0)))
  texts = [tok.pieces([int(i) for i in r]) for r in rows]
  per_text = [
    _features(model, sae, np.asarray([r], np.int32))[0][0, :, feature] for r in rows
  ]
  ctx.report.add(
    viz.feature_texts(texts, per_text, title=f"feature {feature}"),
    heading=f"Feature {feature} across texts",
  )
  ctx.report.add(
    viz.max_activating_examples(texts, per_text, top=4, title=None),
    heading=f"Feature {feature}: max-activating examples",
  )
  peak = float(max(a.max() for a in per_text)) or 1.0
  direction = sae.w_dec.value[{"latents": feature}].astype(np.float32)
  lines = []
  for name, m in (
    ("original", model),
    ("steered", steer(model, info.site, info.layer, direction, 4.0 * peak)),
  ):
    out = generate(
      m, ctx.ids, max_new_tokens=16, tokenizer=tok, eos_id=ctx.lm.config.eos_id
    )
    lines.append(f"{name:>9}: {out.text[0]!r}")
  ctx.report.heading(f"Steering with feature {feature} (4 × its peak activation)", 3)
  ctx.report.code("\n".join(lines))
  if info.neuronpedia:
    ctx.report.text(
      f"Neuronpedia dashboard: https://www.neuronpedia.org/{info.neuronpedia}/{feature}"
    )
