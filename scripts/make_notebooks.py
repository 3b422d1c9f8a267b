"""Writes the tutorial notebooks in ``notebooks/`` (run: python scripts/make_notebooks.py).

Each notebook runs offline on the embedded model by default; set ``MODEL`` (and
``SAE``) in its first code cell to a real Gemma checkpoint and Gemma Scope SAE
to run the same analyses on them. ``tests/test_notebooks.py`` executes them.
"""

from __future__ import annotations

import pathlib

import nbformat

OUT = pathlib.Path(__file__).resolve().parents[1] / "notebooks"

SETUP = """\
import numpy as np
import gemma_surgery as gs
from gemma_surgery import analysis as an, viz

MODEL = "tiny"  # e.g. "gemma2_2b", "hf:google/gemma-2-2b" or a local checkpoint folder
lm = gs.load(MODEL, dtype="float32" if MODEL == "tiny" else "bfloat16")
model, tok = lm.model, lm.tokenizer
lm.config.family, lm.config.num_layers, lm.config.embedding_dim"""

ACTIVATION_HACKING = [
  (
    "md",
    "# Activation hacking\n\nThe residual-stream logit lens, top MLP neurons,"
    " deactivating and boosting a neuron, projecting a neuron onto tokens, and"
    " the attention view — each one call on a Penzai model. Runs offline on"
    " the embedded model; set `MODEL` to a real Gemma to repeat it there.",
  ),
  ("code", SETUP),
  (
    "code",
    'prompt = "Return the number of items in the list."\n'
    "out = gs.generate(model, [prompt], max_new_tokens=24, tokenizer=tok,"
    " eos_id=lm.config.eos_id)\nprint(prompt + out.text[0])",
  ),
  (
    "md",
    "## Logit lens\nThe residual stream after the embedding and every sublayer, decoded by the model's own head; colour = how much each sublayer turned it (1 − cos).",
  ),
  (
    "code",
    "lens = an.logit_lens(model, prompt, tokenizer=tok, k=10)\n"
    "ids = lens.tokens[0]\npieces = tok.pieces([int(i) for i in ids])\n"
    "viz.logit_lens_table(lens.pieces(tok)[:, 0], lens.top_probs[:, 0], lens.change[:, 0],\n"
    "                     row_labels=lens.labels, col_tokens=pieces, next_tokens=pieces[1:] + ['?'])",
  ),
  (
    "md",
    "## MLP neurons\nThe most active neurons per token in a middle layer, one neuron across the prompt, and the tokens its weights point to.",
  ),
  (
    "code",
    "layer = lm.config.num_layers // 2\n"
    "top = an.top_neurons(model, prompt, layers=[layer], k=8, tokenizer=tok)\n"
    "viz.neuron_buckets(pieces, top.ids[0, 0], top.values[0, 0], num_neurons=lm.config.mlp_hidden_dim)",
  ),
  (
    "code",
    "neuron = int(top.ids[0, 0, np.argmax(top.values[0, 0, :, 0]), 0])\n"
    "proj = an.neuron_tokens(model, layer, neuron, k=8, tokenizer=tok)\n"
    "{kind: pieces_ for kind, (_, _, pieces_) in proj.top.items()}",
  ),
  (
    "md",
    "## Deactivate or boost the neuron\nA rewrite of `mlp.hidden` (no weights are mutated); the generations differ only through it.",
  ),
  (
    "code",
    "an.compare_neuron_edits(model, [prompt], layer, neuron, tokenizer=tok,"
    " eos_id=lm.config.eos_id, max_new_tokens=16)",
  ),
  (
    "md",
    "## Attention\nClick a token to see what it attends to; pick a layer and a head, or the average.",
  ),
  (
    "code",
    "pattern = an.attention_patterns(model, prompt, tokenizer=tok)[:, 0]\n"
    "viz.attention_view(pieces, pattern, mask_bos=True)",
  ),
  (
    "md",
    "## The model itself\nA patched model is still a Penzai model: treescope shows where the surgery layers sit.",
  ),
  (
    "code",
    "patched, acts = gs.capture(gs.interventions.deactivate_neurons(model, layer, [neuron]), 'resid_post', [layer])\n"
    "viz.show(patched.body.sublayers[2 + layer], arrays=False)",
  ),
]

