"""Cells shared by every tutorial."""

SETUP = """\
import numpy as np
import gemma_surgery as gs
from gemma_surgery import analysis as an, viz

MODEL = "tiny"  # or e.g. "gemma3_1b", "hf:google/gemma-2-2b", a local checkpoint folder
lm = gs.load(MODEL, dtype="float32" if MODEL == "tiny" else "bfloat16")
model, tok = lm.model, lm.tokenizer
print(lm.config.family, lm.config.num_layers, "layers,", f"{lm.config.num_parameters():,} parameters")"""

SETUP_NOTE = """\
**Which model?** `MODEL = "tiny"` is the embedded model that ships with the
package: a 6-layer model with the Gemma 3 architecture (the cell below prints its size),
trained by this project on Python documentation (see the README's "Embedded
default model"). It runs offline on a laptop CPU in seconds, so every result
below is computed live. Set `MODEL` to a real Gemma checkpoint to run the same
cells on it; the notes marked **On a real Gemma** say what the published
tutorials found there (not run in this notebook)."""

NEXT_PROBS = """\
def next_token_probs(m, ids):
  \"\"\"Softmax of the last position's logits of `m` (any patched model too).\"\"\"
  logits = gs.jit_forward(m)(gs.named_tokens(ids)).unwrap("batch", "seq", "vocabulary")
  z = np.asarray(logits[0, -1], np.float64)
  p = np.exp(z - z.max())
  return p / p.sum()"""
