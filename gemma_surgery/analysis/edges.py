"""Edge attribution patching (EAP): AtP on the edges between components.

Senders write into the residual stream: the token embeddings (``embed``),
every attention head (``L3.H2``) and every MLP (``L3.MLP``). Receivers read
it: each head's query (``L4.H1.q``), each key/value head's key and value
(``L4.KV0.k``, ``L4.KV0.v``), each MLP's input (``L4.MLP``) and the
unembedding (``logits``). Senders of layer ``l`` feed the attention
receivers of layers ``> l``, the MLP receivers of layers ``>= l`` (heads of
the same layer) or ``> l`` (MLPs), and ``logits``.

An edge's score is the first-order effect on the metric of patching the
sender's clean output into the corrupted run *along that edge only*:

    score(s → r) = Δs · J_sᵀ g_r

where ``Δs`` is the sender's clean − corrupted activation (``attn.z`` of the
head, ``mlp.out``, ``embed``), ``J_s`` its map into the residual stream
(identity for MLPs and the embedding; for a head, its output projection and
the post-attention norm, with that norm's real Jacobian on the corrupted run)
and ``g_r`` the gradient of the metric with respect to the residual stream
*as read by r alone*: the metric's gradient at the receiver (``attn.q`` head
``h``, ``attn.k``/``attn.v`` kv head, ``mlp.in``, final residual) pulled back
through the receiver's own input map (pre-norm, projection, QK-norm, RoPE),
all on the corrupted run. Scores sum over positions and average over the
batch. One forward and backward of the model plus small per-layer
vector-Jacobian products.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts
from treescope import repr_lib

from gemma_surgery import errors, viz
from gemma_surgery.analysis import gradients
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import heads

_SITES = ("embed", "resid_pre", "resid_mid", "attn.z", "attn.q", "attn.k")
_SITES += ("attn.v", "mlp.in", "mlp.out", "resid_post")


class Edge(NamedTuple):
  """One scored edge: ``sender`` → ``receiver`` (names: see module doc)."""

  sender: str
  receiver: str
  score: float


@dataclasses.dataclass(frozen=True)
class EdgeAttribution:
  """A sparse list of scored edges, largest ``|score|`` first.

  Attributes:
    edges: `Edge` s sorted by ``|score|`` (descending).
    clean: Metric of the clean run (mean over the batch).
    corrupted: Metric of the corrupted run (mean over the batch).
  """

  edges: list[Edge]
  clean: float
  corrupted: float

  def __iter__(self) -> Iterator[Edge]:
    return iter(self.edges)

  def __len__(self) -> int:
    return len(self.edges)

  def score(self, sender: str, receiver: str) -> float:
    """The score of one edge (KeyError naming valid senders if absent)."""
    for e in self.edges:
      if (e.sender, e.receiver) == (sender, receiver):
        return e.score
    raise KeyError(f"No edge {sender} -> {receiver}.")

  def prune(
    self, top_k: int | None = None, threshold: float | None = None
  ) -> EdgeAttribution:
    """The edges kept by ``top_k`` (largest ``|score|``) and/or ``|score| >=
    threshold``: a circuit (see `nodes`).

    Raises:
      InputError: Neither given, a non-positive ``top_k`` or negative
        ``threshold``.
    """
    if top_k is None and threshold is None:
      raise errors.InputError("prune needs top_k=, threshold= or both.")
    kept = self.edges
    if threshold is not None:
      if not threshold >= 0:
        raise errors.InputError(f"threshold={threshold!r} must be >= 0.")
      kept = [e for e in kept if abs(e.score) >= threshold]
    if top_k is not None:
      if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise errors.InputError(f"top_k={top_k!r} must be a positive int.")
      kept = kept[:top_k]
    return dataclasses.replace(self, edges=list(kept))

  def matrix(self) -> tuple[list[str], list[str], pz.nx.NamedArray]:
    """``(senders, receivers, {sender, receiver} scores)``, 0 where no edge."""
    senders = list(dict.fromkeys(e.sender for e in self.edges))
    receivers = list(dict.fromkeys(e.receiver for e in self.edges))
    row = {n: i for i, n in enumerate(senders)}
    col = {n: i for i, n in enumerate(receivers)}
    out = np.zeros((len(senders), len(receivers)), np.float32)
    for e in self.edges:
      out[row[e.sender], col[e.receiver]] = e.score
    return senders, receivers, pz.nx.wrap(jnp.asarray(out)).tag("sender", "receiver")

  def heatmap(self, **kwargs: Any) -> viz.Heatmap:
    """The `matrix` as a `gemma_surgery.viz.heatmap` (prune first to keep it
    small); ``kwargs`` override the defaults."""
    senders, receivers, scores = self.matrix()
    defaults = {
      "row_labels": senders,
      "col_labels": receivers,
      "value_label": "score",
      "title": "Edge attribution",
    }
    return viz.heatmap(scores, **{**defaults, **kwargs})

  def __treescope_repr__(self, path: str | None, subtree_renderer: Any) -> Any:
    """Treescope shows the edges and the ``{sender, receiver}`` matrix."""
    attributes = {
      "edges": self.edges,
      "clean": self.clean,
      "corrupted": self.corrupted,
      "matrix": self.matrix()[2],
    }
    return repr_lib.render_object_constructor(
      type(self), attributes, path, subtree_renderer
    )

  def nodes(self) -> set[str]:
    """Components on the kept edges (receiver ports folded into their node:
    ``L4.H1.q`` → ``L4.H1``)."""
    out = set()
    for e in self.edges:
      out.add(e.sender)
      out.add(
        e.receiver.rsplit(".", 1)[0]
        if e.receiver[-2:] in (".q", ".k", ".v")
        else e.receiver
      )
    return out


def _blocks(model: Any) -> list[Any]:
  found = pz.select(model).at_instances_of(model_parts.TransformerBlock).get_sequence()
  if not found:
    raise errors.SiteError("Edge attribution needs transformer blocks.")
  return list(found)


def _branches(block: Any) -> tuple[list, list]:
  subs = [getattr(r, "delta", None) for r in block.sublayers]
  if len(subs) != 2 or any(not hasattr(s, "sublayers") for s in subs):
    raise errors.SiteError(
      "Edge attribution supports attention + MLP residual pairs (Gemma 1-3)."
    )
  return list(subs[0].sublayers), list(subs[1].sublayers)


def _upto_rope(projection: Any) -> list[Any]:
  layers = list(projection.sublayers)
  at = [i for i, x in enumerate(layers) if isinstance(x, pz.nn.ApplyRoPE)]
  if len(at) != 1:
    raise errors.SiteError("Expected one RoPE layer in a query/key projection.")
  return layers[: at[0] + 1]


def _maps(block: Any) -> dict[str, Any]:
  """Per block: residual → ``attn.q``/``attn.k``/``attn.v``/``mlp.in`` maps,
  and ``attn.z`` (native heads) → ``attn.out``."""
  attn_branch, mlp_branch = _branches(block)
  at = [i for i, x in enumerate(attn_branch) if isinstance(x, pz.nn.Attention)]
  if len(at) != 1 or at[0] != 1 or not isinstance(mlp_branch[0], pz.nn.RMSLayerNorm):
    raise errors.SiteError("Expected pre-norm, attention (, post-norm) blocks.")
  attn, pre = attn_branch[1], attn_branch[0]
  out = {
    "attn.q": pz.nn.Sequential([pre, *_upto_rope(attn.input_to_query)]),
    "attn.k": pz.nn.Sequential([pre, *_upto_rope(attn.input_to_key)]),
    "attn.v": pz.nn.Sequential([pre, *attn.input_to_value.sublayers]),
    "mlp.in": mlp_branch[0],
    "attn.out": pz.nn.Sequential(
      [attn.attn_value_to_output.sublayers[-1], *attn_branch[2:]]
    ),
  }
  return pz.freeze_params(out)


def _positions(like: pz.nx.NamedArray) -> dict[str, pz.nx.NamedArray]:
  batch, seq = like.named_shape["batch"], like.named_shape["seq"]
  pos = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
  return {"token_positions": pz.nx.wrap(pos).tag("batch", "seq")}


def _dot(a: pz.nx.NamedArray, b: pz.nx.NamedArray) -> jax.Array:
  """``Σ a · b`` over everything but ``heads``/``receivers``, per batch mean."""
  prod = a * b
  keep = [x for x in ("receivers", "heads") if x in prod.named_shape]
  drop = [x for x in prod.named_shape if x not in keep]
  out = pz.nx.nmap(jnp.sum)(prod.untag(*drop)) / a.named_shape["batch"]
  return out.unwrap(*keep)


def _pullback(fn: Any, x: pz.nx.NamedArray, cot: pz.nx.NamedArray, by: str) -> tuple:
  """``(fn(x), {receivers, batch, seq, embedding})``: the vjp of ``fn`` at
  ``x`` for the cotangent restricted to each index of its user ``heads`` axis
  (``by="heads"``) or whole (``by="none"``)."""
  y, pull = jax.vjp(lambda v: fn(v, **_positions(x)), x)
  if by == "none":
    grad = pull(cot.astype(y.dtype).order_like(y))[0]
    return y, grad[{"receivers": None}]
  user = heads.to_user_heads(cot)
  n = user.named_shape["heads"]

  def one(h):
    mask = pz.nx.wrap(jnp.arange(n) == h).tag("heads")
    part = pz.nx.nmap(jnp.where)(mask, user, 0.0)
    native = heads.to_native_heads(part, dict(y.named_shape))
    grad = pull(native.astype(y.dtype).order_like(y))[0]
    return grad.unwrap("batch", "seq", "embedding")

  grads = jax.vmap(one)(jnp.arange(n))
  return y, pz.nx.wrap(grads).tag("receivers", "batch", "seq", "embedding")


@jax.jit
def _layer_receivers(maps: dict, acts: dict, grads: dict) -> tuple[dict, dict]:
  """``(recomputed site values, residual-stream gradients)`` of one layer's
  receivers (corrupted run)."""
  values, out = {}, {}
  for s in ("attn.q", "attn.k", "attn.v"):
    values[s], out[s] = _pullback(maps[s], acts["resid_pre"], grads[s], "heads")
  values["mlp.in"], out["mlp.in"] = _pullback(
    maps["mlp.in"], acts["resid_mid"], grads["mlp.in"], "none"
  )
  return values, out


@jax.jit
def _head_scores(out_map: Any, z_bad: Any, dz: Any, receivers: Any) -> jax.Array:
  """``[receivers, heads]`` scores of one layer's heads (see module doc)."""
  native = heads.to_native_heads(z_bad, _native_heads(out_map))
  y, pull = jax.vjp(out_map, native)

  def one(g):
    g = pz.nx.wrap(g).tag("batch", "seq", "embedding").astype(y.dtype).order_like(y)
    return _dot(dz, heads.to_user_heads(pull(g)[0]))

  return jax.vmap(one)(receivers.unwrap("receivers", "batch", "seq", "embedding"))


