"""SAE metrics over a token corpus, batch by batch, with a progress bar.

Every metric is aggregated from sums and counts over all counted tokens (not
a mean of per-batch means), so the result equals the array-level functions of
`gemma_surgery.sae.metrics` on the concatenated corpus. Explained variance
uses global statistics: ``Σ‖x − x̂‖²`` and the total variance from running
``Σx`` and ``Σ‖x‖²``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm.auto as tqdm

from gemma_surgery.errors import InputError
from gemma_surgery.generation.inputs import named_tokens, token_batch
from gemma_surgery.host import to_numpy
from gemma_surgery.sae.autoencoders import AutoEncoder
from gemma_surgery.sae.metrics import SAEMetrics, token_mask
from gemma_surgery.sae.splice import splice_sae
from gemma_surgery.surgery import capture
from gemma_surgery.surgery.interventions import ablate
from gemma_surgery.surgery.run import jit_forward


def _logp(logits: Any) -> np.ndarray:
  lg = jnp.asarray(logits.unwrap("batch", "seq", "vocabulary"), jnp.float32)
  return to_numpy(jax.nn.log_softmax(lg, axis=-1), np.float64)


def evaluate(
  model: Any,
  sae: AutoEncoder,
  batches: Iterable[Any],
  *,
  special_ids: tuple[int, ...] = (0, 1, 2),
  progress: bool = True,
) -> SAEMetrics:
  """L0, MSE, explained variance, FVU, cosine, density, delta LM loss, CE
  loss recovered (vs zero-ablating the site) and KL score over a corpus.

  Args:
    model: The model.
    sae: The SAE (read at its site and layer).
    batches: Iterable of ``[batch, seq]`` token arrays.
    special_ids: Tokens excluded (and, for losses, not predicted); the first
      position of every row is excluded too (`metrics.token_mask`).
    progress: Show a progress bar.

  Raises:
    InputError: ``batches`` is empty, or every token of it is excluded (no
      token to average over).
  """
  info = sae.info
  out_site = info.out_site or info.site  # transcoders predict another site
  captured, acts = capture(model, sorted({info.site, out_site}), [info.layer])
  clean_fwd = jit_forward(captured)
  spliced, feats = splice_sae(model, sae, capture_features=True)
  spliced_fwd = jit_forward(spliced)
  ablated_fwd = jit_forward(ablate(model, out_site, info.layer))
  keys = ["n", "l0", "sq", "x2", "cos", "nt", "ce_c", "ce_s", "ce_a", "kl_s", "kl_a"]
  s = dict.fromkeys(keys, 0.0)
  sum_x = None
  fired = np.zeros(info.width)
  for batch in tqdm.tqdm(batches, desc="evaluating SAE", disable=not progress):
    ids = token_batch(model, batch)
    tokens = named_tokens(ids)
    mask = token_mask(ids, special_ids)
    clean = _logp(clean_fwd(tokens))
    x_in = _flat(acts[info.site, info.layer], info.site, ids.shape)
    x = _flat(acts[out_site, info.layer], out_site, ids.shape)
    spliced_lp = _logp(spliced_fwd(tokens))
    f = to_numpy(feats.value().unwrap("batch", "seq", "latents"), np.float64)
    x_hat = to_numpy(sae(_named(x_in)).unwrap("batch", "seq", "embedding"), np.float64)
    ablated = _logp(ablated_fwd(tokens))
    m = mask.astype(np.float64)
    s["n"] += m.sum()
    s["l0"] += ((f > 0).sum(-1) * m).sum()
    s["sq"] += (((x - x_hat) ** 2).sum(-1) * m).sum()
    s["x2"] += ((x**2).sum(-1) * m).sum()
    sum_x = (x * m[..., None]).sum((0, 1)) + (0 if sum_x is None else sum_x)
    cos = (x * x_hat).sum(-1) / (
      np.linalg.norm(x, axis=-1) * np.linalg.norm(x_hat, axis=-1) + 1e-12
    )
    s["cos"] += (cos * m).sum()
    fired += ((f > 0) * m[..., None]).sum((0, 1))
    target = m[:, 1:]
    nxt = ids[:, 1:, None]
    for key, lp in (("ce_c", clean), ("ce_s", spliced_lp), ("ce_a", ablated)):
      s[key] += (-np.take_along_axis(lp[:, :-1], nxt, -1)[..., 0] * target).sum()
    p = np.exp(clean[:, :-1])
    s["kl_s"] += ((p * (clean[:, :-1] - spliced_lp[:, :-1])).sum(-1) * target).sum()
    s["kl_a"] += ((p * (clean[:, :-1] - ablated[:, :-1])).sum(-1) * target).sum()
    s["nt"] += target.sum()
  n, nt = s["n"], s["nt"]
  if n == 0:
    what = "yielded no batch" if sum_x is None else "has no counted token"
    raise InputError(
      f"evaluate: the corpus {what}; every metric is an average over tokens."
      " Pass an iterable of [batch, seq] token arrays with tokens after the"
      f" first position that are not special ids {tuple(special_ids)}."
    )
  total = s["x2"] / n - float(((sum_x / n) ** 2).sum())
  ev = 1.0 - (s["sq"] / n) / total
  ce_c, ce_s, ce_a = s["ce_c"] / nt, s["ce_s"] / nt, s["ce_a"] / nt
  kl_s, kl_a = s["kl_s"] / nt, s["kl_a"] / nt
  density = fired / n
  return SAEMetrics(
    l0=s["l0"] / n,
    explained_variance=ev,
    fvu=1.0 - ev,
    mse=s["sq"] / n,
    cosine_similarity=s["cos"] / n,
    dead_fraction=float(np.mean(density == 0)),
    delta_lm_loss=ce_s - ce_c,
    ce_loss_recovered=(ce_a - ce_s) / (ce_a - ce_c) if ce_a != ce_c else float("nan"),
    kl_score=(kl_a - kl_s) / kl_a if kl_a else float("nan"),
    num_tokens=int(n),
  )


def _flat(value: Any, site: str, shape: tuple[int, ...]) -> np.ndarray:
  """``[batch, seq, d]`` float64; ``attn.z`` flattened head-major."""
  axes = ("heads", "projection") if site == "attn.z" else ("embedding",)
  return to_numpy(value.unwrap("batch", "seq", *axes), np.float64).reshape(*shape, -1)


def _named(x: np.ndarray) -> Any:
  from penzai import pz

  return pz.nx.wrap(jnp.asarray(x, jnp.float32)).tag("batch", "seq", "embedding")
