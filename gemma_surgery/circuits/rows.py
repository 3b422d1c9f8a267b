"""Attribution-graph rows on the device: the inner loop of `graph`.

    sources = graph_sources(rep, features, acts, dtype)
    g_embed, g_mlp = feature_grads(spec, arrays, written, depth, layer, pos, enc)
    rows = edge_rows(g_embed, g_mlp, sources, depth, last_pos)  # [T, N_pad]

A batch of ``T`` targets is one vmapped ``jax.vjp`` of the replacement
(`linear.apply_reads`) at the prompt, inside a jit whose arguments are the
replacement's arrays (weights, recorded patterns and norm scales, what each
``mlp.out`` writes): prompts of one length share its compile. Cotangents
are built on the device: a feature target ``(layer, pos, latent)`` puts its
encoder column at ``mlp.in[layer, pos]`` (`feature_grads`, which runs the
backward only through the ``depth`` layers the batch's targets read, and
never through the unembedding); a logit target puts ``one_hot(v) − 1/vocab``
on the last logits (`logit_grads`). `edge_rows` turns the gradients at the
embedding and at every ``mlp.out`` into edges from token, error and feature
nodes, so only ``[T, N]`` rows leave the device.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gemma_surgery.circuits.linear import ReadsSpec, apply_reads
from gemma_surgery.circuits.replacement import Replacement
from gemma_surgery.host import to_numpy

CHUNK = 128
"""Decoder rows per step of `edge_rows`' feature-edge products."""


class Sources(NamedTuple):
  """Source-node values, on the device.

  Attributes:
    embed: ``[seq, d]`` scaled token embeddings (token nodes).
    errors: ``[L, seq, d]`` error vectors (error nodes).
    dec: ``[E, d]`` one row per (feature, layer it writes): activation ×
      decoder row (zero rows pad ``E``).
    site: ``[E]`` where each row is written: ``layer · seq + pos``
      (ascending).
    node: ``[E]`` its feature's index (``n_feat_pad`` for padding rows).
    slots: ``[n_feat_pad]`` zeros: the padded feature axis (its length
      rounds the feature count up, so nearby counts share a compile).
  """

  embed: jax.Array
  errors: jax.Array
  dec: jax.Array
  site: jax.Array
  node: jax.Array
  slots: jax.Array


def padded(n: int, least: int = 64) -> int:
  """``n`` rounded up to a power of two (at least ``least``)."""
  return max(least, 1 << max(0, n - 1).bit_length())


def graph_sources(
  rep: Replacement, features: np.ndarray, acts: np.ndarray, dtype: Any
) -> Sources:
  """`Sources` of the graph's ``[n, 3]`` (layer, pos, latent) features."""
  dictionary = rep.dictionary
  n, n_pos, d = rep.errors.shape
  np_dtype = np.dtype(jnp.dtype(dtype).name)
  decs, sites, nodes = [], [], []
  for layer in range(n):
    rows = np.flatnonzero(features[:, 0] == layer)
    if not len(rows):
      continue
    for target in range(layer, n):
      dec = dictionary.decoder(layer, target)
      if dec is None:
        continue
      w = to_numpy(dec.unwrap("latents", "embedding"), np.float32).astype(np_dtype)
      decs.append(w[features[rows, 2]] * acts[rows, None].astype(np_dtype))
      sites.append(target * n_pos + features[rows, 1])
      nodes.append(rows)
  n_feat = padded(len(features))
  e = sum(len(r) for r in nodes)
  pad = padded(e) - e  # Padding rows: zero, at the last site, to no feature.
  site = np.concatenate([*sites, np.full(pad, n * n_pos - 1)])
  order = np.argsort(site, kind="stable")  # By site: depth cuts a prefix.
  dec = np.concatenate([*decs, np.zeros((pad, d), np_dtype)])[order]
  node = np.concatenate([*nodes, np.full(pad, n_feat)])[order].astype(np.int32)
  site = site[order].astype(np.int32)
  return Sources(
    embed=jnp.asarray(rep.embed, dtype),
    errors=jnp.asarray(rep.errors, dtype),
    dec=jnp.asarray(dec),
    site=jnp.asarray(site),
    node=jnp.asarray(node),
    slots=jnp.zeros(n_feat, dtype),
  )


