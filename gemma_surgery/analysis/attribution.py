"""Attribution patching: gradient estimates of activation-patching sweeps.

`attribution_patching` estimates, for every ``(layer, position)`` or
``(layer, head)`` of a site, the effect on a metric of patching the clean
activation into the corrupted run — the quantity `patching_sweep` measures
exactly with one forward per patch — from one forward and backward:

* ``method="atp"`` (Nanda 2023; Kramár et al. 2024): ``(a_clean − a_corrupt) ·
  dM/da`` at the corrupted run, summed over the piece's other axes.
* ``method="atp*"``: AtP with the QK fix of Kramár et al. (2024) at the query
  and key sites (``attn.q``, ``attn.k``): the change of the attention pattern
  is computed exactly (through the model's own scoring, soft cap, mask and
  softmax) and only the rest of the network is linearised, which repairs
  AtP's failures where the softmax saturates. Elsewhere it equals AtP.
* ``method="graddrop"``: AtP*'s GradDrop (Kramár et al. 2024, section
  3.1.2), against cancellation between paths. For every layer ``ℓ`` the
  backward pass is re-run with the gradient through layer ``ℓ``'s residual
  contributions (its ``attn.out`` and ``mlp.out``) zeroed by a
  `GradientGate` (forward unchanged), giving ``AtP_ℓ``; the estimate is

      GD(n) = 1/(L − 1) · Σ_ℓ |AtP_ℓ(n) − AtP(n)|,   ℓ = 0..L−1

  a non-negative estimate of ``|effect|`` (compare with ``|exact|``:
  `AttributionResult.agreement` does). ``AtP_ℓ − AtP`` is minus the part of
  AtP flowing through layer ``ℓ``: layers below the node contribute 0, the
  node's own layer (for head/MLP outputs) its whole AtP. ``L`` backward
  passes, each one jitted call sharing one compilation.
* ``method="ig"``: integrated gradients along the straight line from the
  corrupted to the clean activation of each layer (all of the layer's
  positions together), ``steps`` midpoint-rule points vmapped into one call
  per layer. The attributions of a layer sum to the exact effect of patching
  the whole layer (completeness) as ``steps`` grows.

Scores are effects (``metric(patched) − metric(corrupted)``, mean over the
batch); ``result.scores`` adds the corrupted metric back to line up with
`PatchingResult.scores`.
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
from gemma_surgery.analysis import atp_pass, gradients, qk_fix
from gemma_surgery.analysis.named import LAYER, NamedResult
from gemma_surgery.analysis.patching import PatchingResult
from gemma_surgery.generation.inputs import named_tokens
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import sites
from gemma_surgery.surgery.layers.tap import GradientGate

METHODS = ("atp", "atp*", "ig", "graddrop")
BY = ("position", "head", "head_position")


def _axes_of(by: str) -> tuple[str, ...]:
  return {"position": ("seq",), "head": ("heads",), "head_position": ("seq", "heads")}[
    by
  ]


def reduce_to(x: pz.nx.NamedArray, by: str) -> np.ndarray:
  """Sums ``{batch, seq, ...}`` products to ``by``'s axes, mean over batch."""
  keep = _axes_of(by)
  drop = [a for a in x.named_shape if a not in keep]
  total = pz.nx.nmap(jnp.sum)(x.untag(*drop)) / x.named_shape["batch"]
  return to_numpy(total.unwrap(*keep))


