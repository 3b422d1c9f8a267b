"""Named sites: where in a Gemma model an activation can be read or edited.

A site name plus layer indices resolves to an ordinary ``pz.Selection`` of
*anchor* nodes: list items after which a layer inserted with
``selection.insert_after(...)`` (or, with a fresh layer per site,
``selection.apply_and_inline(lambda a: [a, make_layer()])``) sees exactly the
site's activation. Resolution is structural — blocks by type, sublayers by
their Penzai type and role — and every selection's count is asserted, so a
site never silently lands elsewhere on another variant.

Anchors skip past surgery layers already inserted at the same site, so
rewrites stack in the order they were applied: a layer inserted later sees the
activation as modified by earlier ones (``capture(steer(model, s, ...), s)``
captures the steered value, at every site alike).

Per-layer sites (layer ``L``; negative indices count from the end):

================  ==============================================  ==================
site              activation                                      axes (+batch, seq)
================  ==============================================  ==================
resid_pre         input of block L                                embedding
attn.q            queries after QK-norm and RoPE, before scaling  heads*, projection
attn.k            keys after QK-norm and RoPE                     heads*, projection
attn.v            values                                          heads*, projection
attn.scores       logits after scale, soft cap and mask           heads*, kv_seq
attn.pattern      softmax attention weights                       heads*, kv_seq
attn.z            per-head mixed values, before the output proj   heads*, projection
attn.out          attention sublayer output (after post-norm)     embedding
resid_mid         residual after the attention sublayer           embedding
mlp.in            normalized MLP input (pre-FFW norm output)      embedding
mlp.in_unscaled   pre-FFW norm output without its gain (x/rms)    embedding
mlp.hidden        gelu(gate) * up                                 neurons
mlp.out           MLP sublayer output (after post-norm)           embedding
resid_post        output of block L                               embedding
================  ==============================================  ==================

Gemma 4 adds ``per_layer.input``, ``moe.router_logits``, ``moe.weights`` and
``moe.expert_out`` (`gemma_surgery.surgery.sites_gemma4`). Its KV-shared
layers compute no keys or values, so ``attn.k``/``attn.v`` don't exist there.

Global sites: ``embed`` (after the sqrt(d_model) scaling), ``final_norm``
(output of the final RMSNorm), ``logits`` (after any final soft cap).

\\* Penzai stores heads as ``heads`` (MHA), ``query_heads`` (MQA queries),
``head_groups`` × ``query_heads`` (GQA queries) or ``head_groups`` (GQA keys);
`gemma_surgery.surgery.heads` converts to and from one ``heads`` axis for users.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from penzai import pz
from penzai.models.transformer import model_parts

from gemma_surgery import errors
from gemma_surgery.model import gemma4
from gemma_surgery.surgery import heads, placing, sites_gemma4
from gemma_surgery.surgery.layers.base import SurgeryLayer
from gemma_surgery.surgery.site_table import GEMMA4_SITES, SITES, SiteInfo

_ALL_SITES = {**SITES, **GEMMA4_SITES}
HEAD_SITES = heads.HEAD_SITES
_ATTENTION_TYPES = (
  pz.nn.Attention,
  pz.nn.KVCachingAttention,
  gemma4.SharedKVAttention,
  gemma4.SharedKVCachingAttention,
)


def site_info(site: str) -> SiteInfo:
  """The `SiteInfo` of ``site``; raises `SiteError` for unknown names."""
  if not isinstance(site, str) or site not in _ALL_SITES:
    raise errors.SiteError(
      f"Unknown site {site!r}; valid sites: {', '.join(_ALL_SITES)}."
    )
  return _ALL_SITES[site]


def _body_owner(model: Any) -> Any:
  """The layer holding the body Sequential (uncached or KV-caching LM)."""
  if not hasattr(model, "body") or not isinstance(model.body, pz.nn.Sequential):
    raise errors.SiteError(
      f"Sites resolve on a Penzai TransformerLM (or its KV-caching form), got"
      f" {type(model).__name__}."
    )
  return model


def num_layers(model: Any) -> int:
  """Number of `TransformerBlock`s in ``model``."""
  body = _body_owner(model).body
  return placing.memo(
    model,
    "num_layers",
    lambda: pz.select(body).at_instances_of(model_parts.TransformerBlock).count(),
  )


def layer_indices(model: Any, layers: int | Iterable[int] | None) -> list[int]:
  """Validates layer indices (negative count from the end); None = all."""
  n = num_layers(model)
  if layers is None:
    return list(range(n))
  if isinstance(layers, int | np.integer):
    items = [layers]
  elif isinstance(layers, Iterable) and not isinstance(layers, str | bytes):
    items = list(layers)
  else:
    raise errors.SiteError(
      f"layers must be an int, a list of ints or None (all), got {layers!r}."
    )
  out = []
  for layer in items:
    if not isinstance(layer, int | np.integer) or isinstance(layer, bool):
      raise errors.SiteError(f"Layer indices must be ints, got {layer!r}.")
    layer = int(layer)
    if not -n <= layer < n:
      raise errors.SiteError(
        f"Layer {layer} is out of range for a model with {n} layers;"
        f" valid: {-n}..{n - 1}."
      )
    out.append(layer % n)
  if len(set(out)) != len(out):
    raise errors.SiteError(f"Layer indices {items} name the same layer twice.")
  return out


def _keypath_with_index(keypath: tuple, delta: int) -> tuple:
  """The keypath of a list sibling ``delta`` positions away."""
  last = keypath[-1]
  return (*keypath[:-1], type(last)(last.idx + delta))


def _single(selection: pz.Selection, what: str) -> pz.Selection:
  count = selection.count()
  if count != 1:
    raise errors.SiteError(
      f"Expected exactly one {what}, found {count}: this model's structure"
      " is not a Gemma/Penzai transformer block."
    )
  return selection


def _block_anchor(block: Any, site: str) -> tuple[pz.Selection, str]:
  """Selection inside one block, and whether to insert "after" or "before"."""
  if site in sites_gemma4.SITE_NAMES:
    return sites_gemma4.anchor(block, site), "after"
  sel = pz.select(block)
  residuals = sel.at_instances_of(pz.nn.Residual)
  if residuals.count() != 2:
    raise errors.SiteError(
      f"A transformer block should hold 2 residual sublayers, found"
      f" {residuals.count()}."
    )
  attn_res, mlp_res = residuals.pick_nth_selected(0), residuals.pick_nth_selected(1)
  attn = _single(attn_res.at_instances_of(_ATTENTION_TYPES), "attention layer")
  ffw = _single(mlp_res.at_instances_of(model_parts.TransformerFeedForward), "MLP")
  if site == "resid_mid":
    return attn_res, "after"
  if site == "attn.out":
    return attn_res.at(lambda r: r.delta.sublayers[-1]), "after"
  if site == "mlp.out":
    return mlp_res.at(lambda r: r.delta.sublayers[-1]), "after"
  if site == "mlp.in":
    return ffw, "before"
  if site == "mlp.in_unscaled":
    norm = mlp_res.at_instances_of(pz.nn.RMSLayerNorm).pick_nth_selected(0)
    return _single(
      norm.at_instances_of(pz.nn.RMSStandardize), "pre-FFW RMS standardization"
    ), "after"
  if site == "mlp.hidden":
    return _single(
      ffw.at_instances_of(pz.nn.BranchAndMultiplyTogether), "GeGLU product"
    ), "after"
  if site == "attn.q":
    rope = attn.at(lambda a: a.input_to_query).at_instances_of(pz.nn.ApplyRoPE)
    return _single(rope, "query RoPE"), "after"
  if site in ("attn.k", "attn.v") and not hasattr(attn.get(), "input_to_key"):
    raise errors.SiteError(
      f"Site {site!r} does not exist on a Gemma 4 KV-shared layer: it reuses"
      " the keys/values of an earlier layer (config.kv_source)."
    )
  if site == "attn.k":
    rope = attn.at(lambda a: a.input_to_key).at_instances_of(pz.nn.ApplyRoPE)
    return _single(rope, "key RoPE"), "after"
  if site == "attn.v":
    return attn.at(lambda a: a.input_to_value.sublayers[-1]), "after"
  if site in ("attn.scores", "attn.pattern"):
    softmax = _single(
      attn.at(lambda a: a.query_key_to_attn).at_instances_of(pz.nn.Softmax),
      "attention softmax",
    )
    return softmax, "before" if site == "attn.scores" else "after"
  if site == "attn.z":
    einsum = attn.at(lambda a: a.attn_value_to_output).at_instances_of(
      pz.nn.NamedEinsum
    )
    return _single(einsum, "value einsum"), "after"
  raise AssertionError(site)


def _node_at(root: Any, keypath: tuple) -> Any:
  """The node of ``root`` at a pytree keypath."""
  node = root
  for key in keypath:
    if hasattr(key, "name"):
      node = getattr(node, key.name)
    elif hasattr(key, "idx"):
      node = node[key.idx]
    else:
      node = node[key.key]
  return node


def _past_inserted(root: Any, selection: pz.Selection) -> pz.Selection:
  """Moves each anchor past the surgery layers that directly follow it.

  Without this, a layer inserted at an "after X" site would land *before*
  layers inserted there earlier, while at a "before X" site it lands after
  them: capturing a steered model would see the steering at some sites and
  not at others.
  """
  paths = []
  for path in selection.selected_by_path:
    if path and hasattr(path[-1], "idx"):
      siblings = _node_at(root, path[:-1])
      idx = path[-1].idx % len(siblings)
      while idx + 1 < len(siblings) and isinstance(siblings[idx + 1], SurgeryLayer):
        idx += 1
      path = (*path[:-1], type(path[-1])(idx))
    paths.append(path)
  return pz.select(root).at_keypaths(paths)


def _as_after(root: Any, selection: pz.Selection, side: str) -> pz.Selection:
  """Turns a "before X" anchor into "after X's previous sibling"."""
  paths = list(selection.selected_by_path.keys())
  if side == "after":
    return pz.select(root).at_keypaths(paths)
  before = []
  for path in paths:
    if not path or not hasattr(path[-1], "idx"):
      raise errors.SiteError("Site anchor is not an item of a layer list.")
    if path[-1].idx == 0:
      raise errors.SiteError("Site anchor has no preceding sibling.")
    before.append(_keypath_with_index(path, -1))
  return pz.select(root).at_keypaths(before)


def select(
  model: Any, site: str, layers: int | Iterable[int] | None = None
) -> pz.Selection:
  """Resolves a site to a ``pz.Selection`` of insertion anchors.

  Inserting a layer *after* each selected node places it at the site:
  ``select(model, "resid_post", 3).insert_after(layer)``. To give each site its
  own layer (e.g. a fresh ``StateVariable`` each), use
  ``.apply_and_inline(lambda node: [node, make_layer()])``.

  Args:
    model: A Penzai transformer LM (uncached or KV-caching), possibly patched.
    site: A site name (see `SITES` and, on Gemma 4, `GEMMA4_SITES`).
    layers: Layer index, list of indices, or None for all layers. Must be None
      for global sites.

  Returns:
    A selection with one anchor per requested layer, in layer order.

  Raises:
    SiteError: Unknown site, layers out of range, or unexpected structure.
  """
  info = site_info(site)
  owner = _body_owner(model)
  body_sel = pz.select(model).at(lambda m: m.body)
  blocks = body_sel.at_instances_of(model_parts.TransformerBlock)
  n = blocks.count()
  if not info.per_layer:
    if layers is not None:
      raise errors.SiteError(f"Site {site!r} is global: pass layers=None.")
    return _past_inserted(model, _global_anchor(model, owner, site, n))
  indices = layer_indices(model, layers)
  block_paths = list(blocks.selected_by_path.keys())
  if site in ("resid_pre", "resid_post"):
    anchors = pz.select(model).at_keypaths([block_paths[i] for i in indices])
    side = "before" if site == "resid_pre" else "after"
    return _past_inserted(model, _as_after(model, anchors, side))
  paths = []
  for i in indices:
    block = blocks.selected_by_path[block_paths[i]]
    inner, side = _block_anchor(block, site)
    inner_after = _as_after(block, inner, side)
    paths += [block_paths[i] + p for p in inner_after.selected_by_path]
  return _past_inserted(model, pz.select(model).at_keypaths(paths))


def _global_anchor(model: Any, owner: Any, site: str, n: int) -> pz.Selection:
  body = pz.select(model).at(lambda m: m.body)
  sublayers = owner.body.sublayers
  block_ix = [
    i for i, x in enumerate(sublayers) if isinstance(x, model_parts.TransformerBlock)
  ]
  if len(block_ix) != n or n == 0:
    raise errors.SiteError("Transformer blocks are not direct children of the body.")
  if site == "embed":
    scales = [
      i
      for i, x in enumerate(sublayers[: block_ix[0]])
      if isinstance(x, pz.nn.ConstantRescale)
    ]
    if len(scales) != 1:
      raise errors.SiteError("Expected one embedding scale before the first block.")
    return body.at(lambda b: b.sublayers[scales[0]])
  if site == "final_norm":
    norms = [
      i
      for i, x in enumerate(sublayers)
      if i > block_ix[-1] and isinstance(x, pz.nn.RMSLayerNorm)
    ]
    if len(norms) != 1:
      raise errors.SiteError("Expected one final RMSNorm after the last block.")
    return body.at(lambda b: b.sublayers[norms[0]])
  return body.at(lambda b: b.sublayers[-1])  # logits


def insert(
  model: Any,
  site: str,
  layers: int | Iterable[int] | None,
  make_layer: Any,
) -> Any:
  """Inserts a fresh layer at each selected site; a pure rewrite.

  Args:
    model: The model (not modified).
    site: Site name.
    layers: Layer(s) or None (all layers; must be None for global sites).
    make_layer: Called as ``make_layer(layer_index)`` (None for global sites)
      to build each inserted layer, so each site gets its own state.

  Returns:
    The rewritten model.
  """
  per_layer = site_info(site).per_layer
  if not per_layer and layers is not None:
    raise errors.SiteError(f"Site {site!r} is global: pass layers=None.")
  indices = layer_indices(model, layers) if per_layer else [None]
  made = [make_layer(i) for i in sorted(indices, key=lambda i: (i is None, i))]
  key = ("anchors", site, None if indices == [None] else tuple(indices))
  paths = placing.memo(
    model, key, lambda: tuple(select(model, site, layers).selected_by_path)
  )
  try:  # copies only the nodes on the anchors' paths (see `placing`)
    return placing.insert_after(model, paths, made)
  except placing.Unsupported:
    layers_made = iter(made)
    selection = pz.select(model).at_keypaths(paths)
    return selection.apply_and_inline(lambda node: [node, next(layers_made)])


def sites_table() -> Sequence[tuple[str, str, str, str]]:
  """Rows ``(site, axes, TransformerLens hook, meaning)`` for docs."""
  return [
    (s.name, ", ".join(s.axes), s.transformer_lens, s.doc) for s in _ALL_SITES.values()
  ]
