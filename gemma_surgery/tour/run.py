"""The tour: every analysis of the three tutorials on one model, as one report.

`run_tour` runs the logit lens, MLP-neuron views and edits, the attention view
and head scores, induction with head knockouts, activation-patching sweeps
and their attribution-patching estimates (and, with an SAE, the SAE views) on
a loaded model, and writes one self-contained ``report.html`` plus PNGs of
the heatmaps into a folder. The ``gemma-surgery tour`` command calls it.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import tqdm.auto as tqdm

from gemma_surgery import analysis, errors, viz
from gemma_surgery.generation import named_tokens
from gemma_surgery.host import to_numpy
from gemma_surgery.loading.api import LoadedModel
from gemma_surgery.surgery import capture, jit_forward
from gemma_surgery.tour.attribution_section import attribution_section
from gemma_surgery.tour.overview_section import overview_section
from gemma_surgery.tour.sae_section import sae_section

DEFAULT_PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return"


@dataclasses.dataclass
class TourContext:
  """What every tour section reads and writes.

  Attributes:
    lm: The loaded model (model, config, tokenizer).
    prompt: The prompt analysed.
    ids: ``[1, seq]`` its token ids.
    pieces: Display strings of ``ids[0]``.
    report: The report being built.
    out: Output folder (PNGs go here; only process 0 writes, see `run_tour`).
    sae: Optional SAE for the SAE sections.
    pngs: PNG files written so far.
    new_tokens: Tokens every greedy continuation of the prompt generates (one
      compiled shape for the whole tour).
    continuation: The unedited model's greedy continuation (set by the
      overview; edited generations are compared with it).
    coherence: The SAE section's coherence of the prompt's top features.
    sweeps: Exact patching sweeps by ``(site, by)`` (the patching section).
    patching_pair: ``(clean, corrupted, metric)`` of those sweeps.
  """

  lm: LoadedModel
  prompt: str
  ids: np.ndarray
  pieces: list[str]
  report: viz.Report
  out: pathlib.Path
  sae: Any = None
  pngs: list[pathlib.Path] = dataclasses.field(default_factory=list)
  new_tokens: int = 24
  continuation: str = ""
  coherence: list[Any] = dataclasses.field(default_factory=list)
  sweeps: dict[tuple[str, str], Any] = dataclasses.field(default_factory=dict)
  patching_pair: Any = None

  @property
  def model(self) -> Any:
    return self.lm.model

  def piece_list(self, ids: Any) -> list[str]:
    ids = [int(i) for i in to_numpy(ids).reshape(-1)]
    if self.lm.tokenizer is None:
      return [str(i) for i in ids]
    return self.lm.tokenizer.pieces(ids)

  def heatmap(self, name: str, values: np.ndarray, heading: str, **kwargs) -> None:
    """Adds a heatmap to the report and saves its PNG as ``name.png``."""
    view = viz.heatmap(values, title=None, **kwargs)
    self.report.add(view, heading=heading)
    if jax.process_index() != 0:
      return
    try:
      path = view.save_png(self.out / f"{name}.png")
    except ImportError as e:  # a broken matplotlib install (it is a dependency)
      warnings.warn(
        f"The tour skipped {name}.png: PNG export failed ({e}). The report has"
        " the heatmap; reinstall matplotlib for the PNG.",
        stacklevel=2,
      )
      return
    self.pngs.append(path)


def _logit_lens(ctx: TourContext) -> None:
  lens = analysis.logit_lens(ctx.model, ctx.ids, k=10)
  tops = np.array(
    [ctx.piece_list(row) for row in lens.top_ids[:, 0].reshape(-1, 10)], dtype=object
  ).reshape(lens.top_ids[:, 0].shape)
  ctx.report.heading("Logit lens")
  ctx.report.text(
    "The residual stream after the embedding and every attention and MLP"
    " sublayer, decoded by the model's own head. Colour: how much the sublayer"
    " turned the residual (1 − cos); hover for the top 10."
  )
  ctx.report.add(
    viz.logit_lens_table(
      tops,
      lens.top_probs[:, 0],
      lens.change[:, 0],
      row_labels=lens.labels,
      col_tokens=ctx.pieces,
      next_tokens=[*ctx.pieces[1:], "?"],
      title=None,
    )
  )


def _neurons(ctx: TourContext) -> None:
  n = ctx.lm.config.num_layers
  layer = n // 2
  top = analysis.top_neurons(ctx.model, ctx.ids, layers=[layer], k=8)
  ids, values = top.ids[0, 0], top.values[0, 0]
  ctx.report.heading(f"MLP neurons (layer {layer})")
  ctx.report.add(
    viz.neuron_buckets(
      ctx.pieces,
      ids,
      values,
      num_neurons=ctx.lm.config.layer_mlp_dim(layer),
      title=None,
    ),
    heading="Top neurons per token",
  )
  neuron = int(ids[:, 0][np.argmax(values[:, 0])])
  hidden = _neuron_activation(ctx, layer, neuron)
  ctx.report.add(
    viz.neuron_strip(ctx.pieces, hidden, top_ids=ids, top_values=values, title=None),
    heading=f"Neuron {neuron} across the prompt",
  )
  proj = analysis.neuron_tokens(ctx.model, layer, neuron, k=8)
  lines = [
    f"{kind:>4}: " + " ".join(ctx.piece_list(proj.top[kind][0])) for kind in proj.top
  ]
  ctx.report.heading(f"Neuron {neuron}: tokens of its weights", 3)
  ctx.report.code("\n".join(lines))
  texts = analysis.compare_neuron_edits(
    ctx.model,
    ctx.ids,
    layer,
    neuron,
    tokenizer=ctx.lm.tokenizer,
    eos_id=ctx.lm.config.eos_id,
    max_new_tokens=ctx.new_tokens,
  )
  ctx.report.heading(f"Neuron {neuron} deactivated / boosted ×10", 3)
  ctx.report.code(
    "\n".join(f"{label:>12}: {_as_text(t[0])!r}" for label, t in texts.items())
  )


def _as_text(value: Any) -> str:
  return value if isinstance(value, str) else " ".join(map(str, np.asarray(value)))


def _neuron_activation(ctx: TourContext, layer: int, neuron: int) -> np.ndarray:

  patched, acts = capture(ctx.model, "mlp.hidden", [layer])
  jit_forward(patched)(named_tokens(ctx.ids))
  return to_numpy(acts["mlp.hidden", layer].unwrap("batch", "seq", "neurons"))[
    0, :, neuron
  ]


def _attention(ctx: TourContext) -> None:
  pattern = analysis.attention_patterns(ctx.model, ctx.ids)[:, 0]
  ctx.report.heading("Attention")
  ctx.report.add(
    viz.attention_view(ctx.pieces, pattern, mask_bos=True, title=None),
    heading="Patterns (click a token; pick a layer and head)",
  )
  ind = analysis.induction_scores(
    ctx.model,
    length=24,
    batch=4,
    bos_id=ctx.lm.config.bos_id,
    tokenizer=ctx.lm.tokenizer,
  )
  full = analysis.attention_patterns(ctx.model, ind.tokens)
  n_heads = ind.scores.shape[1]
  scores = {
    "previous-token": analysis.previous_token_scores(full, ind.tokens),
    "duplicate-token": analysis.duplicate_token_scores(full, ind.tokens),
    "induction": ind.scores,
  }
  for name, values in scores.items():
    ctx.heatmap(
      f"heads_{name}",
      values,
      f"Head scores: {name} (repeated random tokens)",
      row_labels=list(range(len(values))),
      col_labels=list(range(n_heads)),
      col_title="head",
      value_label=f"{name} score",
      center=None,
      vmin=0.0,
      vmax=1.0,
    )
  best = [(layer, head) for layer, head, _ in ind.best_heads(2)]
  knock = analysis.knockout_losses(ctx.model, best, ind.tokens, ind.length)
  ctx.report.code(
    f"loss on the first repeat {ind.loss_first:.3f},"
    f" on the second {ind.loss_second:.3f}\n"
    f"best induction heads (layer, head, score): {ind.best_heads(2)}\n"
    f"second-repeat loss with them knocked out: {knock['knocked_out']:.3f}"
    f" (+{knock['increase']:.3f})"
  )


def induction_patching_prompts(
  vocab_size: int,
  *,
  length: int = 12,
  seed: int = 0,
  bos_id: int = 2,
  tokenizer: Any = None,
) -> tuple[np.ndarray, np.ndarray, int, int]:
  """A clean/corrupted pair whose answer needs copying from earlier context.

  Clean: ``BOS r_1..r_n r_1..r_k`` (the next token is ``r_{k+1}``, readable
  only by induction). Corrupted: the same with ``r_{k+1}`` in the first
  repeat replaced by another token ``x``. Returns ``(clean, corrupted,
  correct, wrong)`` with ``correct = r_{k+1}``, ``wrong = x``. Tokens are
  distinct draws from `analysis.token_pool` (the tokenizer's ordinary pieces
  when one is given, else ids ``4..vocab_size − 1``).
  """
  rng = np.random.default_rng(seed)
  pool = analysis.token_pool(vocab_size, tokenizer=tokenizer)
  tokens = rng.choice(pool, size=length + 1, replace=False)
  half, other = tokens[:length], int(tokens[length])
  k = length // 2
  clean = np.concatenate([[bos_id], half, half[:k]]).astype(np.int32)[None]
  corrupted = clean.copy()
  corrupted[0, 1 + k] = other
  return clean, corrupted, int(half[k]), other


def _patching(ctx: TourContext) -> None:
  clean, corrupted, correct, wrong = induction_patching_prompts(
    ctx.lm.config.vocab_size, bos_id=ctx.lm.config.bos_id, tokenizer=ctx.lm.tokenizer
  )
  metric = analysis.logit_difference(correct, wrong)
  ctx.patching_pair = (clean, corrupted, metric)
  pieces = ctx.piece_list(clean)
  ctx.report.heading("Activation patching")
  ctx.report.text(
    "Clean: a random token sequence, then its first half again; the next token"
    " can only be copied from the first occurrence. Corrupted: that token"
    " replaced in the first occurrence. Metric: logit(correct) − logit(corrupted"
    " token) at the last position, normalised so 1 = clean behaviour restored."
  )
  for site, by in (
    ("resid_post", "position"),
    ("attn.out", "position"),
    ("mlp.out", "position"),
    ("attn.z", "head"),
  ):
    result = analysis.patching_sweep(
      ctx.model, clean, corrupted, metric, site=site, by=by, progress=False
    )
    ctx.sweeps[site, by] = result
    cols = pieces if by == "position" else list(range(result.scores.shape[1]))
    ctx.heatmap(
      f"patching_{site.replace('.', '_')}",
      _normalized(result),
      f"{site} by {by}",
      row_labels=result.layers,
      col_labels=cols,
      col_title=by,
      value_label="restored (normalised)",
    )


def _normalized(result: Any) -> np.ndarray:
  try:
    return result.normalized
  except errors.InputError:
    return result.scores - result.corrupted


SECTIONS: dict[str, Callable[[TourContext], None]] = {
  "overview": overview_section,
  "logit lens": _logit_lens,
  "neurons": _neurons,
  "attention": _attention,
  "activation patching": _patching,
  "attribution patching": attribution_section,
}


def check_out(out: str | pathlib.Path) -> pathlib.Path:
  """``out`` as a path, if it is a folder or can be created as one.

  Raises:
    InputError: ``out``, or a folder above it, is a file (named).
  """
  out = pathlib.Path(out)
  for folder in (out, *out.parents):
    if folder.exists():
      if not folder.is_dir():
        where = "is" if folder == out else f"is under {str(folder)!r}, which is"
        raise errors.InputError(
          f"Output folder {str(out)!r} {where} a file; pass a folder (it is"
          " created if absent)."
        )
      break
  return out


def run_tour(
  lm: LoadedModel,
  out: str | pathlib.Path,
  *,
  prompt: str | None = None,
  sae: Any = None,
  progress: bool = True,
) -> pathlib.Path:
  """Runs every analysis on ``lm`` and writes ``out/report.html`` (+ PNGs).

  Args:
    lm: A loaded model (``gs.load(...)``); a tokenizer gives readable tokens.
    out: Output folder (created).
    prompt: The prompt analysed (default: a short piece of Python).
    sae: Optional SAE (``gs.sae.load_sae``) for the SAE sections.
    progress: Show a progress bar over sections.

  Returns:
    The path of the report.

  Raises:
    InputError: ``out`` can't be a folder (checked before any analysis).
    TokenizerError: ``lm`` has no tokenizer.

  On several processes (a model loaded onto a mesh that spans them, see
  `gemma_surgery.parallel.distributed`) every process runs every analysis, and only
  process 0 writes the files; the others return the same path.
  """
  out = check_out(out)
  primary = jax.process_index() == 0
  if primary:
    try:
      out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise errors.InputError(f"Cannot create output folder {str(out)!r}: {e}") from e
  prompt = DEFAULT_PROMPT if prompt is None else prompt
  if lm.tokenizer is None:
    raise errors.TokenizerError(
      "The tour needs a tokenizer (the model folder has no tokenizer.model or"
      " tokenizer.json): load with tokenizer=PATH."
    )
  ids = np.asarray([lm.tokenizer.encode(prompt, add_bos=True)], np.int32)
  ctx = TourContext(
    lm=lm,
    prompt=prompt,
    ids=ids,
    pieces=lm.tokenizer.pieces([int(i) for i in ids[0]]),
    report=viz.Report(f"gemma_surgery tour: {pathlib.Path(str(lm.path)).name}"),
    out=out,
    sae=sae,
  )
  sections = dict(SECTIONS)
  if sae is not None:
    sections["sparse autoencoder"] = sae_section
  bar = tqdm.tqdm(sections.items(), desc="tour", disable=not progress)
  for name, section in bar:
    bar.set_postfix_str(name)
    start = time.perf_counter()
    section(ctx)
    ctx.report.text(f"({name}: {time.perf_counter() - start:.1f} s)")
  if not primary:
    return out / "report.html"
  return ctx.report.save(out / "report.html")
