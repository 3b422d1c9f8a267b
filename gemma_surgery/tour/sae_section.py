"""The SAE section of the tour (`gemma_surgery.tour`): features, metrics,
headlines, max-activating examples with their coherence, steering,
Neuronpedia."""

from __future__ import annotations

import collections
import dataclasses
from typing import Any

import numpy as np

from gemma_surgery import assets, viz
from gemma_surgery.generation import generate, named_tokens
from gemma_surgery.host import to_numpy
from gemma_surgery.sae import max_activating_examples, metrics, splice_sae
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
# The corpus the max-activating examples are drawn from: the embedded model's
# held-out documents (English technical prose, fine for any Gemma tokenizer),
# packed into CORPUS_ROWS rows of CORPUS_LEN tokens, scanned in batches of
# CORPUS_BATCH (one compiled shape).
CORPUS_ROWS, CORPUS_LEN, CORPUS_BATCH = 128, 64, 32
SHOWN_FEATURES = 4
EXAMPLES = 10


@dataclasses.dataclass(frozen=True)
class Coherence:
  """How single-minded a feature's max-activating examples are.

  Attributes:
    feature: The feature.
    token: The most common token at the examples' peaks.
    count: How many of the examples peak on it.
    total: How many examples there are.
  """

  feature: int
  token: str
  count: int
  total: int

  @property
  def fraction(self) -> float:
    return self.count / max(self.total, 1)


def coherence(examples: list[Any], pieces: Any) -> Coherence:
  """The most common peak token of ``examples`` (`sae.Example`) and its count.

  Args:
    examples: Max-activating examples of one feature.
    pieces: ``pieces(ids) -> list[str]`` (a tokenizer's ``pieces``).
  """
  peaks = pieces([e.context[e.index] for e in examples]) if examples else []
  if not peaks:
    return Coherence(-1, "", 0, 0)
  token, count = collections.Counter(peaks).most_common(1)[0]
  return Coherence(examples[0].feature, token, count, len(peaks))


def corpus(tokenizer: Any, bos_id: int, eos_id: int) -> list[np.ndarray]:
  """The tour's scan corpus: equal ``[CORPUS_BATCH, CORPUS_LEN + 1]`` batches."""
  docs = [tokenizer.encode(d, add_bos=False) for d in assets.heldout_texts()]
  rows = assets.pack_documents(docs, CORPUS_LEN, bos_id=bos_id, eos_id=eos_id)
  rows = rows[:CORPUS_ROWS]
  usable = len(rows) - len(rows) % CORPUS_BATCH
  return [rows[i : i + CORPUS_BATCH] for i in range(0, usable, CORPUS_BATCH)]


def _features(captured: Any, feats: Any, ids: np.ndarray) -> np.ndarray:
  """``[batch, seq, latents]`` features of ``ids`` through the spliced model."""
  jit_forward(captured)(named_tokens(ids))
  return to_numpy(feats.value().unwrap("batch", "seq", "latents"))


def sae_section(ctx: Any) -> None:
  """Adds the SAE views for ``ctx.sae`` to the tour report."""
  sae, model, info = ctx.sae, ctx.model, ctx.sae.info
  ctx.report.heading(f"Sparse autoencoder: {info.site} of layer {info.layer}")
  ctx.report.code(f"{info}")
  spliced, feats = splice_sae(model, sae, use_error_term=True, capture_features=True)
  captured, acts = capture(spliced, info.site, [info.layer])
  f = _features(captured, feats, ctx.ids)
  order = np.argsort(-f[0], axis=-1, kind="stable")[:, :5]
  values = np.take_along_axis(f[0], order, -1)
  ctx.report.add(
    viz.feature_strip(ctx.pieces, order, values, title=None),
    heading="Top features per token",
  )
  _reconstruction(ctx, captured, feats, acts)
  _max_activating(ctx, f)
  _steering(ctx, f)
  if info.neuronpedia:
    feature = int(np.argmax(f[0, 1:].max(axis=0)))
    ctx.report.text(
      f"Neuronpedia dashboard: https://www.neuronpedia.org/{info.neuronpedia}/{feature}"
    )


