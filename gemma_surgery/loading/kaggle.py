"""Kaggle/Flax Gemma checkpoints (orbax) -> canonical numpy parameters.

The official Flax checkpoints of Gemma 1, 2 and 3 (Kaggle ``google/gemma*/flax``
and the ``gemma`` library's GCS copies) and the ``gemma`` 4.x library's Gemma 4
checkpoints (`gemma_surgery.loading.kaggle_gemma4`) are orbax PyTree
checkpoints. A Kaggle
download holds the checkpoint folder next to the tokenizer, e.g.
``<root>/gemma2-2b-it/`` beside ``<root>/tokenizer.model``; either path may be
passed.

Reading goes in two steps, so that nothing large is read before the
checkpoint is known to fit:

1. The orbax tree metadata (``_METADATA``) gives every leaf's shape. The
   layout (flat, nested or stacked; see `gemma_surgery.loading.kaggle_layout`)
   is resolved, the config inferred (`infer_config_from_kaggle`) and all
   canonical shapes checked against it.
2. Only the text-model leaves are restored (an orbax partial restore: vision
   tower weights are never read), straight into host numpy arrays in their
   stored dtype (``restore_type=np.ndarray``), then sliced into canonical
   arrays (mostly views, no copies). `params.bind_parameters` puts them on the
   devices once.

Checkpoints written before orbax stored ``_METADATA`` (msgpack-only trees) are
not supported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import pathlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from gemma_surgery import errors
from gemma_surgery.config import GemmaConfig
from gemma_surgery.loading import kaggle_config, kaggle_gemma4, kaggle_layout
from gemma_surgery.loading.kaggle_config import (
  infer_config_from_kaggle,
  needs_gating_transpose,
)
from gemma_surgery.model import parameters as canonical

__all__ = [
  "OpenPlan",
  "find_checkpoint_dir",
  "infer_config_from_kaggle",
  "needs_gating_transpose",
  "open_plan",
  "read_kaggle_checkpoint",
]

# Leaves are restored in groups of about this many bytes, one orbax call per
# group, so the progress bar moves on large checkpoints.
CHUNK_BYTES = 1 << 30
_ORBAX_FILES = (
  "_CHECKPOINT_METADATA",
  "_sharding",
  "manifest.ocdbt",
  "ocdbt.process_0",
  "commit_success.txt",
  "checkpoint",
)


def _no_metadata_error(directory: pathlib.Path) -> errors.CheckpointError:
  step = (directory / "_CHECKPOINT_METADATA").exists()
  return errors.CheckpointError(
    f"{directory} looks like an orbax checkpoint but has no orbax _METADATA"
    f" file (the tree metadata){'' if step else ' nor _CHECKPOINT_METADATA'},"
    " so it cannot be restored. Copies that lost these files (a known"
    " problem of some GCS checkpoint copies) or interrupted downloads look"
    " like this; download the checkpoint again."
  )


def find_checkpoint_dir(path: str | pathlib.Path) -> pathlib.Path:
  """The orbax checkpoint folder at ``path`` or in its subfolders.

  Args:
    path: The checkpoint folder (with ``_METADATA``), or a folder holding
      exactly one such folder up to two levels down (a Kaggle download root).

  Raises:
    CheckpointError: Missing path, no checkpoint, an incomplete one, or
      several to choose from.
  """
  path = pathlib.Path(path).expanduser()
  if not path.exists():
    raise errors.CheckpointError(f"Kaggle checkpoint path {path} does not exist.")
  if not path.is_dir():
    raise errors.CheckpointError(
      f"{path} is a file; pass an orbax checkpoint folder (one with a _METADATA"
      " file) or the Kaggle download folder that contains it."
    )
  if (path / "_METADATA").is_file():
    return path
  for pattern in ("*/_METADATA", "*/*/_METADATA"):
    found = sorted(p.parent for p in path.glob(pattern) if p.is_file())
    if len(found) == 1:
      return found[0]
    if found:
      raise errors.CheckpointError(
        f"{path} holds several orbax checkpoints"
        f" {[str(p.relative_to(path)) for p in found]}; pass one of them."
      )
  candidates = [path, *sorted(p for p in path.iterdir() if p.is_dir())]
  for candidate in candidates:
    if any((candidate / name).exists() for name in _ORBAX_FILES):
      raise _no_metadata_error(candidate)
  raise errors.CheckpointError(
    f"No orbax checkpoint in {path}: neither it nor its subfolders have orbax's"
    " _METADATA / _CHECKPOINT_METADATA files. Pass the folder of a Kaggle Flax"
    " checkpoint, e.g. <download>/gemma2-2b-it."
  )


def corrupt_error(
  directory: pathlib.Path, what: str, e: Exception
) -> errors.CheckpointError:
  detail = str(e)
  if len(detail) > 500:  # Tensorstore appends its whole JSON spec.
    detail = detail[:500] + " ..."
  return errors.CheckpointError(
    f"Cannot {what} of the orbax checkpoint {directory}: {type(e).__name__}:"
    f" {detail}. The checkpoint is probably truncated or corrupt (e.g. an"
    " interrupted download); delete it and download it again."
  )


def _read_tree_metadata(handler: Any, directory: pathlib.Path) -> Mapping:
  try:
    meta = handler.metadata(directory)
  except errors.GemmaSurgeryError:
    raise
  except Exception as e:  # orbax/tensorstore/json raise many types.
    raise corrupt_error(directory, "read the tree metadata (_METADATA)", e) from e
  tree = getattr(meta, "tree", meta)
  if not isinstance(tree, Mapping):
    raise errors.CheckpointError(
      f"{directory}/_METADATA does not describe a tree of arrays (got"
      f" {type(tree).__name__}); this is not a Gemma Flax checkpoint."
    )
  return tree


def leaf_at(tree: Mapping, path: kaggle_layout.TreePath) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def subtree(leaves: Mapping[kaggle_layout.TreePath, Any]) -> dict:
  out: dict = {}
  for path, leaf in leaves.items():
    node = out
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = leaf
  return out


def chunked(sizes: Mapping[Any, int], budget: int) -> list[list]:
  chunks, current, total = [], [], 0
  for key, size in sizes.items():
    if current and total + size > budget:
      chunks.append(current)
      current, total = [], 0
    current.append(key)
    total += size
  return chunks + ([current] if current else [])


def leaf_bytes(meta: Mapping[Any, Any]) -> dict[Any, int]:
  """Bytes of each orbax leaf, from its metadata's shape and dtype."""
  return {
    p: int(np.prod(m.shape, dtype=np.int64)) * np.dtype(m.dtype).itemsize
    for p, m in meta.items()
  }


