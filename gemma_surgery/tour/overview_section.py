"""The tour's first section: the model's architecture, layer by layer, and its
greedy continuation of the prompt (which later sections compare edits with)."""

from __future__ import annotations

from typing import Any

from gemma_surgery import config_gemma4, viz
from gemma_surgery.generation import generate


def model_summary(config: Any, source: Any) -> str:
  """The architecture as text: totals, then one row per kind of layer.

  Gemma 4 layers differ in head width, kv heads, KV sharing and MLP width, so
  heads and MLP widths are given per group of identical layers
  (`config_gemma4.describe_layers`), not as one number.
  """
  rows = config_gemma4.describe_layers(config)
  width = max(len(layers) for layers, _ in rows)
  return "\n".join(
    [
      f"source: {source}",
      f"family: {config.family}, layers: {config.num_layers},"
      f" d_model: {config.embedding_dim}, vocab: {config.vocab_size},"
      f" parameters: {config.num_parameters():,}",
      *(f"  {layers:<{width}}  {spec}" for layers, spec in rows),
    ]
  )


def overview_section(ctx: Any) -> None:
  """Adds the model summary and the greedy continuation (sets ``ctx.continuation``)."""
  cfg = ctx.lm.config
  ctx.report.heading("Model")
  ctx.report.code(model_summary(cfg, ctx.lm.path))
  out = generate(
    ctx.model,
    ctx.ids,
    max_new_tokens=ctx.new_tokens,
    tokenizer=ctx.lm.tokenizer,
    eos_id=cfg.eos_id,
  )
  text = out.text[0] if out.text else " ".join(map(str, out.tokens[0]))
  ctx.continuation = text
  ctx.report.heading("Greedy continuation", 3)
  ctx.report.code(ctx.prompt + text)
  if cfg.num_parameters() <= 50_000_000:
    ctx.report.add(viz.show(ctx.model, arrays=False), heading="The Penzai model")