def _reconstruction(ctx: Any, captured: Any, feats: Any, acts: Any) -> None:
  sae, tok, model, info = ctx.sae, ctx.lm.tokenizer, ctx.model, ctx.sae.info
  rows = [tok.encode(t, add_bos=True) for t in TEXTS]
  width = min(map(len, rows))
  batch = np.asarray([r[:width] for r in rows], np.int32)
  fb = _features(captured, feats, batch)
  x = acts[info.site, info.layer]
  x_hat = sae.decode(sae.encode(x))
  tokens = named_tokens(batch)
  summary = metrics.summarize(
    x,
    x_hat,
    fb,
    metrics.token_mask(batch),
    clean_logits=jit_forward(model)(tokens),
    spliced_logits=jit_forward(splice_sae(model, sae))(tokens),
    ablated_logits=jit_forward(ablate(model, info.site, info.layer))(tokens),
    tokens=batch,
  )
  ctx.report.heading("Reconstruction on a few texts", 3)
  fields = dataclasses.asdict(summary)
  ctx.report.code("\n".join(f"{k:>26}: {v}" for k, v in fields.items()))
  feature = int(np.argmax(fb[:, 1:].max(axis=(0, 1))))
  texts = [tok.pieces([int(i) for i in r]) for r in batch]
  ctx.report.add(
    viz.feature_texts(texts, list(fb[..., feature]), title=f"feature {feature}"),
    heading=f"Feature {feature} across texts",
  )


def _max_activating(ctx: Any, f: np.ndarray) -> None:
  """The prompt's strongest features, where they fire most in held-out text."""
  sae, tok, cfg = ctx.sae, ctx.lm.tokenizer, ctx.lm.config
  batches = corpus(tok, cfg.bos_id, cfg.eos_id)
  if not batches:
    return
  shown = [int(i) for i in np.argsort(-f[0, 1:].max(axis=0), kind="stable")]
  shown = shown[:SHOWN_FEATURES]
  best = max_activating_examples(
    ctx.model, sae, batches, shown, n=EXAMPLES, progress=False
  )
  ctx.report.heading("What the prompt's strongest features fire on", 3)
  ctx.report.text(
    f"For the {len(shown)} features with the highest activation on the prompt:"
    f" their {EXAMPLES} strongest activations in {len(batches) * CORPUS_BATCH}"
    f" held-out rows of {CORPUS_LEN} tokens, cut around the peak token"
    " (outlined). Coherence: how many of a feature's examples peak on its most"
    " common peak token."
  )
  lines = []
  for feature in shown:
    examples = best[feature]
    c = coherence(examples, tok.pieces)
    lines.append(
      f"feature {feature:>6}: peaks on {c.token!r} in {c.count}/{c.total} examples"
    )
    ctx.report.add(
      viz.max_activating_examples(
        [tok.pieces(e.context) for e in examples],
        [e.activations for e in examples],
        title=None,
      ),
      heading=f"Feature {feature}: peaks on {c.token!r} in {c.count}/{c.total}",
    )
  ctx.report.code("\n".join(lines))
  ctx.coherence = [coherence(best[i], tok.pieces) for i in shown]


def _steering(ctx: Any, f: np.ndarray) -> None:
  sae, info = ctx.sae, ctx.sae.info
  feature = int(np.argmax(f[0, 1:].max(axis=0)))
  peak = float(f[0, 1:, feature].max()) or 1.0
  direction = sae.w_dec.value[{"latents": feature}].astype(np.float32)
  steered = steer(ctx.model, info.site, info.layer, direction, 4.0 * peak)
  out = generate(
    steered,
    ctx.ids,
    max_new_tokens=ctx.new_tokens,
    tokenizer=ctx.lm.tokenizer,
    eos_id=ctx.lm.config.eos_id,
  )
  ctx.report.heading(f"Steering with feature {feature} (4 × its peak activation)", 3)
  ctx.report.code(
    f" original: {ctx.continuation!r}\n  steered: {(out.text or [''])[0]!r}"
  )
