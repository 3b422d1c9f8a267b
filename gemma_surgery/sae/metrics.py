"""SAE quality metrics, as defined by SAELens / Gemma Scope.

Every function takes Penzai NamedArrays (activations over ``embedding``,
features over ``latents``, logits over ``vocabulary``) or plain arrays whose
last axis is that feature axis. ``mask`` is an optional boolean array over the
token axes (e.g. ``{batch, seq}``) selecting which tokens count; build it with
`token_mask`, which by default drops BOS/EOS/padding and the first position
(Gemma Scope SAEs were not trained on BOS, an activation outlier).

All reductions run in float32 (float64 inputs stay float64).
"""

from __future__ import annotations

import dataclasses
import html
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.host import to_numpy


def _tokens_by_features(x: Any, axis: str) -> jax.Array:
  """``[tokens..., features]`` positional array (feature axis last)."""
  if isinstance(x, pz.nx.NamedArray | pz.nx.NamedArrayView):
    if axis not in x.named_shape:
      raise errors.InputError(
        f"Expected a {axis!r} axis, got axes {dict(x.named_shape)}."
      )
    others = [a for a in x.named_shape if a != axis]
    return jnp.asarray(x.unwrap(*sorted(others), axis))
  return jnp.asarray(x)


def _token_array(x: Any) -> jax.Array:
  if isinstance(x, pz.nx.NamedArray | pz.nx.NamedArrayView):
    return jnp.asarray(x.unwrap(*sorted(x.named_shape)))
  return jnp.asarray(x)


def _weights(shape: tuple[int, ...], mask: Any) -> jax.Array:
  """Float token weights (1 = included) of the given token shape."""
  if mask is None:
    return jnp.ones(shape, jnp.float32)
  m = _token_array(mask)
  if m.shape != shape:
    raise errors.InputError(f"mask has shape {m.shape}; the tokens have {shape}.")
  if not bool(jnp.any(m)):
    raise errors.InputError("mask selects no tokens.")
  return m.astype(jnp.float32)


def _pair(x: Any, x_hat: Any, axis: str) -> tuple[jax.Array, jax.Array]:
  a, b = _tokens_by_features(x, axis), _tokens_by_features(x_hat, axis)
  if a.shape != b.shape:
    raise errors.InputError(f"Shapes differ: {a.shape} vs {b.shape}.")
  return a.astype(jnp.promote_types(a.dtype, jnp.float32)), b.astype(
    jnp.promote_types(b.dtype, jnp.float32)
  )


def _mean(values: jax.Array, weights: jax.Array) -> float:
  return float(jnp.sum(values * weights) / jnp.sum(weights))


def token_mask(
  tokens: Any, special_ids: Sequence[int] = (0, 1, 2), exclude_first: bool = True
) -> np.ndarray:
  """Boolean mask of tokens that count in metrics.

  Args:
    tokens: ``[batch, seq]`` (or ``{batch, seq}`` NamedArray) token ids.
    special_ids: Ids to exclude (Gemma: pad 0, eos 1, bos 2).
    exclude_first: Also exclude position 0 of every row.
  """
  ids = to_numpy(_token_array(tokens))
  mask = ~np.isin(ids, np.asarray(special_ids))
  if exclude_first:
    mask[..., 0] = False
  return mask


def l0(features: Any, mask: Any = None, axis: str = "latents") -> float:
  """Mean number of active latents per token: ``mean_t Σ_f 1[f_t > 0]``."""
  f = _tokens_by_features(features, axis)
  return _mean(
    jnp.sum(f > 0, axis=-1).astype(jnp.float32), _weights(f.shape[:-1], mask)
  )


def mse(x: Any, x_hat: Any, mask: Any = None, axis: str = "embedding") -> float:
  """SAELens MSE: ``mean_t Σ_d (x_td − x̂_td)²`` (per-token sum over d)."""
  a, b = _pair(x, x_hat, axis)
  return _mean(jnp.sum((a - b) ** 2, axis=-1), _weights(a.shape[:-1], mask))


