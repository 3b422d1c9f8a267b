"""QK attribution: why a head attends from one position to another.

    qk = qk_attribution(rep, layer=1, head=0, query_pos=9, key_pos=4)
    qk.pairs[i, j]             # query node i × key node j's share of q · k
    qk.top(5)                  # [(query node, key node, value), ...]

Attribution-graph edges through attention use the *frozen* pattern: they say
what an attention head moved, not why it attended there. This splits the
attention score instead. In the replacement model (`replacement`: frozen
norm scales, and error nodes) the query ``q_t`` of ``head`` at ``layer`` and
position ``query_pos`` and the key ``k_u`` of its kv head at ``key_pos``
(the ``attn.q`` / ``attn.k`` sites: after QK-norm and RoPE, before scaling)
are linear in what the graph's nodes write, so::

  q_t = Σ_n q_n,   k_u = Σ_m k_m,   q_t · k_u = Σ_{n,m} q_n · k_m

over the nodes below ``layer``: active features (a CLT feature writes every
layer from its own up; only the writes below ``layer`` count), error nodes,
token embeddings, and one ``("bias",)`` node holding the decoder biases
``b_dec`` of the layers below. ``q_n`` (``[head_dim]``) is the node's
vector times the Jacobian of ``q_t`` at the site it writes (one vmapped
``jax.vjp`` over ``head_dim``); the pair matrix is complete (sums to the
score's ``q · k``; the model multiplies it by its query scale and adds the
mask). Nodes: ``("feature", layer, pos, latent)``, ``("error", layer, pos)``,
``("token", pos)``, ``("bias",)``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from gemma_surgery import errors
from gemma_surgery.circuits.linear import site_reads
from gemma_surgery.circuits.replacement import Replacement
from gemma_surgery.host import to_numpy
from gemma_surgery.surgery import checks, heads

Node = tuple


@dataclasses.dataclass
class QKAttribution:
  """The split of one attention score (see the module doc).

  Attributes:
    layer: Attention layer. head: Query head (user index).
    query_pos: Query position. key_pos: Key position.
    query_nodes: Nodes with a nonzero query vector, in order.
    key_nodes: Nodes with a nonzero key vector.
    query_vectors: ``[n_query_nodes, head_dim]`` their shares of ``q``.
    key_vectors: ``[n_key_nodes, head_dim]`` their shares of ``k``.
    pairs: ``[n_query_nodes, n_key_nodes]`` ``q_n · k_m``.
  """

  layer: int
  head: int
  query_pos: int
  key_pos: int
  query_nodes: list[Node]
  key_nodes: list[Node]
  query_vectors: np.ndarray
  key_vectors: np.ndarray
  pairs: np.ndarray

  @property
  def score(self) -> float:
    """``q · k`` (before the model's query scale): the sum of ``pairs``."""
    return float(self.pairs.sum())

  def top(self, k: int = 10) -> list[tuple[Node, Node, float]]:
    """The ``k`` pairs of largest ``|q_n · k_m|``, largest first."""
    flat = np.argsort(-np.abs(self.pairs), axis=None)[:k]
    rows, cols = np.unravel_index(flat, self.pairs.shape)
    return [
      (self.query_nodes[i], self.key_nodes[j], float(self.pairs[i, j]))
      for i, j in zip(rows, cols, strict=True)
    ]


def _check(rep: Replacement, layer: int, head: int, query_pos: int, key_pos: int):
  n, n_pos = rep.num_layers, rep.errors.shape[1]
  num_heads = checks.site_sizes(rep.model, "attn.q")["heads"]
  bad = []
  if not 0 <= layer < n:
    bad.append(f"layer {layer} (valid: 0..{n - 1})")
  if not 0 <= head < num_heads:
    bad.append(f"head {head} (valid: 0..{num_heads - 1})")
  if not 0 <= key_pos <= query_pos < n_pos:
    bad.append(
      f"positions query {query_pos}, key {key_pos} (need 0 <= key <= query < {n_pos})"
    )
  if bad:
    raise errors.InputError("qk_attribution: bad " + "; ".join(bad) + ".")


def _jacobians(rep: Replacement, layer: int, head: int, query_pos: int, key_pos: int):
  """Gradients of ``q_t`` and ``k_u`` (each ``[head_dim]``) at the embedding
  (``[hd, seq, d]``) and every ``mlp.out`` (``[hd, L, seq, d]``)."""
  reads = site_reads(rep, [("attn.q", layer), ("attn.k", layer)])

  def qk(embed_delta: jax.Array, mlp_out: jax.Array) -> tuple[jax.Array, jax.Array]:
    (q, k), _ = reads(embed_delta, mlp_out)
    q = heads.to_user_heads(q).unwrap("seq", "heads", "projection")
    k = heads.to_user_heads(k).unwrap("seq", "heads", "projection")
    group = q.shape[1] // k.shape[1]
    return q[query_pos, head], k[key_pos, head // group]

  e0 = jnp.zeros(rep.embed.shape, jnp.float32)
  v0 = jnp.asarray(rep.written, jnp.float32)
  (q, k), pullback = jax.vjp(qk, e0, v0)
  eye = jnp.eye(q.shape[0], dtype=q.dtype)
  zero = jnp.zeros_like(eye[0])
  ge_q, gv_q = jax.vmap(lambda c: pullback((c, zero)))(eye)
  ge_k, gv_k = jax.vmap(lambda c: pullback((zero, c)))(eye)
  out = [to_numpy(x, np.float64) for x in (ge_q, gv_q, ge_k, gv_k)]
  return out, to_numpy(q, np.float64), to_numpy(k, np.float64)


def _node_vectors(
  rep: Replacement, layer: int, pos_limit: int, ge: np.ndarray, gv: np.ndarray
) -> tuple[list[Node], np.ndarray]:
  """Each node's share of the read (``[hd]``), for positions ``<= pos_limit``."""
  dictionary = rep.dictionary
  nodes: list[Node] = []
  vectors: list[np.ndarray] = []
  for pos in range(pos_limit + 1):
    nodes.append(("token", pos))
    vectors.append(ge[:, pos] @ rep.embed[pos].astype(np.float64))
  for source in range(layer):
    for pos in range(pos_limit + 1):
      active = np.flatnonzero(rep.features[source][pos])
      if len(active):
        share = np.zeros((ge.shape[0], len(active)))
        for target in range(source, layer):
          dec = dictionary.decoder(source, target)
          if dec is None:
            continue
          rows = to_numpy(dec.unwrap("latents", "embedding"), np.float64)[active]
          share += gv[:, target, pos] @ rows.T
        share *= rep.features[source][pos][active].astype(np.float64)
        for j, latent in enumerate(active):
          nodes.append(("feature", source, pos, int(latent)))
          vectors.append(share[:, j])
    for pos in range(pos_limit + 1):
      nodes.append(("error", source, pos))
      vectors.append(gv[:, source, pos] @ rep.errors[source, pos].astype(np.float64))
  bias = np.zeros(ge.shape[0])
  for target in range(layer):
    b = to_numpy(dictionary.bias(target).unwrap("embedding"), np.float64)
    bias += gv[:, target].sum(axis=1) @ b
  nodes.append(("bias",))
  vectors.append(bias)
  matrix = np.stack(vectors)
  keep = np.abs(matrix).max(axis=1) > 0
  return [n for n, k in zip(nodes, keep, strict=True) if k], matrix[keep]


def qk_attribution(
  rep: Replacement, layer: int, head: int, query_pos: int, key_pos: int
) -> QKAttribution:
  """Splits head ``head``'s score from ``query_pos`` to ``key_pos`` at
  ``layer`` into pairs of graph nodes (see the module doc).

  Args:
    rep: A `Replacement` (from `replacement_model`).
    layer: Attention layer. head: Query head (``0..num_heads − 1``).
    query_pos: Attending position. key_pos: Attended position (``<= query_pos``).

  Raises:
    InputError: Layer, head or positions out of range.
  """
  _check(rep, layer, head, query_pos, key_pos)
  (ge_q, gv_q, ge_k, gv_k), _, _ = _jacobians(rep, layer, head, query_pos, key_pos)
  q_nodes, q_vecs = _node_vectors(rep, layer, query_pos, ge_q, gv_q)
  k_nodes, k_vecs = _node_vectors(rep, layer, key_pos, ge_k, gv_k)
  return QKAttribution(
    layer=layer,
    head=head,
    query_pos=query_pos,
    key_pos=key_pos,
    query_nodes=q_nodes,
    key_nodes=k_nodes,
    query_vectors=q_vecs,
    key_vectors=k_vecs,
    pairs=q_vecs @ k_vecs.T,
  )