@dataclasses.dataclass(frozen=True)
class AttributionResult(NamedResult):
  """Estimated effects of patching each clean piece into the corrupted run.

  Attributes:
    site: The site.
    by: ``"position"``, ``"head"`` or ``"head_position"``.
    method: ``"atp"``, ``"atp*"``, ``"ig"`` or ``"graddrop"``.
    layers: Row labels: the layers.
    effects: ``[layer, seq]``, ``[layer, heads]`` or ``[layer, seq, heads]``
      estimated ``metric(patched) − metric(corrupted)``.
    clean: Metric of the clean run (mean over the batch).
    corrupted: Metric of the corrupted run (mean over the batch).
    unchanged: Bool, shaped like ``effects``: the pieces whose clean and
      corrupted activations are identical (every row), where patching is a
      no-op and the exact effect is 0 by construction (e.g. positions before
      the corrupted token). None: not known.
  """

  site: str
  by: str
  method: str
  layers: list[int]
  effects: np.ndarray
  clean: float
  corrupted: float
  unchanged: np.ndarray | None = None

  def axes(self) -> dict[str, tuple[str, ...]]:
    """``{"effects": (layer, *by axes)}``."""
    return {"effects": (LAYER, *_axes_of(self.by))}

  @property
  def scores(self) -> np.ndarray:
    """``corrupted + effects``: estimates of `PatchingResult.scores`."""
    return self.corrupted + self.effects

  @property
  def normalized(self) -> np.ndarray:
    """``effects / (clean − corrupted)``: 1 = fully restored."""
    span = self.clean - self.corrupted
    if span == 0:
      raise errors.InputError("Clean and corrupted metrics are equal.")
    return self.effects / span

  def agreement(self, exact: PatchingResult, k: int = 5) -> dict[str, float]:
    """How well these estimates rank an exact sweep's pieces.

    Pieces in `unchanged` are no-op patches: their exact effect is 0, and the
    sweep's float noise there (~1e-6, from batching the patched forwards)
    is read as 0, so those pieces tie rather than rank at random.

    Returns:
      ``spearman`` (rank correlation of effects, all pieces),
      ``spearman_changed`` (the same over the pieces not in `unchanged`
      only), ``top_k_recall`` (share of the exact top ``k`` by |effect|
      found in the estimate's top ``2k``) and ``mean_abs_error`` of the
      effects.

    Raises:
      InputError: A sweep of another site, grouping or shape.
    """
    if (exact.site, exact.by) != (self.site, self.by) or (
      exact.scores.shape != self.effects.shape
    ):
      raise errors.InputError(
        f"Compare like with like: this is {self.site} by {self.by}"
        f" {self.effects.shape}, the sweep {exact.site} by {exact.by}"
        f" {exact.scores.shape}."
      )
    true = (exact.scores - exact.corrupted).reshape(-1)
    noop = np.zeros(true.shape, bool)
    if self.unchanged is not None:
      noop = self.unchanged.reshape(-1)
      true = np.where(noop, 0.0, true)
    if self.method == "graddrop":  # estimates of |effect|
      true = np.abs(true)
    est = self.effects.reshape(-1)
    return {
      "spearman": spearman(true, est),
      "spearman_changed": spearman(true[~noop], est[~noop]),
      "top_k_recall": top_k_recall(true, est, k),
      "mean_abs_error": float(np.abs(true - est).mean()),
    }


def _ranks(x: np.ndarray) -> np.ndarray:
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x))
  for value in np.unique(x):  # ties share their mean rank
    tied = x == value
    ranks[tied] = ranks[tied].mean()
  return ranks


def spearman(a: np.ndarray, b: np.ndarray) -> float:
  """Spearman rank correlation of two 1-D arrays (ties: mean ranks)."""
  ra, rb = _ranks(np.asarray(a, float)), _ranks(np.asarray(b, float))
  ra, rb = ra - ra.mean(), rb - rb.mean()
  denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
  return float((ra * rb).sum() / denom) if denom else 0.0


def top_k_recall(true: np.ndarray, est: np.ndarray, k: int = 5) -> float:
  """Share of ``true``'s top ``k`` by magnitude in ``est``'s top ``2k``."""
  top = set(np.argsort(-np.abs(true))[:k])
  found = set(np.argsort(-np.abs(est))[: 2 * k])
  return len(top & found) / len(top)


def _check(site: str, by: str, method: str, steps: int) -> None:
  info = sites.site_info(site)
  if not info.per_layer:
    raise errors.SiteError(f"Attribution needs a per-layer site; {site!r} is global.")
  if by not in BY:
    raise errors.InputError(f"by={by!r}; valid: {', '.join(BY)}.")
  if by != "position" and "heads" not in info.axes:
    raise errors.SiteError(
      f"by={by!r} needs a head site ({sorted(sites.HEAD_SITES)}); got {site!r}."
    )
  if method not in METHODS:
    raise errors.InputError(f"method={method!r}; valid: {', '.join(METHODS)}.")
  if method == "atp*" and site == "attn.k" and by == "head_position":
    raise errors.InputError(qk_fix.UNSUPPORTED)
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise errors.InputError(f"steps={steps!r} must be a positive int.")