@jax.jit
def _scores(delta: Any, receivers: Any) -> jax.Array:
  return _dot(delta, receivers)


def _native_heads(out_map: Any) -> dict[str, int]:
  shape = out_map.sublayers[0].weights.value.named_shape
  return {a: n for a, n in shape.items() if a != "embedding"}


def _check_values(layer: int, values: dict, got: gradients.SiteGradients) -> None:
  for site, value in values.items():
    want = got.corrupted[site, layer]
    value = heads.user_view(site, value)
    err = float(
      pz.nx.nmap(jnp.max)(abs(value - want).untag(*want.named_shape)).unwrap()
    )
    scale = float(pz.nx.nmap(jnp.max)(abs(want).untag(*want.named_shape)).unwrap())
    if not err <= 1e-3 * max(scale, 1.0):
      raise errors.SiteError(
        f"Edge attribution could not rebuild {site} of layer {layer} from the"
        f" residual stream (max error {err:.3g}): unsupported block layout."
      )


def _receivers(model: Any, got: gradients.SiteGradients) -> tuple[list, list, Any]:
  """``(names, (kind, layer) per receiver, {receivers, batch, seq, embedding})``."""
  names, where, parts = [], [], []
  blocks = _blocks(model)
  for m, block in enumerate(blocks):
    maps = _maps(block)
    acts = {s: got.corrupted[s, m] for s in ("resid_pre", "resid_mid")}
    grads = {s: got.grad_corrupted[s, m] for s in ("attn.q", "attn.k", "attn.v")}
    grads["mlp.in"] = got.grad_corrupted["mlp.in", m]
    values, recv = _layer_receivers(maps, acts, grads)
    _check_values(m, values, got)
    for site, label, tag in (("attn.q", "H", "q"), ("attn.k", "KV", "k")) + (
      ("attn.v", "KV", "v"),
    ):
      for h in range(recv[site].named_shape["receivers"]):
        names.append(f"L{m}.{label}{h}.{tag}")
        where.append(("attn", m))
      parts.append(recv[site])
    names.append(f"L{m}.MLP")
    where.append(("mlp", m))
    parts.append(recv["mlp.in"])
  names.append("logits")
  where.append(("logits", len(blocks)))
  parts.append(got.grad_corrupted["resid_post", len(blocks) - 1][{"receivers": None}])
  order = ("receivers", "batch", "seq", "embedding")
  stacked = pz.nx.concatenate(
    [p.order_as(*order).astype(jnp.float32) for p in parts], "receivers"
  )
  return names, where, stacked


