"""The "Gemma Scope in Penzai" tutorial: an SAE's quality, features, steering."""

from tutorials.common import SETUP, SETUP_NOTE

CELLS = [
  (
    "md",
    """\
# Sparse autoencoders (Gemma Scope) in Penzai

A sparse autoencoder (SAE) rewrites an activation `x` as a sparse sum of
learned directions ("features") that are often easier to interpret than
single neurons. Gemma Scope SAEs are **JumpReLU** SAEs:

    f(x) = JumpReLU_θ(x · W_enc + b_enc)      (z if z > θ, else 0, per latent)
    x̂(f) = f · W_dec + b_dec

This tutorial loads an SAE, checks that it is a good one, finds what a feature
means from the texts it fires on, and steers generation with it.

"""
    + SETUP_NOTE
    + """

The embedded SAE reads `resid_post` of layer 2 (1024 latents, Gemma Scope 2
layout). **On a real Gemma** the published tutorial uses Gemma 2 2B with
`google/gemma-scope-2b-pt-res`, `layer_20/width_16k/average_l0_71`.""",
  ),
  (
    "code",
    SETUP
    + """

SAE = ("tiny", None)  # e.g. ("google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71")
sae = gs.sae.load_sae(*SAE)
sae.info""",
  ),
  (
    "md",
    """\
## 1. Is it a good SAE? Measure it on held-out text

**What is measured** (`gs.sae.evaluate`, over every non-special token after
the first position of a corpus):

* **L0**: how many latents are active per token (sparsity).
* **Explained variance**: 1 − residual variance / activation variance
  (1 = perfect reconstruction).
* **Dead fraction**: latents that never fire on the corpus (wasted capacity).
* **CE loss recovered**: splice the reconstruction into the model and compare
  its next-token loss with the clean model (1) and with zero-ablating the site
  (0). This is what matters for analysis: does the model still work when it
  only sees what the SAE captured?

The corpus is the embedded model's held-out documents, packed into rows of 64
tokens (for a real Gemma, use any text you care about).""",
  ),
  (
    "code",
    """\
docs = gs.assets.heldout_texts()
rows = gs.assets.pack_documents([tok.encode(d, add_bos=False) for d in docs], 64)[:128]
batches = [rows[i:i + 32] for i in range(0, len(rows), 32)]
metrics = gs.sae.evaluate(model, sae, batches)
for name in ["l0", "explained_variance", "dead_fraction", "ce_loss_recovered", "num_tokens"]:
  print(f"{name:>20}: {float(getattr(metrics, name)):.3f}")""",
  ),
  (
    "md",
    """\
**What this shows.** On the embedded SAE roughly 50–60 of the 1024 latents
fire per token, the reconstruction explains well over 80% of the variance,
almost no latent is dead, and splicing the reconstruction in keeps most of the
model's performance (CE loss recovered close to 1). **On a real Gemma**: the
published Gemma 2 2B tutorial counts L0 ≈ 70 (activations > 1) at layer 20,
after excluding the BOS token, whose residual norm is huge ("massive
activations") and which SAEs were not trained on.""",
  ),
  (
    "md",
    """\
## 2. Splice it in: with the error term, nothing changes

`splice_sae(..., use_error_term=True)` inserts the SAE at its site and adds
back the reconstruction error, so downstream the model computes the clean
model's function while the features are captured (and feature edits still
propagate). The logits agree to float32 rounding (the spliced model is a
different compiled program, so XLA may order a few additions differently).
Without the error term the model runs on the reconstruction alone.""",
  ),
  (
    "code",
    """\
text = "Return a new list containing all items from the iterable in ascending order."
ids = np.array([tok.encode(text)], np.int32)
clean = gs.jit_forward(model)(gs.named_tokens(ids)).unwrap("batch", "seq", "vocabulary")
exact, feats = gs.sae.splice_sae(model, sae, use_error_term=True, capture_features=True)
spliced = gs.jit_forward(exact)(gs.named_tokens(ids)).unwrap("batch", "seq", "vocabulary")
SPLICE_DIFF = float(np.abs(np.asarray(spliced) - np.asarray(clean)).max())
print("max |logits(spliced with error term) - logits(clean)| =", SPLICE_DIFF)
print("features captured:", feats.value().named_shape)""",
  ),
  (
    "md",
    """\
## 3. Features per token

Each token coloured by its strongest feature (its id below the token); hover
for the five strongest with their activations. BOS has no features (the
splice passes it through).""",
  ),
  (
    "code",
    """\
fid, fval = gs.sae.top_features(model, sae, ids, k=5)
viz.feature_strip(tok.pieces([int(i) for i in ids[0]]), fid[0], fval[0])""",
  ),
  (
    "md",
    """\
## 4. What does a feature mean? Its max-activating examples

The standard first look at a feature: scan a corpus and keep the contexts
where it fires most (`max_activating_examples` keeps a running top-n per
feature, one jitted forward per batch). If the peaks share a token or a
theme, the feature is *coherent*. We take feature 989 of the embedded SAE
(for a real Gemma 2 2B SAE try 10004, "time travel") and count the peak
tokens of its ten best examples.""",
  ),
  (
    "code",
    """\
FEATURE = 989 if MODEL == "tiny" else 10004
examples = gs.sae.max_activating_examples(model, sae, batches, [FEATURE], n=10)[FEATURE]
PEAKS = [tok.pieces([e.context[e.index]])[0] for e in examples]
print("peak tokens:", PEAKS)
viz.max_activating_examples([tok.pieces(e.context) for e in examples],
                            [e.activations for e in examples], title=f"feature {FEATURE}")""",
  ),
  (
    "md",
    """\
**What this shows.** On the embedded SAE, all ten top examples of feature 989
peak on the word ` command` (in distutils' documentation: "each command
object", "a command class", ...): a clean single-token feature. Many features
of this SAE are like that; the tour (`gemma-surgery tour --sae tiny`) shows
the max-activating examples of its prompt's strongest features and counts
how often each peaks on its most common token.""",
  ),
  (
    "md",
    """\
## 5. What does a feature *write*? The decoder logit lens, then steering

Where a feature fires says what it *reads*; its decoder row says what it
*writes*. Read through the model's unembedding (`feature_logit_lens`) the row
shows which next tokens it promotes. Feature 348 fires on words that precede
a noun (` every`, ` custom`, ` any`, ` arbitrary`) and its row promotes nouns
such as ` input` and ` data`.

`steer_with_feature` adds `scale · W_dec[feature]` to the SAE's site during
generation (a `SteerIntermediate` layer; changing the scale never
recompiles). We steer only the **prompt** positions: steering every generated
token too with a large scale collapses small models into repeating the
feature's word. Scale is in activation units (this feature's peak is about
0.5).""",
  ),
  (
    "code",
    """\
STEER_FEATURE = 348 if MODEL == "tiny" else 3124
LENS = gs.sae.feature_logit_lens(model, sae, STEER_FEATURE, k=8, tokenizer=tok)
print("tokens the decoder row promotes:", LENS["top"][2])
prompts = ["The function", "Open the file and"]
STEERED_TEXT = {}
for scale in [0.0, 2.0]:
  m = gs.sae.steer_with_feature(model, sae, STEER_FEATURE, scale, positions="prompt")
  out = gs.generate(m, prompts, max_new_tokens=16, tokenizer=tok, eos_id=lm.config.eos_id)
  STEERED_TEXT[scale] = out.text
  for p, t in zip(prompts, out.text):
    print(f"scale {scale:3.1f}: {p + t!r}")""",
  ),
  (
    "md",
    """\
**What this shows.** Without steering the model continues with generic
docstring text; with the feature added to the prompt the continuation follows
the decoder row (on the embedded model, ` input` appears right after "The
function"). **On a real Gemma** (published Gemma 2 2B tutorial): adding
decoder row 3124 (a San Francisco feature) × 154 after block 20 turns "The
most iconic structure on Earth is" from the pyramids of Giza to the Golden
Gate Bridge.""",
  ),
  (
    "md",
    """\
## 6. Neuronpedia

Gemma Scope SAEs have dashboards on Neuronpedia (the embedded SAE has none).
`neuronpedia_iframe` embeds one in the notebook when you are online.""",
  ),
  (
    "code",
    """\
if sae.info.neuronpedia:
  display(gs.sae.neuronpedia_iframe(sae, FEATURE))
else:
  print("No Neuronpedia dashboard for", sae.info.source)""",
  ),
]
