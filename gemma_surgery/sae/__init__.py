"""Sparse autoencoders and transcoders (Gemma Scope 1 and 2) on Penzai models.

    from gemma_surgery import sae
    repo = "google/gemma-scope-2b-pt-res"
    enc = sae.load_sae(repo, "layer_20/width_16k/average_l0_71")
    spliced, feats = sae.splice_sae(model, enc, use_error_term=True,
                                    capture_features=True)

Modules: `autoencoders` (`JumpReLU`, `AutoEncoder`, `Transcoder`), `files` and
`load` (reading Gemma Scope files; `files.save_gemma_scope_2` writes one),
`hookpoints` (which site an SAE reads),
`edits` (clamp/ablate/scale latents), `splice` (model rewrites), `shard`,
`train` (`train_jumprelu_sae`, Gemma Scope's JumpReLU recipe), `clt` and
`clt_files` (cross-layer transcoders and per-layer transcoder sets, Gemma
Scope 2 layouts: `load_clt`, `load_transcoders`), `splice_clt` (a CLT or
transcoder set spliced into every MLP, with or without the error term).
"""

from gemma_surgery.sae import features, metrics
from gemma_surgery.sae.autoencoders import AutoEncoder, JumpReLU, SAEInfo, Transcoder
from gemma_surgery.sae.clt import CLTInfo, CrossLayerTranscoder, TranscoderSet
from gemma_surgery.sae.clt_files import (
  load_clt,
  load_transcoders,
  save_clt_gemma_scope_2,
)
from gemma_surgery.sae.edits import FeatureEdits, feature_edits
from gemma_surgery.sae.evaluate import evaluate
from gemma_surgery.sae.features import (
  Example,
  feature_activations,
  feature_direction,
  feature_logit_lens,
  max_activating_examples,
  neuronpedia_iframe,
  neuronpedia_url,
  steer_with_feature,
  top_features,
)
from gemma_surgery.sae.files import save_gemma_scope_2
from gemma_surgery.sae.load import load_sae
from gemma_surgery.sae.shard import shard_sae
from gemma_surgery.sae.splice import (
  FEATURES_SITE,
  SpliceSAE,
  TranscoderInput,
  TranscoderOutput,
  set_edits,
  splice_sae,
)
from gemma_surgery.sae.splice_clt import CLTDecode, CLTEncode, splice_clt
from gemma_surgery.sae.train import train_jumprelu_sae

__all__ = [
  "CLTDecode",
  "CLTEncode",
  "splice_clt",
  "CLTInfo",
  "CrossLayerTranscoder",
  "TranscoderSet",
  "load_clt",
  "load_transcoders",
  "save_clt_gemma_scope_2",
  "FEATURES_SITE",
  "Example",
  "evaluate",
  "feature_activations",
  "feature_direction",
  "feature_logit_lens",
  "features",
  "max_activating_examples",
  "metrics",
  "neuronpedia_iframe",
  "neuronpedia_url",
  "steer_with_feature",
  "top_features",
  "AutoEncoder",
  "FeatureEdits",
  "JumpReLU",
  "SAEInfo",
  "SpliceSAE",
  "Transcoder",
  "TranscoderInput",
  "TranscoderOutput",
  "feature_edits",
  "load_sae",
  "set_edits",
  "shard_sae",
  "splice_sae",
  "save_gemma_scope_2",
  "train_jumprelu_sae",
]
