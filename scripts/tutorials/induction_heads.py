"""The "Induction heads" tutorial: detect, knock out, rescale and patch heads."""

from tutorials.common import SETUP, SETUP_NOTE

CELLS = [
  (
    "md",
    """\
# Induction heads

An **induction head** completes patterns: having seen `… A B …`, when `A`
appears again it attends to the token *after* the earlier `A` and copies `B`.
It is the best understood circuit in transformers (Olsson et al., 2022) and
the mechanism behind much of in-context learning. It needs two heads
composing: a *previous-token head* writes "the token before me was A" into
each position, and the induction head's query (`A`) matches that key.

This tutorial finds the induction heads of a model, checks that they cause
the behaviour (knockouts, rescaled attention) and localises the computation
with activation patching.

"""
    + SETUP_NOTE,
  ),
  ("code", SETUP),
  (
    "md",
    """\
## 1. The behaviour: repeated random tokens

**What is measured.** Sequences `[BOS, r, r]` where `r` is `L` random tokens
(from the tokenizer's ordinary pieces) repeated once. The first copy is
unpredictable: the loss there is about the log of the vocabulary size. The
second copy is perfectly predictable *if* the model can look back and copy.
So the second-repeat loss measures in-context copying, free of any knowledge
the model memorised.""",
  ),
  (
    "code",
    """\
ind = an.induction_scores(model, length=24, batch=4, tokenizer=tok)
print(f"loss on the first repeat {ind.loss_first:.2f} nats, on the second {ind.loss_second:.3f} nats")
print(f"(a uniform guess over the vocabulary costs {np.log(lm.config.vocab_size):.2f} nats)")""",
  ),
  (
    "md",
    """\
**What this shows.** On the embedded model the first copy costs about as
much as guessing, and the second almost nothing: it copies nearly perfectly.

## 2. Which heads do it? Induction scores

**What is measured.** For every head, the mean attention weight from each
token of the second copy to the token *after* its earlier occurrence (the
position an induction head should attend to). A score near 1 means the head
does nothing but induction on this input.""",
  ),
  (
    "code",
    """\
print("best heads (layer, head, score):", [(l, h, round(s, 2)) for l, h, s in ind.best_heads(3)])
viz.heatmap(ind.scores, row_labels=list(range(lm.config.num_layers)),
            col_labels=list(range(lm.config.num_heads)), col_title="head",
            value_label="induction score", center=None, vmin=0, vmax=1)""",
  ),
  (
    "md",
    """\
The attention view of the best head on one sequence shows the signature: a
diagonal stripe offset by `L − 1` tokens (each query attends to the key just
after its earlier copy).""",
  ),
  (
    "code",
    """\
(BEST_LAYER, BEST_HEAD, _), = ind.best_heads(1)
pattern = an.attention_patterns(model, ind.tokens[:1])[:, 0]
viz.attention_view(tok.pieces([int(i) for i in ind.tokens[0]]), pattern,
                   layer=BEST_LAYER, head=BEST_HEAD)""",
  ),
  (
    "md",
    """\
## 3. Its partner: previous-token heads

The induction head can only find "the token after the earlier A" if an
earlier layer has written into each position which token preceded it. The
previous-token score is the mean attention of each token on the token right
before it.""",
  ),
  (
    "code",
    """\
full = an.attention_patterns(model, ind.tokens)
prev = an.previous_token_scores(full, ind.tokens)
PREV_LAYER, PREV_HEAD = np.unravel_index(np.argmax(prev[:BEST_LAYER]), prev[:BEST_LAYER].shape)
print(f"strongest previous-token head before layer {BEST_LAYER}: layer {PREV_LAYER} head {PREV_HEAD}"
      f" (score {prev[PREV_LAYER, PREV_HEAD]:.2f})")
viz.heatmap(prev, row_labels=list(range(lm.config.num_layers)),
            col_labels=list(range(lm.config.num_heads)), col_title="head",
            value_label="previous-token score", center=None, vmin=0, vmax=1)""",
  ),
  (
    "md",
    """\
**What this shows.** On the embedded model the induction heads sit in the
last layer, and an earlier layer has a strong previous-token head: a
candidate for the first half of the circuit (section 4 tests it).

**On a real Gemma**: the Penzai "Induction heads in Gemma" tutorial finds
induction heads in Gemma 7B and 2B at different layers; run this notebook
with `MODEL = "gemma2_2b"` to see them.

## 4. Do they *cause* the behaviour? Knock them out

Scores show correlation. To test causation, **knock out** the two best heads
(all their attention moved to BOS, so they copy nothing) and measure the
second-repeat loss again.""",
  ),
  (
    "code",
    """\
best = [(layer, head) for layer, head, _ in ind.best_heads(2)]
KNOCKOUT = an.knockout_losses(model, best, ind.tokens, ind.length)
print(f"second-repeat loss: {KNOCKOUT['clean']:.3f} -> {KNOCKOUT['knocked_out']:.2f} nats with {best} knocked out")
# one head at a time, in every layer
SINGLE = np.array([[an.knockout_losses(model, [(layer, head)], ind.tokens, ind.length)["knocked_out"]
                    for head in range(lm.config.num_heads)] for layer in range(lm.config.num_layers)])
print("one head knocked out:", {f"L{l}H{h}": round(float(SINGLE[l, h]), 2) for l, h in best + [(PREV_LAYER, PREV_HEAD)]})
viz.heatmap(SINGLE, row_labels=list(range(lm.config.num_layers)), col_labels=list(range(lm.config.num_heads)),
            col_title="head", value_label="second-repeat loss, head knocked out", center=None, vmin=0)""",
  ),
  (
    "md",
    """\
**What this shows.** Without the two induction heads the second copy costs
as much as the first: the copying is gone. The single-head scan refines the
picture, and it is worth reading closely:

* Each induction head is necessary on its own: knocking out either one
  destroys most of the copying. They are not redundant copies of each other.
* Most heads are harmless to remove, but a few heads with near-zero induction
  scores matter too (on the embedded model, another head of the last layer and
  heads of layers 0 and 4). They play some other part in the circuit, or
  moving their attention to BOS is itself disruptive.
* Knocking out the strongest previous-token head barely hurts: the "previous
  token" information must also reach the induction heads another way (a
  question for path patching).

Scores find candidates; only interventions establish roles.

A gentler edit than a knockout scales a head's attention weights
(`rescale_pattern`, a rewrite of `attn.pattern`): the loss rises smoothly as
the induction heads' attention is damped.""",
  ),
  (
    "code",
    """\
from penzai import pz

RESCALED = {}
for factor in [1.0, 0.5, 0.25, 0.0]:
  factors = np.ones(lm.config.num_heads, np.float32)
  factors[[h for l, h in best if l == BEST_LAYER]] = factor
  damped = gs.interventions.rescale_pattern(model, BEST_LAYER, pz.nx.wrap(factors).tag("heads"))
  RESCALED[factor] = an.repeat_losses(an.token_losses(damped, ind.tokens), ind.length)[1]
  print(f"best heads' attention x {factor:4.2f}: second-repeat loss {RESCALED[factor]:.3f}")""",
  ),
  (
    "md",
    """\
## 5. Where does the information flow? Activation patching

**What is measured.** A *clean* prompt, a random sequence followed by the
start of its repeat, predicts the next token of the repeat. A *corrupted*
prompt changes that token in the first copy, so the model can no longer copy
the right answer. We run the corrupted prompt and **patch in** the clean
activation at one site (layer × position, or layer × head) at a time, and ask
how much of the clean logit difference (correct − corrupted answer) comes
back: 1 = fully restored, 0 = no effect. All patches of a sweep run as one
batched, jitted computation.""",
  ),
  (
    "code",
    """\
length = 12
pool = an.token_pool(lm.config.vocab_size, tokenizer=tok)
rows = an.repeated_tokens(lm.config.vocab_size, length, batch=2, seed=1, pool=pool, bos_id=lm.config.bos_id)
clean = rows[:1, : 1 + length + length // 2].copy()   # BOS, r (12 tokens), first half of r again
corrupt = clean.copy()
source = 1 + length // 2                    # the answer's position in the first copy
corrupt[0, source] = next(t for t in rows[1] if t not in rows[0])  # a token from elsewhere
correct, wrong = int(clean[0, source]), int(corrupt[0, source])
metric = an.logit_difference(correct, wrong)
pieces = tok.pieces([int(i) for i in clean[0]])
by_position = an.patching_sweep(model, clean, corrupt, metric, site="resid_post", by="position")
print(f"restored at the answer's first-copy position after block 0: {by_position.normalized[0, source]:.2f};"
      f" at the final position after the last block: {by_position.normalized[-1, -1]:.2f}")
viz.heatmap(by_position.normalized, row_labels=by_position.layers, col_labels=pieces,
            row_title="layer", col_title="position", value_label="restored")""",
  ),
  (
    "code",
    """\
by_head = an.patching_sweep(model, clean, corrupt, metric, site="attn.z", by="head")
BEST_PATCHED_HEAD = np.unravel_index(np.argmax(by_head.normalized), by_head.normalized.shape)
print("head whose clean output restores the most (layer, head):",
      tuple(int(i) for i in BEST_PATCHED_HEAD), f"{by_head.normalized.max():.2f}")
viz.heatmap(by_head.normalized, row_labels=by_head.layers, col_labels=list(range(lm.config.num_heads)),
            col_title="head", value_label="restored")""",
  ),
  (
    "md",
    """\
**What this shows.** Reading the residual-stream sweep (the output of each
block) from top to bottom: after the early blocks only the corrupted position
itself (in the first copy) restores the answer; after the last block the
information has moved to the final position. The move happens inside the
last layer's attention, and the head sweep names the head that carries most
of it: the best induction head found by the scores in section 2. Three
methods (scores, knockouts, patching) agree.""",
  ),
]