def bytes_bar(sizes: Mapping[Any, int], desc: str, progress: bool) -> tqdm:
  """A progress bar over the total of ``sizes``, in bytes."""
  return tqdm(
    total=sum(sizes.values()),
    desc=desc,
    unit="B",
    unit_scale=True,
    disable=not progress,
  )


def _restore(
  handler: Any,
  directory: pathlib.Path,
  tree: Mapping,
  paths: Sequence[kaggle_layout.TreePath],
  progress: bool,
) -> dict[kaggle_layout.TreePath, np.ndarray]:
  """Restores only ``paths`` as host numpy arrays in their stored dtype."""
  import orbax.checkpoint as ocp  # Slow import; only needed here.

  meta = {p: leaf_at(tree, p) for p in paths}
  sizes = leaf_bytes(meta)
  out = {}
  with bytes_bar(sizes, f"Reading {directory.name}", progress) as bar:
    for chunk in chunked(sizes, CHUNK_BYTES):
      item = subtree({p: meta[p] for p in chunk})
      restore_args = subtree(
        {p: ocp.RestoreArgs(restore_type=np.ndarray) for p in chunk}
      )
      args = ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True
      )
      try:
        restored = handler.restore(directory, args=args)
        for p in chunk:
          out[p] = np.asarray(leaf_at(restored, p))
          bar.update(sizes[p])
      except Exception as e:  # orbax/tensorstore raise many types.
        first, last = "/".join(chunk[0]), "/".join(chunk[-1])
        what = (
          f"read {first!r}"
          if len(chunk) == 1
          else (f"read the {len(chunk)} arrays {first!r} ... {last!r}")
        )
        raise corrupt_error(directory, what, e) from e
  return out


