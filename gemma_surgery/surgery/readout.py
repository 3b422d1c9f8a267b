"""The model's read-out head: final norm, unembedding and final soft cap.

Applying the head to an intermediate residual vector is premature decoding
(the logit lens); applying it to a weight direction (a neuron's output
weights, an SAE decoder row) shows which tokens that direction promotes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from gemma_surgery import errors
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery.layers.base import SurgeryLayer
from gemma_surgery.tokenizer import as_tokenizer


def readout_head(model: Any) -> pz.nn.Sequential:
  """The layers after the last transformer block, without surgery layers.

  Args:
    model: A Penzai ``TransformerLM`` (patched or not).

  Returns:
    A layer mapping ``{..., embedding}`` to logits ``{..., vocabulary}``
    (final RMSNorm, ``EmbeddingDecode``, then the final soft cap if any).
    Extra named axes (``layer``, ``stage``…) are vectorized over.
  """
  sublayers = model.body.sublayers
  blocks = [
    i for i, x in enumerate(sublayers) if isinstance(x, model_parts.TransformerBlock)
  ]
  if not blocks:
    raise errors.SiteError("The model body has no transformer blocks.")
  head = [x for x in sublayers[blocks[-1] + 1 :] if not isinstance(x, SurgeryLayer)]
  return pz.nn.Sequential(head)


def top_tokens(
  logits: np.ndarray, k: int, tokenizer: Any = None
) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
  """The ``k`` largest entries of a ``[vocab]`` vector, largest first.

  Returns:
    ``(ids, values, pieces)``: ``pieces`` are display strings of the ids when
    ``tokenizer`` is given (else None).
  """
  logits = to_numpy(logits)
  if not 1 <= k <= logits.shape[-1]:
    raise errors.InputError(f"k={k} must be in 1..{logits.shape[-1]}.")
  ids = np.argsort(-logits, kind="stable")[:k]
  pieces = None
  if tokenizer is not None:
    pieces = as_tokenizer(tokenizer).pieces([int(i) for i in ids])
  return ids, logits[ids], pieces