def attribution_patching(
  model: Any,
  clean: Any,
  corrupted: Any,
  metric: gradients.Metric,
  *,
  site: str = "resid_pre",
  by: str = "position",
  layers: Any = None,
  method: str = "atp",
  steps: int = 16,
  tokenizer: Any = None,
) -> AttributionResult:
  """Estimates a patching sweep (clean into corrupted) from gradients.

  Args:
    model: A Penzai transformer LM (not modified).
    clean: Clean prompt(s), ``[batch, seq]`` ids (or strings with a tokenizer).
    corrupted: Corrupted prompt(s) of the same shape.
    metric: ``logits -> [batch]`` (see `gradients`).
    site: Any per-layer site.
    by: ``"position"`` (per layer × position), ``"head"`` (per layer × head,
      all positions; head sites) or ``"head_position"`` (both).
    layers: Layers (None: all).
    method: ``"atp"``, ``"atp*"`` or ``"ig"`` (see the module doc).
    steps: Interpolation points of ``"ig"``.
    tokenizer: Needed for string prompts.

  Returns:
    An `AttributionResult`.

  Raises:
    SiteError: Unknown or global site, bad layers, head grouping at a site
      without heads.
    InputError: Unknown ``by``/``method``, bad ``steps``, prompts of
      different shapes, a metric that doesn't return one value per row.
  """
  _check(site, by, method, steps)
  chosen = sites.layer_indices(model, layers)
  clean_ids, bad_ids = gradients.prompt_pair(model, clean, corrupted, tokenizer)
  if bad_ids is None:
    raise errors.InputError("Attribution patching needs a corrupted prompt.")
  if method in ("atp", "atp*"):
    return _one_pass(model, clean_ids, bad_ids, metric, site, by, chosen, method)
  rows = clean_ids.shape[0]
  tokens = named_tokens(np.concatenate([clean_ids, bad_ids]))
  prepared = gradients.Prepared(
    model,
    [(site, chosen)],
    tokens,
    rewrite=_gated if method == "graddrop" else None,
  )
  values, acts, grads = prepared.run(metric, rows, prepared.zeros(), tokens)
  values = np.asarray(values)
  got = {
    key: (act, grad) for key, act, grad in zip(prepared.keys, acts, grads, strict=True)
  }
  effects, unchanged = [], []
  for layer in chosen:
    act, grad = got[site, layer]
    delta = _split(act, rows, 0) - _split(act, rows, 1)
    unchanged.append(~to_numpy(atp_pass.changed_keep(delta, _axes_of(by))))
    if method == "ig":
      grad = _integrated(prepared, metric, rows, tokens, (site, layer), delta, steps)
    else:
      grad = _split(grad, rows, 1)
    effects.append(reduce_to(delta * grad, by))
  if method == "graddrop":
    effects = _grad_drop(prepared, metric, rows, tokens, site, by, chosen, effects)
  return AttributionResult(
    site=site,
    by=by,
    method=method,
    layers=chosen,
    effects=np.stack(effects),
    clean=float(values[:rows].mean()),
    corrupted=float(values[rows:].mean()),
    unchanged=np.stack(unchanged),
  )