def explained_variance(
  x: Any, x_hat: Any, mask: Any = None, axis: str = "embedding"
) -> float:
  """SAELens's corrected explained variance.

  ``1 − E_t‖x − x̂‖² / (E_t‖x‖² − Σ_d (E_t x_d)²)``: the denominator is the
  total variance of ``x`` over the selected tokens, with per-dimension means.
  """
  a, b = _pair(x, x_hat, axis)
  w = _weights(a.shape[:-1], mask)[..., None]
  n = jnp.sum(w)
  residual = jnp.sum(w * (a - b) ** 2) / n
  mean_d = jnp.sum(w * a, axis=tuple(range(a.ndim - 1))) / n
  total = jnp.sum(w * a**2) / n - jnp.sum(mean_d**2)
  return float(1.0 - residual / total)


def fvu(x: Any, x_hat: Any, mask: Any = None, axis: str = "embedding") -> float:
  """Fraction of variance unexplained: ``1 − explained_variance``."""
  return 1.0 - explained_variance(x, x_hat, mask, axis)


def cosine_similarity(
  x: Any, x_hat: Any, mask: Any = None, axis: str = "embedding"
) -> float:
  """Mean over tokens of ``cos(x_t, x̂_t)``."""
  a, b = _pair(x, x_hat, axis)
  cos = jnp.sum(a * b, -1) / (
    jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1) + 1e-12
  )
  return _mean(cos, _weights(a.shape[:-1], mask))


def _next_token_nll(logits: Any, tokens: Any) -> jax.Array:
  """``[batch, seq − 1]`` −log p(token_{t+1} | logits_t)."""
  lg = _tokens_by_features(logits, "vocabulary")
  lg = lg.astype(jnp.promote_types(lg.dtype, jnp.float32))
  ids = _token_array(tokens)
  if lg.shape[:-1] != ids.shape:
    raise errors.InputError(
      f"logits cover tokens {lg.shape[:-1]} but tokens have shape {ids.shape}."
    )
  logp = jax.nn.log_softmax(lg[..., :-1, :], axis=-1)
  return -jnp.take_along_axis(logp, ids[..., 1:, None], axis=-1)[..., 0]


def _target_weights(tokens: Any, mask: Any) -> jax.Array:
  ids = _token_array(tokens)
  if mask is None:
    return jnp.ones(ids.shape[:-1] + (ids.shape[-1] - 1,), jnp.float32)
  return _weights(ids.shape, mask)[..., 1:]


def cross_entropy(logits: Any, tokens: Any, mask: Any = None) -> float:
  """Next-token cross-entropy, averaged over predicted tokens in ``mask``.

  ``mask`` (over the tokens) selects which *target* tokens count.
  """
  w = _target_weights(tokens, mask)
  if not bool(jnp.any(w)):
    raise errors.InputError("mask selects no predicted tokens.")
  return _mean(_next_token_nll(logits, tokens), w)


def delta_lm_loss(
  clean_logits: Any, spliced_logits: Any, tokens: Any, mask: Any = None
) -> float:
  """Gemma Scope's delta loss: ``CE(spliced) − CE(clean)``."""
  return cross_entropy(spliced_logits, tokens, mask) - cross_entropy(
    clean_logits, tokens, mask
  )


def ce_loss_recovered(clean_ce: float, spliced_ce: float, ablated_ce: float) -> float:
  """``(CE_ablated − CE_spliced) / (CE_ablated − CE_clean)`` (1 = perfect)."""
  if ablated_ce == clean_ce:
    raise errors.InputError("Zero-ablation does not change the loss: undefined.")
  return (ablated_ce - spliced_ce) / (ablated_ce - clean_ce)