def _fed(kind: str, layer: int, where: list) -> np.ndarray:
  """Which receivers a sender of ``kind`` at ``layer`` feeds (bool mask)."""
  ok = []
  for rkind, rlayer in where:
    if kind == "embed":
      ok.append(True)
    elif rkind == "mlp" and kind == "head":
      ok.append(rlayer >= layer)
    else:
      ok.append(rlayer > layer)
  return np.asarray(ok)


def edge_attribution(
  model: Any,
  clean: Any,
  corrupted: Any,
  metric: gradients.Metric,
  *,
  tokenizer: Any = None,
) -> EdgeAttribution:
  """Scores every sender → receiver edge (see the module doc).

  Args:
    model: A Penzai Gemma 1-3 LM (not modified).
    clean: Clean prompt(s), ``[batch, seq]`` ids (or strings with a tokenizer).
    corrupted: Corrupted prompt(s) of the same shape.
    metric: ``logits -> [batch]`` (see `gradients`).
    tokenizer: Needed for string prompts.

  Returns:
    An `EdgeAttribution`; ``.prune(top_k=..., threshold=...)`` keeps a
    circuit.

  Raises:
    InputError: No corrupted prompt, prompts of different shapes, a metric
      that doesn't return one value per row.
    SiteError: A model whose blocks edge attribution can't decompose.
  """
  clean_ids, bad_ids = gradients.prompt_pair(model, clean, corrupted, tokenizer)
  if bad_ids is None:
    raise errors.InputError("Edge attribution needs a corrupted prompt.")
  got = gradients.site_gradients(model, clean_ids, bad_ids, metric, _SITES)
  names, where, receivers = _receivers(model, got)
  edges: list[Edge] = []

  def add(sender: str, kind: str, layer: int, scores: np.ndarray) -> None:
    for r in np.flatnonzero(_fed(kind, layer, where)):
      edges.append(Edge(sender, names[r], float(scores[r])))

  delta = got.clean["embed", None] - got.corrupted["embed", None]
  add("embed", "embed", -1, to_numpy(_scores(delta, receivers)))
  for layer, block in enumerate(_blocks(model)):
    out_map = _maps(block)["attn.out"]
    dz = got.clean["attn.z", layer] - got.corrupted["attn.z", layer]
    per = to_numpy(_head_scores(out_map, got.corrupted["attn.z", layer], dz, receivers))
    for h in range(per.shape[1]):
      add(f"L{layer}.H{h}", "head", layer, per[:, h])
    dm = got.clean["mlp.out", layer] - got.corrupted["mlp.out", layer]
    add(f"L{layer}.MLP", "mlp", layer, to_numpy(_scores(dm, receivers)))
  edges.sort(key=lambda e: -abs(e.score))
  return EdgeAttribution(
    edges=edges,
    clean=float(np.mean(got.metric_clean)),
    corrupted=float(np.mean(got.metric_corrupted)),
  )