@functools.partial(jax.jit, static_argnames=("spec", "depth"))
def feature_grads(
  spec: ReadsSpec,
  arrays: Any,
  written: jax.Array,
  depth: int,
  layer: jax.Array,
  pos: jax.Array,
  enc: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  """Gradients of ``T`` feature targets ``enc[t] · mlp.in[layer[t], pos[t]]``.

  Args:
    spec, arrays: From ``frozen_reads(rep, [("mlp.in", i) for i in range(L)])``.
    written: ``[L, seq, d]`` what each ``mlp.out`` writes (the primal point).
    depth: Static: every ``layer[t] < depth`` (the backward starts there).
    layer, pos: ``[T]`` int target sites. enc: ``[T, d]`` encoder columns
      (zero rows pad a batch).

  Returns:
    ``[T, seq, d]`` at the embedding and ``[T, L, seq, d]`` at ``mlp.out``.
  """

  def reads(e: jax.Array, v: jax.Array) -> jax.Array:
    values, _ = apply_reads(spec, arrays, e, v)
    return jnp.stack([x.unwrap("seq", "embedding") for x in values[:depth]])

  zeros = jnp.zeros(written.shape[1:], written.dtype)
  _, vjp = jax.vjp(reads, zeros, written)
  t = enc.shape[0]
  ct = jnp.zeros((t, depth, *written.shape[1:]), enc.dtype)
  ct = ct.at[jnp.arange(t), layer, pos].set(enc)
  return jax.vmap(vjp)(ct)


@functools.partial(jax.jit, static_argnames=("spec",))
def logit_grads(
  spec: ReadsSpec, arrays: Any, written: jax.Array, ids: jax.Array, live: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """Gradients of ``T`` logit targets ``logit[ids[t]] − mean(logits)`` (last
  position; ``live[t]`` is 0 for padding), shaped as `feature_grads`'."""

  def reads(e: jax.Array, v: jax.Array) -> jax.Array:
    return apply_reads(spec, arrays, e, v)[1]

  zeros = jnp.zeros(written.shape[1:], written.dtype)
  last, vjp = jax.vjp(reads, zeros, written)
  vocab = last.shape[-1]
  ct = jax.nn.one_hot(ids, vocab, dtype=last.dtype) - 1.0 / vocab
  return jax.vmap(vjp)(ct * live[:, None].astype(last.dtype))


@functools.partial(jax.jit, static_argnames=("chunk",))
def edge_rows(
  g_embed: jax.Array,
  g_mlp: jax.Array,
  sources: Sources,
  depth: jax.Array,
  last_pos: jax.Array,
  chunk: int = CHUNK,
) -> jax.Array:
  """``[T, n_feat_pad + L·seq + seq]`` edges into ``T`` targets from the
  (padded) feature, error and token nodes, given the targets' gradients.

  Feature edges are summed ``chunk`` decoder rows at a time, over the rows
  written below layer ``depth`` at positions up to ``last_pos`` only (the
  targets' gradients are zero elsewhere: they read no deeper layer and, the
  model being causal, no later position).
  """
  t, n, n_pos, d = g_mlp.shape
  tok = jnp.einsum("tpd,pd->tp", g_embed, sources.embed)
  err = jnp.einsum("tkpd,kpd->tkp", g_mlp, sources.errors).reshape(t, -1)
  flat = g_mlp.reshape(t, -1, d)
  e = sources.dec.shape[0]
  c = min(chunk, e)  # Chunks bound the [T, c, d] gather.
  first = jnp.arange(n) * n_pos  # Each layer's rows: sites first..first+last_pos.
  lo = jnp.searchsorted(sources.site, first)
  hi = jnp.searchsorted(sources.site, first + last_pos + 1)
  hi = jnp.where(jnp.arange(n) < depth, hi, lo)
  n_feat = sources.slots.shape[0]

  def add_layer(k: jax.Array, feat: jax.Array) -> jax.Array:
    def add_chunk(i: jax.Array, feat: jax.Array) -> jax.Array:
      begin = lo[k] + i * c
      start = jnp.minimum(begin, e - c)  # Where dynamic_slice reads from.
      site, dec, node = (
        jax.lax.dynamic_slice_in_dim(x, start, c)
        for x in (sources.site, sources.dec, sources.node)
      )
      row = start + jnp.arange(c)
      keep = (row >= begin) & (row < hi[k])
      vals = jnp.einsum("ted,ed->te", flat[:, site], dec)
      vals = jnp.where(keep[None], vals, 0)
      return feat.at[:, jnp.where(keep, node, n_feat)].add(vals)

    return jax.lax.fori_loop(0, (hi[k] - lo[k] + c - 1) // c, add_chunk, feat)

  feat = jax.lax.fori_loop(0, n, add_layer, jnp.zeros((t, n_feat + 1), flat.dtype))
  return jnp.concatenate([feat[:, :n_feat], err, tok], axis=1)