GEMMA_SCOPE = [
  (
    "md",
    "# Gemma Scope in Penzai\n\nLoad an SAE, check its L0 and reconstruction,"
    " find the top features per token, read one feature across texts, steer"
    " generation with it. Offline on the embedded model and its SAE; set"
    ' `MODEL` and `SAE` to e.g. `"gemma2_2b"` and `("google/gemma-scope-2b-pt-res",'
    ' "layer_20/width_16k/average_l0_71")` for the real thing.',
  ),
  (
    "code",
    SETUP
    + '\n\nSAE = ("tiny", None)  # (repo or folder, path inside it)\nsae = gs.sae.load_sae(*SAE)\nsae.info',
  ),
  (
    "md",
    "## Splice it in and measure\nWith the error term the model's outputs are unchanged while features are captured.",
  ),
  (
    "code",
    "texts = [\n"
    '  "Return a new list containing all items from the iterable in ascending order.",\n'
    '  "Open the file and return a stream. Raise OSError upon failure.",\n'
    '  "The default encoding is platform dependent, but any text encoding can be passed.",\n'
    "]\n"
    "ids = [tok.encode(t) for t in texts]\nwidth = min(map(len, ids))\n"
    "batch = np.array([row[:width] for row in ids], np.int32)\n"
    "spliced, feats = gs.sae.splice_sae(model, sae, use_error_term=True, capture_features=True)\n"
    "captured, acts = gs.capture(spliced, sae.info.site, [sae.info.layer])\n"
    "gs.jit_forward(captured)(gs.named_tokens(batch))\n"
    "x = acts[sae.info.site, sae.info.layer]\nf = feats.value()\n"
    "x_hat = sae.decode(f)\n"
    "gs.sae.metrics.summarize(x, x_hat, f, gs.sae.metrics.token_mask(batch))",
  ),
  ("md", "## Top features per token"),
  (
    "code",
    "acts_np = np.asarray(f.unwrap('batch', 'seq', 'latents'))[0]\n"
    "order = np.argsort(-acts_np, axis=-1)[:, :5]\n"
    "pieces = tok.pieces([int(i) for i in batch[0]])\n"
    "viz.feature_strip(pieces, order, np.take_along_axis(acts_np, order, -1))",
  ),
  ("md", '## One feature across texts ("headlines")'),
  (
    "code",
    "all_acts = np.asarray(f.unwrap('batch', 'seq', 'latents'))\n"
    "feature = int(np.argmax(all_acts[:, 1:].max(axis=(0, 1))))\n"
    "viz.feature_texts([tok.pieces([int(i) for i in row]) for row in batch], all_acts[..., feature],\n"
    "                  labels=[f'text {i}' for i in range(len(batch))], title=f'feature {feature}')",
  ),
  ("md", "## Steer with the feature's decoder direction"),
  (
    "code",
    "direction = sae.w_dec.value[{'latents': feature}].astype(np.float32)\n"
    "steered = gs.steer(model, sae.info.site, sae.info.layer, direction, 4.0 * float(np.abs(all_acts[..., feature]).max()))\n"
    "for name, m in [('original', model), ('steered', steered)]:\n"
    "  out = gs.generate(m, ['The function'], max_new_tokens=16, tokenizer=tok, eos_id=lm.config.eos_id)\n"
    "  print(f'{name:>9}:', out.text[0])",
  ),
  (
    "md",
    "## Neuronpedia\nGemma Scope SAEs know their Neuronpedia id (the embedded SAE has none).",
  ),
  (
    "code",
    "if sae.info.neuronpedia:\n"
    "  from IPython.display import IFrame\n"
    "  url = f'https://www.neuronpedia.org/{sae.info.neuronpedia}/{feature}?embed=true'\n"
    "  display(IFrame(url, width=1200, height=600))\n"
    "else:\n"
    "  print('No Neuronpedia dashboard for', sae.info.source)",
  ),
]

INDUCTION = [
  (
    "md",
    "# Induction heads\n\nFind heads that complete repeated sequences, score"
    " them with named axes, knock them out and rescale their attention, and"
    " patch activations between a clean and a corrupted prompt.",
  ),
  ("code", SETUP),
  ("md", "## Induction scores on repeated random tokens"),
  (
    "code",
    "# draws the tokenizer's ordinary pieces (no control or byte pieces)\n"
    "ind = an.induction_scores(model, length=24, batch=4, tokenizer=tok)\n"
    "print(f'loss: first repeat {ind.loss_first:.2f}, second repeat {ind.loss_second:.2f}')\n"
    "print('best heads (layer, head, score):', ind.best_heads(3))\n"
    "viz.heatmap(ind.scores, row_labels=list(range(lm.config.num_layers)),\n"
    "            col_labels=list(range(lm.config.num_heads)), col_title='head',\n"
    "            value_label='induction score', center=None, vmin=0, vmax=1)",
  ),
  (
    "code",
    "pattern = an.attention_patterns(model, ind.tokens[:1])[:, 0]\n"
    "viz.attention_view(tok.pieces([int(i) for i in ind.tokens[0]]), pattern,\n"
    "                   layer=ind.best_heads(1)[0][0], head=ind.best_heads(1)[0][1])",
  ),
  ("md", "## Other head detectors"),
  (
    "code",
    "full = an.attention_patterns(model, ind.tokens)\n"
    "{'previous-token': an.previous_token_scores(full, ind.tokens).round(2),\n"
    " 'duplicate-token': an.duplicate_token_scores(full, ind.tokens).round(2)}",
  ),
  ("md", "## Knock the best heads out, or rescale their attention"),
  (
    "code",
    "best = [(layer, head) for layer, head, _ in ind.best_heads(2)]\n"
    "print(an.knockout_losses(model, best, ind.tokens, ind.length))\n"
    "layer, head = best[0]\n"
    "from penzai import pz\n"
    "factors = np.ones(lm.config.num_heads, np.float32); factors[head] = 0.0\n"
    "damped = gs.interventions.rescale_pattern(model, layer, pz.nx.wrap(factors).tag('heads'))\n"
    "print('second-repeat loss with the head rescaled to 0:',\n"
    "      an.attention.repeat_losses(an.token_losses(damped, ind.tokens), ind.length)[1])",
  ),
  (
    "md",
    "## Activation patching\nClean: a random sequence, then its first half again; corrupted: the token to copy replaced in the first occurrence.",
  ),
  (
    "code",
    "from gemma_surgery.tour import induction_patching_prompts\n"
    "clean, corrupt, correct, wrong = induction_patching_prompts(lm.config.vocab_size, bos_id=lm.config.bos_id, tokenizer=tok)\n"
    "sweep = an.patching_sweep(model, clean, corrupt, an.logit_difference(correct, wrong), site='attn.z', by='head')\n"
    "viz.heatmap(sweep.normalized, row_labels=sweep.layers, col_labels=list(range(lm.config.num_heads)),\n"
    "            col_title='head', value_label='restored')",
  ),
]

