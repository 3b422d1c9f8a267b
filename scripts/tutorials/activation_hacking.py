"""The "Activation hacking" tutorial: logit lens, neurons, neuron edits, attention."""

from tutorials.common import NEXT_PROBS, SETUP, SETUP_NOTE

CELLS = [
  (
    "md",
    """\
# Activation hacking: reading and editing a model's computation

This tutorial follows one prediction through the model and then changes it:

1. **Look inside** the model (it is an ordinary Penzai model).
2. **Logit lens**: decode the residual stream after every sublayer to see
   *where* the prediction forms.
3. **MLP neurons**: which neurons fire, and which of them actually *matter*
   (activation is not importance, so we test it causally).
4. **Edit a neuron** (deactivate or boost it) and watch the prediction move.
5. **Attention**: where the last token reads its information from.

Every edit is a *pure rewrite*: a function takes the model and returns a new
one with a small layer inserted; the original model is never modified.

"""
    + SETUP_NOTE,
  ),
  ("code", SETUP),
  (
    "md",
    """\
## 1. Look inside

`viz.show` renders the model with treescope: fold and unfold the blocks to see
the embedding, the six transformer blocks (attention and MLP sublayers with
their RMSNorms) and the read-out head. Parameters are named arrays (axes
`embedding`, `heads`, `neurons`, `vocabulary`, ...).""",
  ),
  ("code", "viz.show(model, arrays=False)"),
  (
    "md",
    """\
## 2. One prediction to follow

The embedded model was trained on Python documentation, so we give it Python.
The prompt defines `add`, then starts `sub` with the same signature. A model
that *understands* code would continue `return a` with ` -`; a model that
mostly *copies* what it saw before would continue with ` +`, as in `add`.""",
  ),
  (
    "code",
    """\
if MODEL == "tiny":
  PROMPT = "def add(a, b):\\n    return a + b\\n\\ndef sub(a, b):\\n    return a"
else:  # the published Gemma 3 tutorial's prompt
  PROMPT = "What is the capital of Switzerland? Answer:"
ids = np.array([tok.encode(PROMPT)], np.int32)
pieces = tok.pieces([int(i) for i in ids[0]])
"""
    + NEXT_PROBS
    + """

probs = next_token_probs(model, ids)
PREDICTED = int(np.argmax(probs))
for i in np.argsort(-probs)[:5]:
  print(f"{tok.pieces([int(i)])[0]!r:>12}  p = {probs[i]:.3f}")
out = gs.generate(model, [PROMPT], max_new_tokens=12, tokenizer=tok, eos_id=lm.config.eos_id)
print(repr(PROMPT + out.text[0]))""",
  ),
  (
    "md",
    """\
**What this shows.** The embedded model predicts ` +`: it copies the body of
`add` instead of inferring subtraction from the name `sub`. That is typical of
a small model (and a good case to dissect): the answer must come from
*earlier in the context*, so we expect attention to carry it.""",
  ),
  (
    "md",
    """\
## 3. Logit lens: where does the prediction form?

**What is measured.** The residual stream after the embedding and after every
attention and MLP sublayer, pushed through the model's own read-out head
(final RMSNorm, unembedding) as if the model stopped there. Each cell shows
the top token at that stage and position; hover for the top 10. The colour is
how much that sublayer turned the residual vector (1 − cosine with the
previous stage), so you can see which sublayers did the work.

**Why.** If the final answer appears suddenly at one sublayer, that sublayer
(or the heads/neurons inside it) is where to look next.""",
  ),
  (
    "code",
    """\
lens = an.logit_lens(model, ids, k=10)
viz.logit_lens_table(lens.pieces(tok)[:, 0], lens.top_probs[:, 0], lens.change[:, 0],
                     row_labels=lens.labels, col_tokens=pieces, next_tokens=pieces[1:] + ["?"])""",
  ),
  (
    "code",
    """\
top1 = lens.top_ids[:, 0, -1, 0]       # [stage]: top token at the last position
stable = [s for s in range(len(top1)) if (top1[s:] == PREDICTED).all()]
DECIDED_AT = lens.labels[stable[0]]
print(f"the final prediction {tok.pieces([PREDICTED])[0]!r} is top-1 from stage {DECIDED_AT!r} on")
for s in range(len(top1)):
  print(f"{lens.labels[s]:>7}: {tok.pieces([int(top1[s])])[0]!r:>14}  p = {lens.top_probs[s, 0, -1, 0]:.2f}")""",
  ),
  (
    "md",
    """\
**What this shows.** On the embedded model the last position predicts generic
continuations (` a`, `_`, ...) through the first five blocks, and ` +`
appears abruptly in the **attention sublayer of the last layer** (`attn 5`),
which the MLP after it only sharpens. Attention moves information between
positions, which fits the copying story: the last layer's attention fetches
the token that followed `return a` in `add`. The *induction heads* tutorial
finds the heads that do it.

**On a real Gemma** (the published Gemma 3 1B tutorial, prompt "What is the
capital of Switzerland? Answer:"): in early layers the top token at each
position is just the current token; " Bern" is decided only in the last MLP
layer.""",
  ),
  (
    "md",
    """\
## 4. MLP neurons: which fire?

`top_neurons` captures the top-k `mlp.hidden` activations per token (memory
O(k) per token, so it scales to Gemma's 9216-wide MLPs). The bucket view
draws the MLP's neurons as ranges; a coloured bucket holds one of the token's
strongest neurons (hover for ids and values).""",
  ),
  (
    "code",
    """\
LAYER = lm.config.num_layers - 1   # the last layer, where the answer formed
top = an.top_neurons(model, ids, layers=[LAYER], k=10)
viz.neuron_buckets(pieces, top.ids[0, 0], top.values[0, 0], num_neurons=lm.config.mlp_hidden_dim)""",
  ),
  (
    "md",
    """\
## 5. Which neurons *matter*? Test each one causally

A large activation does not mean a neuron affects the answer. For each of the
ten most active neurons at the last position we **deactivate** it (a rewrite
of `mlp.hidden` that zeroes that neuron; the weights are untouched) and
measure the probability of the predicted token.""",
  ),
  (
    "code",
    """\
base = probs[PREDICTED]
effects = {}
for neuron in top.ids[0, 0, -1]:
  off = gs.interventions.deactivate_neurons(model, LAYER, [int(neuron)])
  effects[int(neuron)] = next_token_probs(off, ids)[PREDICTED] - base
for neuron, change in sorted(effects.items(), key=lambda kv: kv[1])[:5]:
  print(f"neuron {neuron:4d}: p({tok.pieces([PREDICTED])[0]!r}) {base:.3f} -> {base + change:.3f}")
NEURON = min(effects, key=effects.get)""",
  ),
  (
    "code",
    """\
edits = {"original": 1.0, "deactivated": 0.0, "boosted x10": 10.0, "flipped x-10": -10.0}
NEURON_PROBS = {name: next_token_probs(gs.interventions.scale_neurons(model, LAYER, [NEURON], f), ids)[PREDICTED]
                for name, f in edits.items()}
print({name: round(float(p), 3) for name, p in NEURON_PROBS.items()})
an.compare_neuron_edits(model, [PROMPT], LAYER, NEURON, factors=edits, tokenizer=tok,
                        eos_id=lm.config.eos_id, max_new_tokens=12)""",
  ),
  (
    "md",
    """\
**What this shows.** Most of the active neurons barely matter; one stands out.
On the embedded model, deactivating it lowers the probability of ` +` and
boosting it ten-fold raises it close to 1, with the same greedy token: this
neuron *supports* the copied answer but does not decide it alone (the
computation is spread over many neurons and the attention heads). Flipping its
sign pushes the other way, much harder: the probability drops far below the
original and the continuation changes a few tokens later.

**On a real Gemma** (published Gemma 3 1B tutorial): in the last layer, the
top neurons for " Bern" are 1937 and 4422; boosting neuron 1937 makes the
model answer "Switzerland" much more often.""",
  ),
  (
    "md",
    """\
## 6. What does the neuron read and write?

A neuron reads the residual stream through its `gate` and `up` weight columns
and writes through its `down` row. Pushing those directions through the
read-out head shows which tokens they align with (meaningful mostly for late
layers, whose output goes straight to the logits).""",
  ),
  (
    "code",
    """\
proj = an.neuron_tokens(model, LAYER, NEURON, k=8, tokenizer=tok)
{kind: pieces_ for kind, (_, _, pieces_) in proj.top.items()}""",
  ),
  (
    "md",
    """\
## 7. Attention: where does the last token read from?

Click a token to colour the tokens it attends to; choose a layer and head (or
the average). "mask BOS" hides the attention that every head parks on the
first token. Below the view we print, for each head of the last layer, the
token the last position attends to most.""",
  ),
  (
    "code",
    """\
pattern = an.attention_patterns(model, ids)[:, 0]   # [layer, heads, query, key]
for head in range(lm.config.num_heads):
  key = int(np.argmax(pattern[LAYER, head, -1, 1:])) + 1   # skip BOS
  print(f"layer {LAYER} head {head}: last token attends most to position {key} {pieces[key]!r}"
        f" (weight {pattern[LAYER, head, -1, key]:.2f})")
viz.attention_view(pieces, pattern, mask_bos=True, layer=LAYER)""",
  ),
  (
    "md",
    """\
**What this shows.** On the embedded model, heads of the last layer attend
from the final ` a` to the ` +` that followed ` a` in `add`: the token after
the earlier occurrence of the current token. That is exactly the *induction*
pattern, and it explains the logit lens: the answer is copied by attention in
layer 5.""",
  ),
  (
    "md",
    """\
## 8. A patched model is still a Penzai model

Rewrites compose. Here the neuron edit and a capture of the residual stream
are applied on top of each other; treescope shows the inserted layers
(`NeuronScale` and `SaveIntermediate`) where they sit in the
block, and `gs.unpatch` removes them all again.""",
  ),
  (
    "code",
    """\
patched, acts = gs.capture(gs.interventions.deactivate_neurons(model, LAYER, [NEURON]), "resid_post", [LAYER])
gs.jit_forward(patched)(gs.named_tokens(ids))
print("captured", acts["resid_post", LAYER].named_shape)
viz.show(patched.body.sublayers[2 + LAYER], arrays=False)""",
  ),
]
