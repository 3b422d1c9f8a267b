"""The README's table of the embedded model, rendered from its manifest.

Every number in README.md's "Embedded default model" table comes from here
(`tests/apps/test_readme.py` checks the README holds exactly these rows);
the numbers themselves were measured by ``train_embedded_v2.py`` and are
re-measured independently by ``tests/model/test_tiny.py``.

Usage: ``python scripts/readme_embedded.py`` prints the table.
"""

from __future__ import annotations

from gemma_surgery import assets


def table_rows(manifest: dict | None = None) -> list[str]:
  """The table's Markdown rows (header included)."""
  m = manifest or assets.manifest()
  cfg, model, metrics, sae = m["model"]["config"], m["model"], m["metrics"], m["sae"]
  corpus, training = model["corpus"], model["training"]
  hp = model["hyperparameters"]
  kinds = ", ".join(cfg["attention_types"])
  best = metrics["best_all_span_head"]
  spans = metrics["best_induction_score_per_span"]
  lo, hi = min(spans, key=int), max(spans, key=int)
  sm = sae["metrics"]
  device = m["environment"]["model_stage"]["device"].split(":", 1)[-1]
  return [
    "| | |",
    "|---|---|",
    f"| model | {cfg['num_layers']} layers ({kinds}; sliding window"
    f" {cfg['sliding_window']}), d_model {cfg['embedding_dim']},"
    f" {cfg['num_heads']} query / {cfg['num_kv_heads']} KV heads of size"
    f" {cfg['head_dim']}, MLP {cfg['mlp_hidden_dim']}, QK-norm,"
    f" `query_pre_attn_scalar` {cfg['query_pre_attn_scalar']}, tied embeddings;"
    f" {model['parameters'] / 1e6:.2f} M parameters stored in"
    f" {cfg['parameter_dtype']}; context {model['seq_len']} |",
    f"| tokenizer | SentencePiece BPE, {cfg['vocab_size']} pieces, byte fallback,"
    " Gemma ids pad 0 / eos 1 / bos 2 / unk 3 |",
    f"| corpus | docstrings of the standard library, `pydoc_data` topics and"
    f" {len(corpus['recipe']['wheels'])} pinned PyPI packages"
    f" ({corpus['tokens']['train'] / 1e6:.1f} M training tokens); every 20th"
    " document held out; plus synthetic rows of repeated random spans"
    f" ({model['synthetic_span'][0]}–{model['synthetic_span'][1]} tokens) |",
    f"| training | {training['steps']} AdamW steps of {hp['text_rows']} text +"
    f" {hp['synth_rows']} synthetic rows of {model['seq_len']} tokens,"
    f" {training['seconds']:.0f} s on one {device} |",
    f"| held-out loss | {metrics['heldout_loss']:.2f} nats vs"
    f" {metrics['heldout_unigram_entropy']:.2f} for the best unigram model"
    f" (ratio {metrics['loss_ratio']:.2f}; {metrics['heldout_rows']} rows) |",
    f"| induction | layer {best['layer']} head {best['head']} scores"
    f" {min(spans.values()):.2f}–{max(spans.values()):.2f} on repeated random spans of"
    f" {lo}–{hi} tokens; the repeat costs {metrics['second_repeat_loss']:.3f}"
    f" nats vs {metrics['first_repeat_loss']:.2f} the first time (ratio"
    f" {metrics['second_over_first']:.3f}) |",
    f"| SAE | {sae['width']} latents at `{sae['site']}` of layer {sae['layer']},"
    f" JumpReLU, L0 {sm['l0']:.1f}, explained variance"
    f" {sm['explained_variance']:.2f}, {100 * sm['dead_fraction']:.0f}% dead"
    f" latents ({sm['eval_rows']} held-out rows); splicing it costs"
    f" {100 * sm['splice_ce_increase_over_zero_ablation']:.1f}% of the CE"
    " increase of zero-ablating that site |",
  ]


if __name__ == "__main__":
  print("\n".join(table_rows()))