TRACING = [
  (
    "md",
    "# Tracing a circuit\n\nAn attribution graph on the induction prompt: the"
    " MLPs replaced by the embedded model's transcoders (plus error nodes),"
    " attention and norms frozen, every edge a direct linear effect. From the"
    " repeated token's features to the copied logit, then an intervention in"
    " the real model to check the graph's prediction.",
  ),
  ("code", SETUP),
  (
    "code",
    "tcs = gs.sae.load_transcoders('tiny')  # or gs.sae.load_clt('tiny')\n"
    "rng = np.random.default_rng(0)\n"
    "span = rng.integers(262, lm.config.vocab_size, 8).tolist()\n"
    "ids = [lm.config.bos_id] + span + span[:4]   # ... the model should copy span[4]\n"
    "tokens = gs.named_tokens([ids])\n"
    "graph = gs.circuits.attribute(model, tcs, tokens, progress=False)\n"
    "print(graph.n_features, 'active features;', 'top logits:', tok.pieces(graph.logit_ids.tolist())[:3],"
    " 'expected:', tok.pieces([span[4]]))",
  ),
  (
    "md",
    "## Prune by influence and view the graph (offline HTML; the JSON is Neuronpedia's format)",
  ),
  (
    "code",
    "pruned = gs.circuits.prune(graph, node_threshold=0.8, edge_threshold=0.98)\n"
    "data = gs.circuits.graph_json(graph, pruned, tokenizer=tok, slug='induction')\n"
    "print(len(data['nodes']), 'nodes,', len(data['links']), 'links kept')\n"
    "viz.graph_view(data)",
  ),
  ("md", "## Which positions feed the copied logit?"),
  (
    "code",
    "target = int(graph.logit_ids[0])\n"
    "row = graph.adjacency[graph.logit_node(target)]\n"
    "by_pos = np.zeros(graph.n_pos)\n"
    "for node in np.flatnonzero(row):\n"
    "    by_pos[graph.describe(int(node))[2]] += row[node]\n"
    "viz.heatmap(by_pos[None], row_labels=['direct effect'], col_labels=tok.pieces(ids))",
  ),
  ("md", "## Ablate the top features in the real model"),
  (
    "code",
    "nodes = gs.circuits.top_feature_nodes(graph, target, k=5)\n"
    "res = gs.circuits.intervene(model, tcs, tokens, graph, nodes, target, scale=0.0)\n"
    "print(f'predicted {res.predicted:+.3f} (direct {res.predicted_direct:+.3f}), real {res.real:+.3f}')",
  ),
]


def build(cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
  nb = nbformat.v4.new_notebook()
  nb.metadata["kernelspec"] = {
    "name": "python3",
    "display_name": "Python 3",
    "language": "python",
  }
  for kind, source in cells:
    make = nbformat.v4.new_markdown_cell if kind == "md" else nbformat.v4.new_code_cell
    nb.cells.append(make(source))
  return nb


NOTEBOOKS = {
  "activation_hacking.ipynb": ACTIVATION_HACKING,
  "gemma_scope.ipynb": GEMMA_SCOPE,
  "induction_heads.ipynb": INDUCTION,
  "tracing_a_circuit.ipynb": TRACING,
}


def main() -> None:
  OUT.mkdir(exist_ok=True)
  for name, cells in NOTEBOOKS.items():
    nbformat.write(build(cells), OUT / name)
    print("wrote", OUT / name)


if __name__ == "__main__":
  main()
