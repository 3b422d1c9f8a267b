"""Capturing a whole generation: `CaptureBuffer` writes into a fixed buffer.

A `SaveIntermediate` keeps only the last call's value, whose ``seq`` length
changes between the prompt (``seq = prompt length``) and each decoding step
(``seq = 1``); a value that changes shape cannot be carried through
``lax.while_loop``. The fused generation loop therefore swaps every
`CaptureLayer` (`SaveIntermediate`, `TopKCapture`) for a `CaptureBuffer`
holding fixed-shape buffers ``{batch, seq: cache_len, ...}`` and writes each
call's value at the ``cache_end_index`` side input along ``seq`` — the same
way Penzai writes its KV caches. The buffer reuses the capture's state
variable (same label), so the swap only changes the layer, never the state's
structure.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from penzai import pz

from gemma_surgery import errors
from gemma_surgery.model.decode_layers import write_seq
from gemma_surgery.surgery.layers import base
from gemma_surgery.surgery.layers.capture import CaptureLayer


@pz.pytree_dataclass
class CaptureBuffer(base.SurgeryLayer):
  """Writes the activation into a ``{batch, seq: cache_len, ...}`` buffer.

  Side inputs: ``cache_end_index`` (int scalar, required: the cache slot of
  this call's first token, provided by Penzai's ``KVCachingTransformerLM``).

  Attributes:
    buffer: State variable holding what ``source`` captures with ``seq`` of
      length ``cache_len``: for a `SaveIntermediate` a NamedArray ``{batch…,
      seq: cache_len, ...site axes}`` in the user-facing layout (one
      ``heads`` axis; at ``attn.scores``/``attn.pattern`` ``kv_seq`` is
      ``cache_len``), for a `TopKCapture` a (values, indices) pair.
    source: The capture layer replaced (its ``saved`` field set to None); its
      `CaptureLayer.captured` computes each call's value.
  """

  buffer: pz.StateVariable
  source: CaptureLayer

  @property
  def site(self) -> str:
    return self.source.site

  @property
  def layer(self) -> int | None:
    return self.source.layer

  def __call__(self, value: Any, /, **side_inputs) -> Any:
    if "cache_end_index" not in side_inputs:
      raise errors.SurgeryError(
        "CaptureBuffer needs the cache_end_index side input (KV-cached mode)."
      )
    start = side_inputs["cache_end_index"]
    self.buffer.value = jax.tree_util.tree_map(
      lambda buf, new: write_at(buf, new, start, where=self.site),
      self.buffer.value,
      self.source.captured(value),
      is_leaf=is_named,
    )
    return value

  def treescope_color(self) -> str:
    return "#79eb75"


def write_at(
  buffer: pz.nx.NamedArray, value: pz.nx.NamedArray, start: Any, where: str = ""
) -> pz.nx.NamedArray:
  """Writes ``value`` into ``buffer`` at ``start`` along ``seq``.

  Args:
    buffer: ``{seq: N, ...}`` NamedArray.
    value: ``{seq: n, ...}`` NamedArray with the same other axes (n <= N).
    start: Int scalar (may be traced) index along ``seq``.
    where: Site name for error messages.

  Returns:
    The updated buffer (a plain ``dynamic_update_slice``; no scatter).

  Raises:
    SurgeryError: If the axes besides ``seq`` don't match.
  """
  others = {k: v for k, v in buffer.named_shape.items() if k != "seq"}
  got = {k: v for k, v in value.named_shape.items() if k != "seq"}
  if others != got or "seq" not in value.named_shape or value.positional_shape:
    raise errors.SurgeryError(
      f"Capture at {where!r}: activation axes {dict(value.named_shape)} don't"
      f" fit the buffer {dict(buffer.named_shape)}."
    )
  return write_seq(buffer, value, "seq", start)


def is_named(x: Any) -> bool:
  return isinstance(x, pz.nx.NamedArray)


def new_buffers(value: Any, length: int) -> Any:
  """`new_buffer` for every NamedArray in the pytree ``value``."""
  return jax.tree_util.tree_map(
    lambda v: new_buffer(v, length), value, is_leaf=is_named
  )


def new_buffer(value: pz.nx.NamedArray, length: int) -> pz.nx.NamedArray:
  """A zero buffer like ``value`` but with ``seq`` of size ``length``.

  The prompt's value is written at 0, so the result holds it already.
  """
  shape = dict(value.named_shape)
  if "seq" not in shape:
    raise errors.SurgeryError(
      f"A captured activation has no seq axis: {shape}; cannot buffer it."
    )
  names = tuple(shape)
  zeros = pz.nx.wrap(
    jnp.zeros([length if n == "seq" else shape[n] for n in names], value.dtype)
  ).tag(*names)
  return write_at(zeros, value, 0)


def to_buffers(tree: Any) -> Any:
  """Replaces every `CaptureLayer` with a `CaptureBuffer` on its variable.

  Works on bound trees and on unbound ones (where ``saved`` is a slot): the
  buffer takes over the capture's variable, so binding the same state values
  works for both.
  """
  return (
    pz.select(tree)
    .at_instances_of(CaptureLayer)
    .apply(
      lambda s: CaptureBuffer(buffer=s.saved, source=dataclasses.replace(s, saved=None))
    )
  )