def read_kaggle_checkpoint(
  path: str | pathlib.Path,
  *,
  variant: str | None = None,
  config: GemmaConfig | None = None,
  parameter_dtype: str = "float32",
  activation_dtype: str | None = None,
  progress: bool = True,
) -> tuple[GemmaConfig, dict[str, np.ndarray]]:
  """Reads a Kaggle/Flax Gemma checkpoint as a config and canonical params.

  Args:
    path: The orbax checkpoint folder, or a Kaggle download folder holding
      one (see `find_checkpoint_dir`).
    variant: Preset name (``"gemma2_2b"``, ``"gemma-3-1b-it"``...) giving what
      shapes cannot tell; None picks the preset whose shapes match (see
      `gemma_surgery.loading.kaggle_config`).
    parameter_dtype: ``config.parameter_dtype`` of the returned config (the
      arrays keep their stored dtype; `params.bind_parameters` converts).
    activation_dtype: ``config.activation_dtype`` of the returned config.
    config: The architecture, when it is known (e.g. a custom-size model):
      skips inference; the checkpoint's shapes are still checked against it.
      Its dtypes are replaced by ``parameter_dtype``/``activation_dtype``.
    progress: Show a progress bar while reading weights.

  Returns:
    ``(config, params)`` with params in the canonical layout of
    `gemma_surgery.loading.params`, ready for `params.bind_parameters`.

  Raises:
    CheckpointError: Missing path, no or incomplete orbax metadata, corrupt or
      truncated data, missing weights or layers, or shapes that don't fit.
    ConfigError: Unknown variant or dtype, or no variant and no preset matches.
  """
  with open_plan(
    path,
    variant=variant,
    config=config,
    parameter_dtype=parameter_dtype,
    activation_dtype=activation_dtype,
  ) as opened:
    paths = list(dict.fromkeys(ref.path for ref, _ in opened.plan.values()))
    arrays = _restore(opened.handler, opened.directory, opened.tree, paths, progress)
  config, plan, source = opened.config, opened.plan, str(opened.directory)
  result = {name: fn(ref.take(arrays[ref.path])) for name, (ref, fn) in plan.items()}
  canonical.check_canonical(config, result, source)
  return config, result


@dataclasses.dataclass
class OpenPlan:
  """An opened checkpoint whose shapes were checked; nothing read yet.

  Attributes:
    directory: The orbax checkpoint folder.
    handler: The orbax ``PyTreeCheckpointHandler`` (closed on exit).
    tree: The orbax tree metadata.
    config: The architecture (given or inferred), with the requested dtypes.
    plan: Canonical name -> (`kaggle_layout.Ref`, `kaggle_layout.Part`).
  """

  directory: pathlib.Path
  handler: Any
  tree: Mapping
  config: GemmaConfig
  plan: dict[str, tuple[kaggle_layout.Ref, kaggle_layout.Part]]


@contextlib.contextmanager
def open_plan(
  path: str | pathlib.Path,
  *,
  variant: str | None,
  config: GemmaConfig | None,
  parameter_dtype: str,
  activation_dtype: str | None,
) -> Iterator[OpenPlan]:
  """Step 1 of the module docstring: metadata, layout, config, shape checks.

  Raises:
    CheckpointError, ConfigError: See `read_kaggle_checkpoint`.
  """
  directory = find_checkpoint_dir(path)
  source = str(directory)
  import orbax.checkpoint as ocp  # Slow import; only needed here.

  handler = ocp.PyTreeCheckpointHandler()
  try:
    tree = _read_tree_metadata(handler, directory)
    entries = kaggle_layout.layout_entries(tree, source)
    if kaggle_gemma4.is_gemma4(entries):
      config = kaggle_gemma4.resolve_config(entries, variant, config, source)
      config = config.replace(
        parameter_dtype=parameter_dtype, activation_dtype=activation_dtype
      )
      plan = kaggle_gemma4.canonical_plan(entries, config, source)
    else:
      shapes = kaggle_config.read_shapes(entries, source)
      if config is None:
        config = kaggle_config.config_from_shapes(shapes, variant, source)
      config = config.replace(
        parameter_dtype=parameter_dtype, activation_dtype=activation_dtype
      )
      transpose = needs_gating_transpose(variant if variant is not None else config)
      plan = kaggle_layout.canonical_plan(entries, config, transpose, source)
    proxies = {name: fn(ref.proxy()) for name, (ref, fn) in plan.items()}
    canonical.check_canonical(config, proxies, source)
    yield OpenPlan(directory, handler, tree, config, plan)
  finally:
    handler.close()