def _one_pass(model, clean_ids, bad_ids, metric, site, by, chosen, method):
  """AtP and AtP* from one `atp_pass.run_pass` (a clean forward, a corrupted
  forward and backward, every site together)."""
  names = [site]
  fix = method == "atp*" and site in qk_fix.QK_SITES
  if fix:
    names += [s for s in ("attn.q", "attn.k", "attn.pattern") if s != site]
  clean_tokens, bad_tokens = named_tokens(clean_ids), named_tokens(bad_ids)
  prepared = gradients.Prepared(model, [(s, chosen) for s in names], clean_tokens)
  # The finest grouping, summed to ``by`` here: every ``by`` of a site shares
  # one compilation.
  keep = _axes_of("head_position" if "heads" in sites.site_info(site).axes else by)
  run = atp_pass.run_pass(prepared, metric, keep, clean_tokens, bad_tokens)
  at = {key: i for i, key in enumerate(prepared.keys)}
  to_by = functools.partial(atp_pass.coarsen, keep=keep, to=_axes_of(by))
  effects = []
  for layer in chosen:
    if fix:
      effects.append(_qk_effect(model, layer, site, by, run, at))
    else:
      effects.append(to_by(run.effects[at[site, layer]], np.sum))
  return AttributionResult(
    site=site,
    by=by,
    method=method,
    layers=chosen,
    effects=np.stack(effects),
    clean=float(run.clean_values.mean()),
    corrupted=float(run.corrupted_values.mean()),
    unchanged=~np.stack(
      [to_by(run.changed[at[site, layer]], np.any) for layer in chosen]
    ),
  )


def _split(arr: pz.nx.NamedArray, rows: int, part: int) -> pz.nx.NamedArray:
  return arr[{"batch": pz.slice[part * rows : (part + 1) * rows]}]


def _gated(model: Any) -> Any:
  """``model`` with a `GradientGate` on every layer's attn.out and mlp.out
  (after any tap already there: the gate drops a tapped output's own path)."""
  for name in ("attn.out", "mlp.out"):
    model = sites.insert(model, name, None, functools.partial(GradientGate.fresh, name))
  return model


def _grad_drop(
  prepared, metric, rows, tokens, site, by, chosen, atp
) -> list[np.ndarray]:
  """GradDrop (module doc) from the gated model's AtP estimates ``atp``."""
  gates = pz.select(prepared.unbound).at_instances_of(GradientGate)
  num_layers = max(g.layer for g in gates.get_sequence()) + 1
  zeros = prepared.zeros()
  total = [np.zeros_like(a) for a in atp]
  for drop in range(num_layers):
    unbound = gates.apply(
      lambda g, drop=drop: dataclasses.replace(
        g, keep=jnp.asarray(0.0 if g.layer == drop else 1.0, jnp.float32)
      )
    )
    _, acts, grads = prepared.run(metric, rows, zeros, tokens, unbound)
    got = dict(zip(prepared.keys, zip(acts, grads, strict=True), strict=True))
    for i, layer in enumerate(chosen):
      act, grad = got[site, layer]
      delta = _split(act, rows, 0) - _split(act, rows, 1)
      total[i] += np.abs(reduce_to(delta * _split(grad, rows, 1), by) - atp[i])
  return [t / max(num_layers - 1, 1) for t in total]


def _qk_effect(model, layer, site, by, run: atp_pass.Pass, at) -> np.ndarray:
  q, k, p = (at[name, layer] for name in ("attn.q", "attn.k", "attn.pattern"))
  return qk_fix.pattern_effects(
    model,
    layer,
    site,
    by,
    (run.clean[q], run.corrupted[q]),
    (run.clean[k], run.corrupted[k]),
    run.corrupted[p],
    run.grads[p],
  )


def _integrated(
  prepared: gradients.Prepared,
  metric: gradients.Metric,
  rows: int,
  tokens: pz.nx.NamedArray,
  key: tuple[str, int],
  delta: pz.nx.NamedArray,
  steps: int,
) -> pz.nx.NamedArray:
  """Mean gradient at ``key`` along ``corrupted + alpha * delta`` (corrupted rows).

  The ``steps`` points of the midpoint rule run as one vmapped call.
  """
  index = prepared.keys.index(key)
  zeros = prepared.zeros()
  clean_half = pz.nx.zeros(dict(delta.named_shape), delta.dtype)
  full = pz.nx.concatenate([clean_half, delta], "batch")
  order = tuple(full.named_shape)

  def grad_at(alpha):
    deltas = list(zeros)
    deltas[index] = (full * alpha).astype(zeros[index].dtype)
    return prepared.run(metric, rows, deltas, tokens)[2][index].unwrap(*order)

  alphas = (jnp.arange(steps, dtype=jnp.float32) + 0.5) / steps
  mean = jax.vmap(grad_at)(alphas).mean(0)
  return _split(pz.nx.wrap(mean).tag(*order), rows, 1)