def kl_divergence(clean_logits: Any, other_logits: Any, mask: Any = None) -> float:
  """Mean ``KL(p_clean ‖ p_other)`` of the next-token distributions.

  Aligned with `cross_entropy`: position ``t`` (predicting token ``t + 1``)
  counts when ``mask[t + 1]`` is set; the last position predicts nothing.
  """
  a, b = _pair(clean_logits, other_logits, "vocabulary")
  log_p = jax.nn.log_softmax(a[..., :-1, :], -1)
  log_q = jax.nn.log_softmax(b[..., :-1, :], -1)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  if mask is None:
    return float(jnp.mean(kl))
  return _mean(kl, _weights(a.shape[:-1], mask)[..., 1:])


def kl_score(kl_spliced: float, kl_ablated: float) -> float:
  """SAELens ``kl_div_score = (KL_ablated − KL_spliced) / KL_ablated``."""
  if kl_ablated == 0:
    raise errors.InputError("Zero-ablation KL is 0: the score is undefined.")
  return (kl_ablated - kl_spliced) / kl_ablated


def feature_density(
  features: Any, mask: Any = None, axis: str = "latents"
) -> np.ndarray:
  """Fraction of selected tokens on which each latent fires: ``[latents]``."""
  f = _tokens_by_features(features, axis)
  w = _weights(f.shape[:-1], mask)[..., None]
  fired = jnp.sum(w * (f > 0), axis=tuple(range(f.ndim - 1)))
  return to_numpy(fired / jnp.sum(w))


def dead_fraction(density: Any) -> float:
  """Fraction of latents that never fired."""
  return float(np.mean(to_numpy(density) == 0))


@dataclasses.dataclass(frozen=True)
class SAEMetrics:
  """A summary of SAE quality; renders as an HTML table in notebooks."""

  l0: float
  explained_variance: float
  fvu: float
  mse: float
  cosine_similarity: float
  dead_fraction: float
  delta_lm_loss: float | None = None
  ce_loss_recovered: float | None = None
  kl_score: float | None = None
  num_tokens: int = 0

  def _repr_html_(self) -> str:
    rows = "".join(
      f"<tr><td style='padding:2px 8px'>{html.escape(k)}</td>"
      f"<td style='padding:2px 8px;text-align:right'>{v:.4g}</td></tr>"
      for k, v in dataclasses.asdict(self).items()
      if v is not None
    )
    return (
      f"<table style='border-collapse:collapse;font-family:monospace'>{rows}</table>"
    )


def summarize(
  x: Any,
  x_hat: Any,
  features: Any,
  mask: Any = None,
  *,
  clean_logits: Any = None,
  spliced_logits: Any = None,
  ablated_logits: Any = None,
  tokens: Any = None,
) -> SAEMetrics:
  """All reconstruction metrics, plus loss-based ones when logits are given."""
  extra: dict[str, float] = {}
  if clean_logits is not None and spliced_logits is not None and tokens is not None:
    clean = cross_entropy(clean_logits, tokens, mask)
    spliced = cross_entropy(spliced_logits, tokens, mask)
    extra["delta_lm_loss"] = spliced - clean
    if ablated_logits is not None:
      ablated = cross_entropy(ablated_logits, tokens, mask)
      extra["ce_loss_recovered"] = ce_loss_recovered(clean, spliced, ablated)
      extra["kl_score"] = kl_score(
        kl_divergence(clean_logits, spliced_logits, mask),
        kl_divergence(clean_logits, ablated_logits, mask),
      )
  f = _tokens_by_features(features, "latents")
  return SAEMetrics(
    l0=l0(features, mask),
    explained_variance=explained_variance(x, x_hat, mask),
    fvu=fvu(x, x_hat, mask),
    mse=mse(x, x_hat, mask),
    cosine_similarity=cosine_similarity(x, x_hat, mask),
    dead_fraction=dead_fraction(feature_density(features, mask)),
    num_tokens=int(jnp.sum(_weights(f.shape[:-1], mask))),
    **extra,
  )
