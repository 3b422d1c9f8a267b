"""The embedded default model ("gemma-surgery tiny"), shipped with the package.

A small Gemma-3-architecture model, its SentencePiece tokenizer and a
Gemma-Scope-2-format ``resid_post`` SAE, trained by this project on the
documentation that ships with Python and pinned PyPI packages
(``scripts/embedded_v2_corpus.py``, ``scripts/train_embedded_v2.py``,
``scripts/package_embedded.py``). It is not a Google model. Load it with
``gemma_surgery.load("tiny")`` and ``gemma_surgery.sae.load_sae("tiny")``;
nothing is downloaded.

Layout of `TINY_DIR`::

  config.json, model.safetensors, tokenizer.model   Hugging Face layout
  sae/resid_post/layer_L_width_W_l0_X/             Gemma Scope 2 layout
      params.safetensors, config.json
  transcoder_all/layer_L_width_W_l0_X/              one transcoder per layer
  clt/width_W_l0_X/params_layer_L.safetensors       cross-layer transcoder
  heldout.json                                      held-out documents
  manifest.json                                     recipe, metrics, SHA-256
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np

from gemma_surgery.errors import CheckpointError

TINY_NAME = "tiny"
TINY_DIR = pathlib.Path(__file__).resolve().parent / "tiny"
MANIFEST = "manifest.json"


def tiny_dir() -> pathlib.Path:
  """The folder of the embedded model.

  Raises:
    CheckpointError: If the package was installed without its data files.
  """
  if not (TINY_DIR / "config.json").is_file():
    raise CheckpointError(
      f"The embedded model is missing from {TINY_DIR}; reinstall gemma-surgery"
      " with its package data (or see scripts/package_embedded.py)."
    )
  return TINY_DIR


def tiny_sae_dir() -> pathlib.Path:
  """The folder of the embedded ``resid_post`` SAE (Gemma Scope 2 layout)."""
  found = sorted((tiny_dir() / "sae" / "resid_post").glob("layer_*"))
  if len(found) != 1:
    raise CheckpointError(
      f"Expected one embedded SAE under {TINY_DIR / 'sae' / 'resid_post'};"
      f" found {[p.name for p in found]}."
    )
  return found[0]


def tiny_transcoders_dir() -> pathlib.Path:
  """The ``transcoder_all`` folder of the embedded transcoders (one per layer)."""
  folder = tiny_dir() / "transcoder_all"
  if not folder.is_dir():
    raise CheckpointError(
      f"The embedded transcoders are missing from {folder}; see"
      " scripts/train_embedded_transcoders.py."
    )
  return folder


def tiny_clt_dir() -> pathlib.Path:
  """The folder of the embedded cross-layer transcoder (Gemma Scope 2 layout)."""
  found = sorted((tiny_dir() / "clt").glob("width_*"))
  if len(found) != 1:
    raise CheckpointError(
      f"Expected one embedded CLT under {TINY_DIR / 'clt'}; found"
      f" {[p.name for p in found]} (see scripts/train_embedded_transcoders.py)."
    )
  return found[0]


def manifest() -> dict:
  """The parsed ``manifest.json`` (recipe, seeds, metrics, file hashes)."""
  return json.loads((tiny_dir() / MANIFEST).read_text())


def heldout_texts() -> list[str]:
  """The held-out documents the shipped metrics were measured on."""
  return json.loads((tiny_dir() / "heldout.json").read_text())["documents"]


def pack_documents(
  docs: Iterable[Sequence[int]], seq_len: int, *, bos_id: int = 2, eos_id: int = 1
) -> np.ndarray:
  """Packs tokenized documents into ``[rows, seq_len + 1]`` training rows.

  The documents (without BOS) are concatenated, each followed by ``eos_id``;
  the stream is cut into chunks of ``seq_len`` tokens (the ragged tail is
  dropped) and every chunk gets ``bos_id`` in front. A row feeds the model its
  first ``seq_len`` tokens and predicts the last ``seq_len``.

  Args:
    docs: Token ids of each document, without BOS/EOS.
    seq_len: Number of predicted tokens per row.
    bos_id: Id put at the start of every row.
    eos_id: Id appended after every document.

  Returns:
    An int32 array ``[rows, seq_len + 1]`` (axes ``batch``, ``seq``).
  """
  stream: list[int] = []
  for doc in docs:
    stream.extend(int(t) for t in doc)
    stream.append(eos_id)
  rows = len(stream) // seq_len
  body = np.asarray(stream[: rows * seq_len], np.int32).reshape(rows, seq_len)
  return np.concatenate([np.full((rows, 1), bos_id, np.int32), body], axis=1)


__all__ = [
  "TINY_DIR",
  "TINY_NAME",
  "heldout_texts",
  "manifest",
  "pack_documents",
  "tiny_clt_dir",
  "tiny_dir",
  "tiny_sae_dir",
  "tiny_transcoders_dir",
]
