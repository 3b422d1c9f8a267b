"""One ``heads`` axis for users, whatever Penzai's head layout.

Penzai names attention heads by attention kind: ``heads`` (MHA),
``query_heads`` (MQA queries; MQA keys/values have no head axis),
``head_groups`` × ``query_heads`` (GQA queries) and ``head_groups`` (GQA keys
and values). Users see one ``heads`` axis: for queries, scores, patterns and
``z`` it has ``num_heads`` entries with the flat index
``head = group * queries_per_group + query`` (the Hugging Face order); for keys
and values it has ``num_kv_heads`` entries (1 for MQA).
"""

from __future__ import annotations

from penzai import pz

from gemma_surgery import errors

_NATIVE = ("heads", "head_groups", "query_heads")
# The sites whose activation has head axes (see `gemma_surgery.surgery.sites`).
HEAD_SITES = frozenset(
  ("attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z")
)


def to_user_heads(x: pz.nx.NamedArray) -> pz.nx.NamedArray:
  """Merges/renames Penzai's head axes into one ``heads`` axis.

  An array with no head axis (MQA keys/values) gets a ``heads`` axis of
  size 1.
  """
  shape = x.named_shape
  if "heads" in shape:
    return x
  if "head_groups" in shape and "query_heads" in shape:
    g, q = shape["head_groups"], shape["query_heads"]
    flat = x.untag("head_groups", "query_heads")
    merged = pz.nx.nmap(lambda a: a.reshape(g * q, *a.shape[2:]))(flat)
    return merged.tag("heads")
  for name in ("head_groups", "query_heads"):
    if name in shape:
      return x.untag(name).tag("heads")
  return x[{"heads": None}]


def to_native_heads(
  x: pz.nx.NamedArray, native_shape: dict[str, int]
) -> pz.nx.NamedArray:
  """Inverse of `to_user_heads`: splits ``heads`` into the native head axes.

  Args:
    x: An array with a ``heads`` axis (or without one: returned unchanged,
      broadcasting over all heads).
    native_shape: Named shape of the activation it will combine with.

  Raises:
    SurgeryError: If the ``heads`` size doesn't match the activation's heads.
  """
  if "heads" not in x.named_shape:
    return x
  size = x.named_shape["heads"]
  native = {k: v for k, v in native_shape.items() if k in _NATIVE}
  expected = 1
  for v in native.values():
    expected *= v
  if size != expected:
    raise errors.SurgeryError(
      f"Value has heads={size} but the site has {expected} heads"
      f" (native axes {native or 'none: a single shared kv head'})."
    )
  if "heads" in native:
    return x
  if not native:
    return x[{"heads": 0}]
  if len(native) == 1:
    (name,) = native
    return x.untag("heads").tag(name)
  g, q = native["head_groups"], native["query_heads"]
  split = pz.nx.nmap(lambda a: a.reshape(g, q, *a.shape[1:]))(x.untag("heads"))
  return split.tag("head_groups", "query_heads")


def user_view(site: str, x: pz.nx.NamedArray) -> pz.nx.NamedArray:
  """The activation as users see it (one ``heads`` axis at head sites)."""
  return to_user_heads(x) if site in HEAD_SITES else x


def native_value(
  site: str, value: pz.nx.NamedArray, like: pz.nx.NamedArray
) -> pz.nx.NamedArray:
  """Converts a user-facing value (``heads`` axis) to ``like``'s layout."""
  if site in HEAD_SITES:
    value = to_native_heads(value, dict(like.named_shape))
  extra = set(value.named_shape) - set(like.named_shape)
  if extra:
    raise errors.SurgeryError(
      f"Value for site {site!r} has axes {sorted(extra)} that the activation"
      f" lacks; activation axes: {dict(like.named_shape)}."
    )
  for name, size in value.named_shape.items():
    if like.named_shape[name] != size:
      raise errors.SurgeryError(
        f"Value for site {site!r} has {name}={size}, the activation has"
        f" {name}={like.named_shape[name]}."
      )
  return value
