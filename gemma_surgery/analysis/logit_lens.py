"""Logit lens: decode every point of the residual stream with the model's head.

The residual stream is read after the embedding (``embed``), after each
attention sublayer (``resid_mid``) and after each MLP sublayer
(``resid_post``), and decoded by the model's own read-out head (final
RMSNorm, unembedding, final soft cap) as if the network ended there
(premature decoding). Each stage also records how much its sublayer turned
the residual vector: ``1 − cos(resid_before, resid_after)``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.analysis.named import STAGE, TOKEN_AXES, TOP_K, NamedResult
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import capture, sites
from gemma_surgery.surgery.readout import readout_head
from gemma_surgery.surgery.run import jit_forward
from gemma_surgery.tokenizer import as_tokenizer


@dataclasses.dataclass(frozen=True)
class LogitLens(NamedResult):
  """Premature decoding of every residual stage.

  ``named()`` gives the arrays as NamedArrays: ``tokens``/``final_ids``
  ``{batch, seq}``, ``top_ids``/``top_probs`` ``{stage, batch, seq, top_k}``,
  ``change`` ``{stage, batch, seq}``.

  Attributes:
    labels: One label per stage: ``"embed"``, then ``"attn L"`` and ``"mlp
      L"`` for every layer L (the residual after that sublayer).
    tokens: ``[batch, seq]`` input ids.
    top_ids: ``[stage, batch, seq, k]`` most likely next tokens per stage.
    top_probs: ``[stage, batch, seq, k]`` their probabilities.
    change: ``[stage, batch, seq]`` ``1 − cos`` between the residual before
      and after the stage's sublayer (NaN for ``embed``, which has no
      predecessor).
    final_ids: ``[batch, seq]`` the model's actual top-1 prediction.
  """

  AXES = {
    "tokens": TOKEN_AXES,
    "top_ids": (STAGE, "batch", "seq", TOP_K),
    "top_probs": (STAGE, "batch", "seq", TOP_K),
    "change": (STAGE, "batch", "seq"),
    "final_ids": TOKEN_AXES,
  }

  labels: list[str]
  tokens: np.ndarray
  top_ids: np.ndarray
  top_probs: np.ndarray
  change: np.ndarray
  final_ids: np.ndarray

  def agreement(self) -> np.ndarray:
    """``[stage]`` share of positions whose top-1 equals the final top-1."""
    return (self.top_ids[..., 0] == self.final_ids[None]).mean(axis=(1, 2))

  def pieces(self, tokenizer: Any) -> np.ndarray:
    """``[stage, batch, seq, k]`` display strings of `top_ids`."""
    tok = as_tokenizer(tokenizer)
    flat = [tok.piece(int(i)) for i in self.top_ids.reshape(-1)]
    return np.array(flat, dtype=object).reshape(self.top_ids.shape)


@functools.partial(jax.jit, static_argnames=("k",))
def _decode_stages(head: Any, stages: jax.Array, k: int) -> tuple:
  """Top-k probabilities of ``head`` on each ``[stage, batch, seq, d]`` slice."""

  def one(x):
    logits = head(pz.nx.wrap(x).tag("batch", "seq", "embedding"))
    logp = jax.nn.log_softmax(
      logits.unwrap("batch", "seq", "vocabulary").astype(jnp.float32), axis=-1
    )
    values, ids = jax.lax.top_k(logp, k)
    return ids, jnp.exp(values)

  return jax.lax.map(one, stages)


def _one_minus_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  num = (a * b).sum(-1)
  den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
  return 1.0 - num / np.maximum(den, 1e-30)


def logit_lens(
  model: Any, tokens: Any, *, k: int = 10, tokenizer: Any = None
) -> LogitLens:
  """Decodes the residual stream after the embedding and every sublayer.

  Args:
    model: A Penzai ``TransformerLM`` (patched or not: surgery layers act as
      usual; the read-out head is the model's own, without surgery layers).
    tokens: Prompts of equal length (see `inputs.token_batch`).
    k: Tokens kept per stage and position.
    tokenizer: Needed when ``tokens`` are strings.

  Returns:
    A `LogitLens` with ``2 * num_layers + 1`` stages.

  Raises:
    InputError: Bad tokens or ``k`` outside ``1..vocab``.
  """
  vocab = model.metadata.vocab_size
  if not isinstance(k, int) or not 1 <= k <= vocab:
    raise errors.InputError(f"k={k!r} must be an int in 1..{vocab}.")
  ids = token_batch(model, tokens, tokenizer)
  n = sites.num_layers(model)
  patched, acts = capture(model, ["embed", "resid_mid", "resid_post", "logits"])
  jit_forward(patched)(named_tokens(ids))
  order = [("embed", None)]
  labels = ["embed"]
  for layer in range(n):
    order += [("resid_mid", layer), ("resid_post", layer)]
    labels += [f"attn {layer}", f"mlp {layer}"]
  stages = jnp.stack(
    [acts[key].unwrap("batch", "seq", "embedding") for key in order]
  ).astype(jnp.float32)
  head = pz.freeze_params(readout_head(model))
  top_ids, top_probs = _decode_stages(head, stages, k)
  resid = to_numpy(stages, np.float64)
  change = np.full(resid.shape[:3], np.nan)
  change[1:] = _one_minus_cos(resid[:-1], resid[1:])
  final = to_numpy(acts["logits"].unwrap("batch", "seq", "vocabulary")).argmax(-1)
  return LogitLens(
    labels=labels,
    tokens=ids,
    top_ids=to_numpy(top_ids),
    top_probs=to_numpy(top_probs),
    change=change,
    final_ids=final,
  )
