"""The table of named sites: `SiteInfo` rows (pure data).

`SITES` holds the sites every Gemma has, `GEMMA4_SITES` those only some
Gemma 4 models have; `gemma_surgery.surgery.sites` resolves them to
selections and documents each.
"""

from __future__ import annotations

import dataclasses

from gemma_surgery.surgery import sites_gemma4

__all__ = ["GEMMA4_SITES", "SITES", "SiteInfo"]


@dataclasses.dataclass(frozen=True)
class SiteInfo:
  """Description of a named site.

  Attributes:
    name: The site name.
    per_layer: Whether the site exists once per block.
    axes: Axis names of the activation besides ``batch``/``seq``.
    transformer_lens: The TransformerLens hook with the same meaning.
    doc: One-line meaning.
  """

  name: str
  per_layer: bool
  axes: tuple[str, ...]
  transformer_lens: str
  doc: str


SITES: dict[str, SiteInfo] = {
  s.name: s
  for s in [
    SiteInfo(
      "embed",
      False,
      ("embedding",),
      "hook_embed",
      "token embeddings times sqrt(d_model)",
    ),
    SiteInfo(
      "resid_pre", True, ("embedding",), "blocks.L.hook_resid_pre", "input of block L"
    ),
    SiteInfo(
      "attn.q",
      True,
      ("heads", "projection"),
      "blocks.L.attn.hook_rot_q",
      "queries after QK-norm and RoPE, before scaling",
    ),
    SiteInfo(
      "attn.k",
      True,
      ("heads", "projection"),
      "blocks.L.attn.hook_rot_k",
      "keys after QK-norm and RoPE (kv heads)",
    ),
    SiteInfo(
      "attn.v",
      True,
      ("heads", "projection"),
      "blocks.L.attn.hook_v",
      "values (kv heads)",
    ),
    SiteInfo(
      "attn.scores",
      True,
      ("heads", "kv_seq"),
      "blocks.L.attn.hook_attn_scores",
      "scaled, soft-capped, masked logits",
    ),
    SiteInfo(
      "attn.pattern",
      True,
      ("heads", "kv_seq"),
      "blocks.L.attn.hook_pattern",
      "softmax attention weights",
    ),
    SiteInfo(
      "attn.z",
      True,
      ("heads", "projection"),
      "blocks.L.attn.hook_z",
      "per-head mixed values, before W_O",
    ),
    SiteInfo(
      "attn.out",
      True,
      ("embedding",),
      "blocks.L.hook_attn_out",
      "attention sublayer output (after post-norm)",
    ),
    SiteInfo(
      "resid_mid",
      True,
      ("embedding",),
      "blocks.L.hook_resid_mid",
      "residual after the attention sublayer",
    ),
    SiteInfo(
      "mlp.in",
      True,
      ("embedding",),
      "blocks.L.ln2.hook_normalized",
      "pre-FFW RMSNorm output",
    ),
    SiteInfo(
      "mlp.in_unscaled",
      True,
      ("embedding",),
      "blocks.L.ln2.hook_normalized (fold_ln)",
      "pre-FFW RMSNorm output without its gain, x / rms(x)",
    ),
    SiteInfo(
      "mlp.hidden", True, ("neurons",), "blocks.L.mlp.hook_post", "gelu_tanh(gate) * up"
    ),
    SiteInfo(
      "mlp.out",
      True,
      ("embedding",),
      "blocks.L.hook_mlp_out",
      "MLP sublayer output (after post-norm)",
    ),
    SiteInfo(
      "resid_post",
      True,
      ("embedding",),
      "blocks.L.hook_resid_post",
      "output of block L",
    ),
    SiteInfo(
      "final_norm",
      False,
      ("embedding",),
      "ln_final.hook_normalized",
      "final RMSNorm output",
    ),
    SiteInfo(
      "logits",
      False,
      ("vocabulary",),
      "(model output)",
      "logits (after any final soft cap)",
    ),
  ]
}

# Sites only some Gemma 4 models have (kept out of `SITES`, the sites every
# Gemma has, so code iterating over `SITES` works on any variant).
GEMMA4_SITES: dict[str, SiteInfo] = {
  name: SiteInfo(name, True, axes, f"HF {module}", doc)
  for name, axes, module, doc in sites_gemma4.ROWS
}
